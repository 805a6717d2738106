"""The operator path end to end on one machine: `kubectl apply` to a dataset in object storage.

The real kopf operator runs against kmock; the stand-in kubelet (tests/kubelet.py) turns the
Deployments the operator creates into real local processes (the generator command line exactly
as rendered, with the pod's environment, `$(VAR)` expansion and Service names resolved to
loopback), and the inference Deployment into the embedded TGI-speaking model server. Around them: a real
nats-server, the real dispatcher over gRPC, and an S3-compatible server for the data.

A run's identity: the same name in two namespaces is two runs at the dispatcher, in the queue
and in storage; deleting a GenerationRun cancels its run and deletes its stream, never its data;
creating it again with another spec starts afresh, and a key the dispatcher still runs with
another spec fails the new object once, with a condition, instead of asking on every pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from kopf.testing import KopfRunner
from kubeapi import KubeApi, deployments_path, runs_path
from kubelet import operator_and_pods
from nats.js.errors import NotFoundError

from conftest import small_run, wait_for
from cosmoforge import queue
from cosmoforge.generation.compact import read_dataset
from cosmoforge.operator.handlers import registry
from cosmoforge.operator.render import Platform
from cosmoforge.operator.settings import OperatorSettings
from cosmoforge.queue import EmbeddedNats
from cosmoforge.runs.manager import RunManager
from cosmoforge.runs.status import RunStatus
from cosmoforge.services.dispatcher.client import DispatcherClient
from cosmoforge.services.dispatcher.server import create_server
from cosmoforge.storage import PROMPTS, RunStore
from processes import services

NS = "gen"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[KubeApi]:
    api = KubeApi().start()
    yield api
    api.stop()


def test_apply_to_dataset_in_object_storage(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cluster: KubeApi,
    nats_server: EmbeddedNats,
    model_server: str,
    s3_endpoint: str,
    s3_bucket: str,
) -> None:
    output = f"s3://{s3_bucket}/runs"
    document = small_run("e2e", maxNewTokens=8, workers=1)
    document["metadata"]["namespace"] = NS
    document["spec"]["prompts"].update(limit=4, maxSeedChars=300)
    document["spec"]["postprocess"] = {"dedup": {"enabled": False}, "decontaminate": {"enabled": False}}
    document["spec"]["output"] = {"uri": output}

    with services(tmp_path) as processes:
        dispatcher = processes.dispatcher(nats_server.url)
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig(tmp_path / "kubeconfig")))
        platform = Platform(
            nats_url=nats_server.url, dispatcher=dispatcher.target, storage_endpoint=s3_endpoint
        )
        with operator_and_pods(cluster, tmp_path, platform, NS, "e2e-inference", model_server) as (
            runner,
            kubelet,
        ):
            cluster.create(runs_path(NS), document)

            def phase() -> str:
                return str(((cluster.get(runs_path(NS, "e2e")) or {}).get("status") or {}).get("phase"))

            wait_for("generator pods", lambda: kubelet.pods.get("e2e-generator"), timeout=60)
            wait_for("Succeeded", lambda: phase() in ("Succeeded", "Failed"), timeout=300)  # and compaction
            status = cluster.get(runs_path(NS, "e2e"))["status"]  # type: ignore[index]
            assert status["phase"] == "Succeeded", (status, dispatcher.output()[-3000:])
            wait_for("generators stopped", lambda: not kubelet.pods.get("e2e-generator"), timeout=30)
            server = cluster.get(deployments_path(NS, "e2e-inference"))
            assert server is not None and server["spec"]["replicas"] == 0
        assert runner.exception is None

    assert status["prompts"] == 4 and status["generated"] == 4 and status["failed"] == 0
    # What it was expected to cost, written once the prompts were counted, and what it cost.
    assert status["estimate"]["prompts"] == 4 and status["estimate"]["completionTokens"] == 4 * 8
    assert status["tokens"] > 0 and status["eta"] == ""
    assert status["spend"]["gpuHours"] > 0  # one inference replica with one GPU, for seconds
    registered = next(c for c in status["conditions"] if c["type"] == "Registered")
    assert registered["status"] == "True" and registered["reason"] == "Dispatched"
    assert status["outputs"]["dataset"] == f"{output}/{NS}/e2e/dataset"
    dataset = read_dataset(RunStore.open(output, f"{NS}/e2e"))
    assert dataset is not None and dataset.num_rows == 4
    assert len(set(dataset.column("prompt_id").to_pylist())) == 4
    assert all(text for text in dataset.column("text").to_pylist())


# --- identity: namespaces, deletion, a name used again ---------------------------------------

TEAMS = ("team-a", "team-b")
INTERVAL = 0.5


class CountingManager(RunManager):
    """The dispatcher's own manager, counting the StartRun calls that reach it, per key."""

    def __init__(self, nats_url: str):
        super().__init__(nats_url, poll_seconds=0.2, namespaced=True)
        self.starts: dict[str, int] = {}

    async def start_run(self, spec_text: str) -> RunStatus:
        metadata = (yaml.safe_load(spec_text) or {}).get("metadata") or {}
        key = queue.run_key(metadata.get("namespace"), str(metadata.get("name")))
        self.starts[key] = self.starts.get(key, 0) + 1
        return await super().start_run(spec_text)


