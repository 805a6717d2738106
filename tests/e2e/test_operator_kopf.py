"""The real kopf operator against a Kubernetes API (kmock) and a real nats-server.

Each test starts `kopf run` with the operator's handlers in a thread (KopfRunner), talks to
the API over HTTP as kubectl would, and moves the run's queue with a real JetStream client:
children appear with owner references, replicas follow the queue within bounds without
flapping, an invalid spec fails with a condition, deletion cleans up, restarts converge.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from kopf.testing import KopfRunner
from kubeapi import KubeApi, deployments_path, jobs_path, pods_path, runs_path, services_path

from conftest import COSMO, small_run, wait_for
from cosmoforge import queue
from cosmoforge.operator.handlers import registry
from cosmoforge.operator.render import Platform, workloads
from cosmoforge.operator.settings import OperatorSettings
from cosmoforge.queue import EmbeddedNats, free_port
from cosmoforge.spec.model import parse_run

NS = "gen"
OUTPUT_BASE = "s3://datasets/runs"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeApi]:
    api = KubeApi().start()
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
    yield api
    api.stop()


@pytest.fixture
def platform(nats_server: EmbeddedNats) -> Platform:
    return Platform(nats_url=nats_server.url, output_base=OUTPUT_BASE)


@pytest.fixture
def operator(platform: Platform) -> Callable[[], KopfRunner]:
    """A fresh operator each call: a short timer, no Events, no dispatcher (it owns the queue)."""
    settings = OperatorSettings(platform=platform, interval=0.5, post_events=False)
    return lambda: KopfRunner(
        ["run", "--standalone", "--namespace", NS], registry=registry(settings), timeout=60
    )


def gpu_spec(name: str, **generation: Any) -> dict[str, Any]:
    document = small_run(name, engine="tgi", model="mistralai/Mixtral-8x7B-Instruct-v0.1", **generation)
    document["metadata"]["namespace"] = NS
    document["spec"]["postprocess"] = {"dedup": {"enabled": False}, "decontaminate": {"enabled": False}}
    return document


def status(api: KubeApi, name: str) -> dict[str, Any]:
    return (api.get(runs_path(NS, name)) or {}).get("status") or {}


def replicas(api: KubeApi, name: str) -> int | None:
    deployment = api.get(deployments_path(NS, name))
    return None if deployment is None else deployment["spec"]["replicas"]


def condition(api: KubeApi, run: str, kind: str) -> dict[str, Any]:
    return next((c for c in status(api, run).get("conditions", []) if c["type"] == kind), {})


async def _publish(url: str, run: str, count: int) -> None:
    nc = await nats.connect(url)
    await queue.publish_all(nc, run, ((f"p{i}", b"{}") for i in range(count)))
    await nc.close()


async def _consume(url: str, run: str, count: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        queue.prompts_subject(run), durable=queue.CONSUMER, stream=queue.stream_name(run)
    )
    taken = 0
    while taken < count:
        # Batches below the consumer's max_ack_pending fill at once; bigger ones wait for the timeout.
        for msg in await sub.fetch(batch=min(count - taken, 4), timeout=5):
            await msg.ack_sync()
            taken += 1
    await sub.unsubscribe()
    await nc.close()


def test_apply_creates_children_with_owner_references_and_suspend_scales_to_zero(
    cluster: KubeApi, operator: Callable[[], KopfRunner], platform: Platform
) -> None:
    document = gpu_spec("mixtral", gpusPerReplica=2, replicas={"min": 1, "max": 3}, workers=3)
    with operator() as runner:
        run = cluster.create(runs_path(NS), document)
        server = wait_for("inference", lambda: cluster.get(deployments_path(NS, "mixtral-inference")))
        generator = wait_for("generator", lambda: cluster.get(deployments_path(NS, "mixtral-generator")))
        service = wait_for("service", lambda: cluster.get(services_path(NS, "mixtral-inference")))
        wait_for("Generating", lambda: status(cluster, "mixtral").get("phase") == "Generating")

        expected = {m["metadata"]["name"] + m["kind"]: m for m in workloads(parse_run(document), platform, 1)}
        for child in (server, generator, service):
            (owner,) = child["metadata"]["ownerReferences"]
            assert owner["uid"] == run["metadata"]["uid"] and owner["kind"] == "GenerationRun"
            assert owner["controller"] is True
            want = expected[child["metadata"]["name"] + child["kind"]]
            assert child["metadata"]["labels"].items() >= want["metadata"]["labels"].items()
            if child["kind"] == "Deployment":
                assert child["spec"]["template"]["spec"] == want["spec"]["template"]["spec"]
        args = server["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--num-shard") + 1] == "2"
        assert condition(cluster, "mixtral", "Valid")["status"] == "True"

        cluster.patch(runs_path(NS, "mixtral"), {"spec": {"suspend": True}})
        # The operator scales each child in its own request: wait for both, not one then the other.
        wait_for(
            "suspended",
            lambda: replicas(cluster, "mixtral-inference") == replicas(cluster, "mixtral-generator") == 0,
        )
        wait_for(
            "Suspended condition", lambda: condition(cluster, "mixtral", "Suspended").get("status") == "True"
        )
        cluster.patch(runs_path(NS, "mixtral"), {"spec": {"suspend": False}})
        wait_for("resumed", lambda: replicas(cluster, "mixtral-inference") == 1)
    assert runner.exception is None


def test_replicas_follow_queue_depth_within_bounds_without_flapping(
    cluster: KubeApi, nats_server: EmbeddedNats, operator: Callable[[], KopfRunner]
) -> None:
    autoscaling = {"targetQueuePerReplica": 10, "stabilizationSeconds": 3}
    document = gpu_spec("scaled", replicas={"min": 1, "max": 3}, workers=3, autoscaling=autoscaling)
    seen: list[tuple[int | None, int | None]] = []

    def sample() -> tuple[int | None, int | None]:
        pair = (replicas(cluster, "scaled-inference"), replicas(cluster, "scaled-generator"))
        if not seen or seen[-1] != pair:
            seen.append(pair)
        return pair

    def reach(what: str, pair: tuple[int, int]) -> None:
        wait_for(what, lambda: sample() == pair)

    with operator() as runner:
        cluster.create(runs_path(NS), document)
        reach("one server at the start", (1, 1))
        wait_for("stream", lambda: condition(cluster, "scaled", "QueueReachable").get("status") == "True")
        asyncio.run(_publish(nats_server.url, f"{NS}/scaled", 45))
        reach("three servers for 45 queued (ceil(45/10) = 5, clamped to 3)", (3, 3))
        asyncio.run(_consume(nats_server.url, f"{NS}/scaled", 40))
        reach("back to one once the window has passed", (1, 1))
        asyncio.run(_consume(nats_server.url, f"{NS}/scaled", 5))
        reach("zero when the queue is empty and generation done", (0, 0))
        wait_for("compaction", lambda: cluster.get(jobs_path(NS, "scaled-compact")))  # no kubelet here
        cluster.patch(jobs_path(NS, "scaled-compact"), {"status": {"succeeded": 1}})
        wait_for("Succeeded", lambda: status(cluster, "scaled").get("phase") == "Succeeded")
        final = status(cluster, "scaled")
    assert runner.exception is None
    for index in (0, 1):  # servers, then generators: each moved once per queue change, never back
        steps = [pair[index] for pair in seen if pair[index] is not None]
        assert [n for i, n in enumerate(steps) if i == 0 or steps[i - 1] != n] == [1, 3, 1, 0], seen
    assert final["prompts"] == 45 and final["generated"] == 45 and final["progress"] == "45/45 (100%)"


def test_invalid_spec_fails_with_a_condition_and_creates_nothing(
    cluster: KubeApi, operator: Callable[[], KopfRunner]
) -> None:
    document = gpu_spec("broken", replicas={"min": 3, "max": 1})
    with operator() as runner:
        cluster.create(runs_path(NS), document)
        wait_for("Failed", lambda: status(cluster, "broken").get("phase") == "Failed")
        valid = condition(cluster, "broken", "Valid")
        assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
        assert "spec.generation.replicas" in valid["message"] and "must not exceed" in valid["message"]
        time.sleep(1.5)  # several timer ticks: still nothing
        assert cluster.items(deployments_path(NS)) == []

        cluster.patch(runs_path(NS, "broken"), {"spec": {"generation": {"replicas": {"min": 1, "max": 3}}}})
        wait_for("fixed spec runs", lambda: cluster.get(deployments_path(NS, "broken-inference")))
        wait_for("Generating", lambda: status(cluster, "broken").get("phase") == "Generating")
    assert runner.exception is None


def test_stages_run_in_order_and_delete_removes_every_child(
    cluster: KubeApi, nats_server: EmbeddedNats, operator: Callable[[], KopfRunner]
) -> None:
    document = gpu_spec("staged")
    document["spec"]["postprocess"] = {"dedup": {"enabled": True}, "decontaminate": {"benchmarks": ["mmlu"]}}
    with operator() as runner:
        cluster.create(runs_path(NS), document)
        wait_for("stream", lambda: condition(cluster, "staged", "QueueReachable").get("status") == "True")
        asyncio.run(_publish(nats_server.url, f"{NS}/staged", 2))
        asyncio.run(_consume(nats_server.url, f"{NS}/staged", 2))
        root = f"{OUTPUT_BASE}/cosmoforge-runs/{NS}/staged"
        compact = wait_for("compact job", lambda: cluster.get(jobs_path(NS, "staged-compact")))
        assert compact["spec"]["template"]["spec"]["containers"][0]["args"] == ["compact", root]
        wait_for("Compacting", lambda: status(cluster, "staged").get("phase") == "Compacting")
        assert replicas(cluster, "staged-inference") == 0  # generation done: GPUs released
        time.sleep(1.0)
        assert cluster.get(jobs_path(NS, "staged-dedup")) is None  # not before compaction succeeds
        cluster.patch(jobs_path(NS, "staged-compact"), {"status": {"succeeded": 1}})
        dedup = wait_for("dedup job", lambda: cluster.get(jobs_path(NS, "staged-dedup")))
        assert dedup["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["dedup", f"{root}/dataset"]
        wait_for("Deduplicating", lambda: status(cluster, "staged").get("phase") == "Deduplicating")
        time.sleep(1.0)
        assert cluster.get(jobs_path(NS, "staged-decontaminate")) is None  # not before dedup succeeds
        cluster.patch(jobs_path(NS, "staged-dedup"), {"status": {"succeeded": 1}})
        wait_for("decontaminate job", lambda: cluster.get(jobs_path(NS, "staged-decontaminate")))
        wait_for("Decontaminating", lambda: status(cluster, "staged").get("phase") == "Decontaminating")
        # The failed pod's termination message (its log's tail) says why, in the command's words.
        line = f"cosmo decontaminate: {root}/dedup/kept.parquet is not a parquet file"
        terminated = {"exitCode": 2, "finishedAt": "2026-01-01T00:00:00Z", "message": f"reading\n{line}\n"}
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "staged-decontaminate-x1", "labels": {"job-name": "staged-decontaminate"}},
            "status": {"containerStatuses": [{"name": "decontaminate", "state": {"terminated": terminated}}]},
        }
        cluster.create(pods_path(NS), pod)
        cluster.patch(jobs_path(NS, "staged-decontaminate"), {"status": {"failed": 3}})
        wait_for("Failed", lambda: status(cluster, "staged").get("phase") == "Failed")
        message = condition(cluster, "staged", "Failed")["message"]
        assert "decontaminate" in message and message.endswith(line), message

        cluster.delete(runs_path(NS, "staged"))
        wait_for("run gone", lambda: cluster.get(runs_path(NS, "staged")) is None)
        assert cluster.items(deployments_path(NS)) == []
        assert cluster.items(services_path(NS)) == []
        assert cluster.items(jobs_path(NS)) == []
    assert runner.exception is None


def test_web_seeds_are_clustered_before_generation_starts(
    cluster: KubeApi, operator: Callable[[], KopfRunner]
) -> None:
    document = gpu_spec("topical")
    document["spec"]["seeds"] = [
        {"name": "web", "kind": "web", "uri": "s3://corpora/web.parquet", "idField": "url"},
        {"name": "tagged", "kind": "web", "uri": "s3://corpora/tagged.parquet", "topicField": "topic"},
    ]
    document["spec"]["clustering"] = {"clusters": 20, "gpu": True}
    with operator() as runner:
        cluster.create(runs_path(NS), document)
        job = wait_for("clustering job", lambda: cluster.get(jobs_path(NS, "topical-cluster-0")))
        wait_for("Clustering", lambda: status(cluster, "topical").get("phase") == "Clustering")
        # Only the source without topics is clustered, labelled by the run's own server.
        assert cluster.get(jobs_path(NS, "topical-cluster-1")) is None
        (container,) = job["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        assert args[:4] == [
            "cluster",
            "s3://corpora/web.parquet",
            "--out",
            f"{OUTPUT_BASE}/cosmoforge-runs/{NS}/topical/topics/web",
        ]
        assert args[args.index("--endpoint") + 1] == "http://topical-inference:8080"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert replicas(cluster, "topical-inference") == 1  # up for the labeller
        time.sleep(1.5)
        assert cluster.get(deployments_path(NS, "topical-generator")) is None  # no prompts yet

        cluster.patch(jobs_path(NS, "topical-cluster-0"), {"status": {"succeeded": 1}})
        wait_for("Clustered", lambda: condition(cluster, "topical", "Clustered").get("status") == "True")
        wait_for("generator", lambda: cluster.get(deployments_path(NS, "topical-generator")))
        wait_for("Generating", lambda: status(cluster, "topical").get("phase") == "Generating")
        outputs = status(cluster, "topical")["outputs"]
        assert outputs["topics-web"] == f"{OUTPUT_BASE}/cosmoforge-runs/{NS}/topical/topics/web"
    assert runner.exception is None


def test_a_failed_clustering_job_fails_the_run_before_any_prompt(
    cluster: KubeApi, operator: Callable[[], KopfRunner]
) -> None:
    document = gpu_spec("untopical")
    document["spec"]["seeds"] = [{"name": "web", "kind": "web", "uri": "s3://corpora/web.parquet"}]
    document["spec"]["clustering"] = {"clusters": 20}
    with operator() as runner:
        cluster.create(runs_path(NS), document)
        wait_for("clustering job", lambda: cluster.get(jobs_path(NS, "untopical-cluster-0")))
        cluster.patch(jobs_path(NS, "untopical-cluster-0"), {"status": {"failed": 3}})
        wait_for("Failed", lambda: status(cluster, "untopical").get("phase") == "Failed")
        assert "clustering web failed" in condition(cluster, "untopical", "Failed")["message"]
        wait_for("servers released", lambda: replicas(cluster, "untopical-inference") == 0)
        assert cluster.get(deployments_path(NS, "untopical-generator")) is None
    assert runner.exception is None


def _generated(api: KubeApi, url: str, run: str) -> None:
    """Drive a run's generation to its end (two prompts queued and taken) and its compaction Job
    to success, as a kubelet would: what follows starts from the compacted dataset."""
    wait_for("stream", lambda: condition(api, run, "QueueReachable").get("status") == "True")
    asyncio.run(_publish(url, f"{NS}/{run}", 2))  # the stream is named by the run's key
    asyncio.run(_consume(url, f"{NS}/{run}", 2))
    wait_for("compaction", lambda: api.get(jobs_path(NS, f"{run}-compact")))
    api.patch(jobs_path(NS, f"{run}-compact"), {"status": {"succeeded": 1}})


def test_decontamination_workers_run_beside_the_submitter_and_end_with_it(
    cluster: KubeApi, nats_server: EmbeddedNats, operator: Callable[[], KopfRunner]
) -> None:
    pooled = gpu_spec("pooled")
    pooled["spec"]["postprocess"] = {
        "dedup": {"enabled": False},
        "decontaminate": {"benchmarks": ["mmlu"], "workers": 3},
    }
    broken = copy.deepcopy(pooled)
    broken["metadata"]["name"] = "broken-pool"
    with operator() as runner:
        run = cluster.create(runs_path(NS), pooled)
        _generated(cluster, nats_server.url, "pooled")
        submit = wait_for("submit job", lambda: cluster.get(jobs_path(NS, "pooled-decontaminate")))
        pool = wait_for("worker pool", lambda: cluster.get(jobs_path(NS, "pooled-decontaminate-workers")))
        wait_for("Decontaminating", lambda: status(cluster, "pooled").get("phase") == "Decontaminating")
        for job in (submit, pool):
            (owner,) = job["metadata"]["ownerReferences"]
            assert owner["uid"] == run["metadata"]["uid"] and owner["controller"] is True
        assert submit["spec"]["template"]["spec"]["containers"][0]["args"][0] == "decontaminate-submit"
        assert pool["spec"]["template"]["spec"]["containers"][0]["args"][0] == "decontaminate-worker"
        assert pool["spec"]["parallelism"] == 3

        # Every worker left (idle) while the submitter still waits: a new pool takes over.
        cluster.patch(jobs_path(NS, "pooled-decontaminate-workers"), {"status": {"succeeded": 3}})
        wait_for(
            "a new pool",
            lambda: (
                cluster.creations("batch/v1/jobs", NS, "pooled-decontaminate-workers") == 2
                and cluster.get(jobs_path(NS, "pooled-decontaminate-workers"))
            ),
        )
        assert status(cluster, "pooled")["phase"] == "Decontaminating"
        # The submitter saw the merged outputs: the stage is done and the idle pool goes.
        cluster.patch(jobs_path(NS, "pooled-decontaminate"), {"status": {"succeeded": 1}})
        wait_for("Succeeded", lambda: status(cluster, "pooled").get("phase") == "Succeeded")
        assert cluster.get(jobs_path(NS, "pooled-decontaminate-workers")) is None
        assert status(cluster, "pooled")["outputs"]["decontaminate"].endswith("/pooled/decontam")

        # A pool that fails (workers crashing past its backoff limit) fails the run.
        cluster.create(runs_path(NS), broken)
        _generated(cluster, nats_server.url, "broken-pool")
        wait_for("pool", lambda: cluster.get(jobs_path(NS, "broken-pool-decontaminate-workers")))
        cluster.patch(jobs_path(NS, "broken-pool-decontaminate-workers"), {"status": {"failed": 7}})
        wait_for("Failed", lambda: status(cluster, "broken-pool").get("phase") == "Failed")
        assert "broken-pool-decontaminate-workers" in condition(cluster, "broken-pool", "Failed")["message"]
        wait_for("submitter stopped", lambda: cluster.get(jobs_path(NS, "broken-pool-decontaminate")) is None)
    assert runner.exception is None


def test_operator_restart_converges_without_duplicates(
    cluster: KubeApi, operator: Callable[[], KopfRunner]
) -> None:
    document = gpu_spec("steady")
    with operator() as first:
        cluster.create(runs_path(NS), document)
        wait_for("children", lambda: len(cluster.items(deployments_path(NS))) == 2)
        wait_for("Generating", lambda: status(cluster, "steady").get("phase") == "Generating")
    assert first.exception is None
    cluster.delete(deployments_path(NS, "steady-generator"))  # a child deleted by hand while down

    with operator() as second:
        wait_for("generator back", lambda: cluster.get(deployments_path(NS, "steady-generator")))
        time.sleep(1.5)  # resume handler and several timer ticks
        names = sorted(d["metadata"]["name"] for d in cluster.items(deployments_path(NS)))
        assert names == ["steady-generator", "steady-inference"]
        assert cluster.creations("apps/v1/deployments", NS, "steady-inference") == 1
        assert cluster.creations("apps/v1/deployments", NS, "steady-generator") == 2
        assert cluster.creations("v1/services", NS, "steady-inference") == 1
        assert status(cluster, "steady")["phase"] == "Generating"
    assert second.exception is None


def test_the_container_entry_point_runs_the_same_operator(
    cluster: KubeApi, tmp_path: Path, nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cosmo operator`, as the chart runs it: a process, configured by environment, with liveness."""
    for name, value in {
        "COSMO_NATS_URL": nats_server.url,
        "COSMO_OUTPUT_BASE": OUTPUT_BASE,
        "COSMO_OPERATOR_INTERVAL": "0.5",
        "COSMO_OPERATOR_EVENTS": "0",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("COSMO_DISPATCHER", raising=False)
    port = free_port()
    log = (tmp_path / "operator.log").open("wb")
    command = [*COSMO, "operator", "--namespace", NS, "--liveness", f"http://127.0.0.1:{port}/healthz"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        cluster.create(runs_path(NS), gpu_spec("entry"))
        # A new process imports kopf and the operator first: seconds, more on a loaded machine.
        wait_for("children", lambda: len(cluster.items(deployments_path(NS))) == 2, timeout=180)
        health = wait_for("liveness", lambda: _get(f"http://127.0.0.1:{port}/healthz"), timeout=60)
        assert health == 200
    finally:
        process.terminate()
        assert process.wait(30) == 0, (tmp_path / "operator.log").read_text()[-3000:]


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return 0