@contextlib.contextmanager
def dispatcher_beside(nats_url: str) -> Iterator[tuple[str, CountingManager]]:
    """The dispatcher's gRPC service on its own event loop in a thread: the operator (another
    thread) and the test call it over the network as they would in a cluster."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="dispatcher", daemon=True)
    thread.start()
    manager = CountingManager(nats_url)

    async def up() -> tuple[Any, int]:
        server, _, port = create_server(manager, 0, "127.0.0.1")
        await manager.start()
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(up(), loop).result(30)

    async def down() -> None:
        await server.stop(None)
        await manager.close()

    try:
        yield f"127.0.0.1:{port}", manager
    finally:
        asyncio.run_coroutine_threadsafe(down(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def call(target: str, method: str, *args: Any) -> Any:
    async def go() -> Any:
        async with DispatcherClient(target) as client:
            return await getattr(client, method)(*args)

    return asyncio.run(go())


def stream_messages(nats_url: str, key: str) -> int | None:
    async def go() -> int | None:
        nc = await nats.connect(nats_url)
        try:
            return int((await nc.jetstream().stream_info(queue.stream_name(key))).state.messages)
        except NotFoundError:
            return None
        finally:
            await nc.close()

    return asyncio.run(go())


def team_run(name: str, namespace: str, output: str, limit: int, **generation: Any) -> dict[str, Any]:
    document = small_run(name, **generation)
    document["metadata"]["namespace"] = namespace
    document["spec"]["prompts"].update(limit=limit, maxSeedChars=300)
    document["spec"]["postprocess"] = {"dedup": {"enabled": False}, "decontaminate": {"enabled": False}}
    document["spec"]["output"] = {"uri": output}
    return document


def run_status(api: KubeApi, namespace: str, name: str) -> dict[str, Any]:
    return (api.get(runs_path(namespace, name)) or {}).get("status") or {}


def condition(api: KubeApi, namespace: str, name: str, kind: str) -> dict[str, Any]:
    conditions = run_status(api, namespace, name).get("conditions", [])
    return next((c for c in conditions if c["type"] == kind), {})


def dispatched(target: str, key: str) -> dict[str, Any] | None:
    """The dispatcher's status of a run once all its prompts are queued."""
    try:
        status: dict[str, Any] = call(target, "get_status", key)
    except Exception:
        return None
    ready = status["phase"] == "Generating" and status["queued"] == status["prompts"] > 0
    return status if ready else None


def settled(what: str, value: Any, quiet: float = 6 * INTERVAL, timeout: float = 60.0) -> Any:
    """`value()` once it has not changed for `quiet` seconds (six timer passes).

    Passes that began before the operator's last status write landed in its watch may act on
    the older status once more; a retry loop never goes quiet, and fails here."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(INTERVAL / 2)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return last
    raise AssertionError(f"{what} still changing after {timeout} s: {last!r}")


def test_namespaces_deletion_and_a_name_used_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cluster: KubeApi,
    nats_server: EmbeddedNats,
    s3_endpoint: str,
    s3_bucket: str,
) -> None:
    output = f"s3://{s3_bucket}/runs"
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig(tmp_path / "kubeconfig")))
    first, second = (f"{team}/twin" for team in TEAMS)
    with dispatcher_beside(nats_server.url) as (target, manager):
        platform = Platform(nats_url=nats_server.url, dispatcher=target, storage_endpoint=s3_endpoint)
        settings = OperatorSettings(platform=platform, interval=INTERVAL, post_events=False)
        namespaces = [arg for team in TEAMS for arg in ("--namespace", team)]
        with KopfRunner(
            ["run", "--standalone", *namespaces], registry=registry(settings), timeout=60
        ) as runner:
            # 1. One name in two namespaces: two runs, two streams, two folders.
            for team, limit in zip(TEAMS, (2, 5), strict=True):
                cluster.create(runs_path(team), team_run("twin", team, output, limit))
            a = wait_for("team-a queued", lambda: dispatched(target, first), timeout=60)
            b = wait_for("team-b queued", lambda: dispatched(target, second), timeout=60)
            assert a["prompts"] < b["prompts"]
            assert stream_messages(nats_server.url, first) == a["prompts"]
            assert stream_messages(nats_server.url, second) == b["prompts"]
            assert {s["run"] for s in call(target, "list_runs")} == {first, second}
            for team, status in zip(TEAMS, (a, b), strict=True):
                assert status["output_uri"] == f"{output}/{team}/twin"
                generator = wait_for(
                    "generator", lambda t=team: cluster.get(deployments_path(t, "twin-generator"))
                )
                args = generator["spec"]["template"]["spec"]["containers"][0]["args"]
                assert args[args.index("--run") + 1] == f"{team}/twin"
                # Generating: the status names no dataset before compaction has written one.
                assert "dataset" not in run_status(cluster, team, "twin").get("outputs", {})
            store = RunStore.open(output, first)
            manifest = store.ids_in(PROMPTS)
            assert len(manifest) == a["prompts"]

            # 2. Deleting team-a's run cancels it at the dispatcher and deletes its stream; its
            #    data stays, and team-b's run goes on untouched.
            cluster.delete(runs_path(TEAMS[0], "twin"))
            wait_for("team-a's run gone", lambda: cluster.get(runs_path(TEAMS[0], "twin")) is None)
            assert call(target, "get_status", first)["phase"] == "Cancelled"
            assert stream_messages(nats_server.url, first) is None
            assert store.ids_in(PROMPTS) == manifest and store.read_text("spec.yaml")
            assert stream_messages(nats_server.url, second) == b["prompts"]
            assert call(target, "get_status", second)["phase"] == "Generating"

            # 3. The same name again with another spec: a fresh run with the new settings.
            cluster.create(runs_path(TEAMS[0]), team_run("twin", TEAMS[0], output, 6, maxNewTokens=7))
            fresh = wait_for("fresh run queued", lambda: dispatched(target, first), timeout=60)
            assert fresh["started_at"] > a["started_at"] and fresh["prompts"] > a["prompts"]
            saved = yaml.safe_load(store.read_text("spec.yaml") or "")
            assert saved["spec"]["generation"]["maxNewTokens"] == 7
            wait_for(
                "registered",
                lambda: condition(cluster, TEAMS[0], "twin", "Registered").get("status") == "True",
            )
            # Registering the same spec again is a no-op; once registered, the operator only
            # reads the run's status.
            settled("team-a's registrations", lambda: manager.starts[first])
            assert run_status(cluster, TEAMS[0], "twin")["phase"] == "Generating"

            # 4. A key the dispatcher still runs with another spec (submitted by hand here; in a
            #    cluster, a predecessor whose cancel never arrived): the new object fails once,
            #    says why, and is not registered again on every pass.
            taken = f"{TEAMS[1]}/taken"
            by_hand = team_run("taken", TEAMS[1], output, 2)
            call(target, "start_run", yaml.safe_dump(by_hand))
            before = wait_for("queued by hand", lambda: dispatched(target, taken), timeout=60)
            changed = copy.deepcopy(by_hand)
            changed["spec"]["generation"]["maxNewTokens"] = 5
            cluster.create(runs_path(TEAMS[1]), changed)
            wait_for("Failed", lambda: run_status(cluster, TEAMS[1], "taken").get("phase") == "Failed")
            registered = condition(cluster, TEAMS[1], "taken", "Registered")
            assert (registered["status"], registered["reason"]) == ("False", "SpecConflict")
            assert f"cosmo cancel {taken}" in registered["message"] and "\n" not in registered["message"]
            settled("the refused registrations", lambda: manager.starts[taken])
            assert condition(cluster, TEAMS[1], "taken", "Registered")["reason"] == "SpecConflict"
            assert run_status(cluster, TEAMS[1], "taken")["phase"] == "Failed"
            assert call(target, "get_status", taken)["started_at"] == before["started_at"]
            # Deleting the refused object leaves the run it never owned alone.
            cluster.delete(runs_path(TEAMS[1], "taken"))
            wait_for("refused run gone", lambda: cluster.get(runs_path(TEAMS[1], "taken")) is None)
            assert call(target, "get_status", taken)["phase"] == "Generating"
            assert stream_messages(nats_server.url, taken) == before["prompts"]

            # The way out the condition names: cancel the other run, change the spec; the object
            # is registered once more and its run starts afresh.
            cluster.create(runs_path(TEAMS[1]), changed)
            wait_for("Failed again", lambda: run_status(cluster, TEAMS[1], "taken").get("phase") == "Failed")
            call(target, "cancel", taken)
            cluster.patch(runs_path(TEAMS[1], "taken"), {"spec": {"generation": {"maxNewTokens": 6}}})
            wait_for(
                "registered after the fix",
                lambda: condition(cluster, TEAMS[1], "taken", "Registered").get("status") == "True",
            )
            mine = wait_for("queued again", lambda: dispatched(target, taken), timeout=60)
            assert mine["started_at"] > before["started_at"]
            assert run_status(cluster, TEAMS[1], "taken")["phase"] != "Failed"
        assert runner.exception is None
