"""The whole recipe through the operator, every child a real process: proof of the cluster path.

The real kopf operator runs against kmock; the stand-in kubelet (tests/kubelet.py) runs every
Deployment and Job it creates from the manifest's own command line, Indexed and work-queue Jobs
as Kubernetes runs them. Around them: a real nats-server, the real dispatcher over gRPC, an
S3-compatible server holding the seeds and every output, and the embedded model server in the
place of the GPU inference Deployment. One GenerationRun goes from web seeds through clustering,
generation, compaction, dedup and tokenization as datatrove ranks (Indexed Jobs), decontamination
workers, tiny training and evaluation to `Succeeded`; a decontamination worker is killed
mid-stage and the stage still ends with exactly one copy of each document.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from kubeapi import KubeApi, deployments_path, jobs_path, runs_path
from kubelet import operator_and_pods

from conftest import small_run, wait_for
from cosmoforge.generation.compact import read_dataset
from cosmoforge.operator.render import Platform
from cosmoforge.queue import EmbeddedNats
from cosmoforge.storage import RunStore
from processes import services

NS = "gen"
DATA = Path(__file__).parents[1] / "data"
CORPUS = DATA / "clustering" / "subjects.jsonl"
BENCHMARK = DATA / "benchmarks" / "mmlu.jsonl"
TRAINING = DATA / "training"


@pytest.fixture
def cluster() -> KubeApi:
    api = KubeApi().start()
    yield api  # type: ignore[misc]
    api.stop()


def upload_benchmark(bucket: str) -> str:
    uri = f"s3://{bucket}/benchmarks/{BENCHMARK.name}"
    s3fs.S3FileSystem().pipe(uri, BENCHMARK.read_bytes())
    return uri


def upload_training_inputs(bucket: str) -> tuple[str, str]:
    """The tokenizer and the evaluation tasks in the bucket: every path of the run is storage."""
    fs = s3fs.S3FileSystem()
    tokenizer = f"s3://{bucket}/tokenizers/{(TRAINING / 'tokenizer.json').name}"
    fs.pipe(tokenizer, (TRAINING / "tokenizer.json").read_bytes())
    for task in (TRAINING / "tasks").rglob("*.jsonl"):
        fs.pipe(f"s3://{bucket}/tasks/{task.relative_to(TRAINING / 'tasks').as_posix()}", task.read_bytes())
    return tokenizer, f"s3://{bucket}/tasks"


def upload_seeds(bucket: str) -> str:
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    table = pa.Table.from_pylist([{"url": r["id"], "text": r["text"]} for r in rows])
    uri = f"s3://{bucket}/seeds/web.parquet"
    with s3fs.S3FileSystem().open(uri, "wb") as sink:
        pq.write_table(table, sink)
    return uri


def test_a_run_with_clustering_and_post_processing_succeeds_with_every_child_a_process(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cluster: KubeApi,
    nats_server: EmbeddedNats,
    model_server: str,
    s3_endpoint: str,
    s3_bucket: str,
) -> None:
    output = f"s3://{s3_bucket}/runs"
    document = small_run("pipeline", maxNewTokens=16, workers=1)
    document["metadata"]["namespace"] = NS
    document["spec"]["seeds"] = [
        {"name": "web", "kind": "web", "uri": upload_seeds(s3_bucket), "idField": "url"}
    ]
    document["spec"]["clustering"] = {
        "clusters": 2, "sampleSize": 100, "samplesPerLabel": 1, "minEducationalScore": 0, "excludeTopics": [],
    }  # fmt: skip
    document["spec"]["prompts"].update(
        limit=8, maxSeedChars=300, audiences=["college_students"], topicConditioning=1.0
    )
    document["spec"]["postprocess"] = {
        "ranks": 2,
        "dedup": {"enabled": True},
        "decontaminate": {"benchmarks": [upload_benchmark(s3_bucket)], "workers": 2},
    }
    tokenizer, tasks = upload_training_inputs(s3_bucket)
    document["spec"]["training"] = {
        "tokenizer": tokenizer, "preset": "tiny", "steps": 4, "batchSize": 2, "sequenceLength": 32,
        "warmupSteps": 1, "evalTasks": ["arc_easy"], "evalData": tasks, "evalMaxSamples": 2,
    }  # fmt: skip
    document["spec"]["output"] = {"uri": output}

    with services(tmp_path) as processes:
        dispatcher = processes.dispatcher(nats_server.url)
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig(tmp_path / "kubeconfig")))
        platform = Platform(
            nats_url=nats_server.url, dispatcher=dispatcher.target, storage_endpoint=s3_endpoint
        )
        with operator_and_pods(cluster, tmp_path, platform, NS, "pipeline-inference", model_server) as (
            runner,
            kubelet,
        ):
            cluster.create(runs_path(NS), document)

            def status() -> dict:  # type: ignore[type-arg]
                return (cluster.get(runs_path(NS, "pipeline")) or {}).get("status") or {}

            def done(job: str) -> bool:
                found = cluster.get(jobs_path(NS, f"pipeline-{job}"))
                return bool(found and (found.get("status") or {}).get("conditions"))

            wait_for("clustering", lambda: done("cluster-0"), timeout=600)
            assert status().get("phase") != "Failed", kubelet.log("pipeline-cluster-0")
            wait_for("generator", lambda: cluster.get(deployments_path(NS, "pipeline-generator")), timeout=60)

            # Kill a decontamination worker once it is working: the stage must still end whole.
            wait_for("workers", lambda: kubelet.kill_one("pipeline-decontaminate-workers"), timeout=600)
            wait_for("the end", lambda: status().get("phase") in ("Succeeded", "Failed"), timeout=600)
            final = status()
            assert final["phase"] == "Succeeded", (
                [c.get("message") for c in final.get("conditions", []) if c.get("type") == "Failed"],
                final,
                kubelet.log("pipeline-"),
                dispatcher.output()[-3000:],
            )
        assert runner.exception is None

    store = RunStore.open(output, f"{NS}/pipeline")  # the run's key: namespace and name
    root = f"{output}/{NS}/pipeline"
    assert final["outputs"]["topics-web"] == f"{root}/topics/web"
    assert {name: final["outputs"][name] for name in ("compact", "dedup", "decontaminate", "tokenize")} == {
        "compact": f"{root}/dataset",
        "dedup": f"{root}/dedup",
        "decontaminate": f"{root}/decontam",
        "tokenize": f"{root}/tokens",
    }
    assert {"train", "evaluate", "dedup-signatures", "tokenize-ranks"} <= set(final["outputs"])
    ranked = cluster.get(jobs_path(NS, "pipeline-dedup-signatures"))
    assert ranked is not None and ranked["spec"]["completionMode"] == "Indexed"
    assert {c["type"] for c in final["conditions"] if c["status"] == "True"} >= {
        "Clustered",
        "Generated",
        "Complete",
    }

    # Prompts were built with the topics the clustering Job wrote, from kept clusters only.
    topics = pq.read_table(store.url("topics", "web", "topics.parquet"), filesystem=store.fs).to_pylist()
    kept = {row["label"] for row in topics if row["kept"] and row["label"]}
    dataset = read_dataset(store)
    assert dataset is not None and dataset.num_rows == final["generated"] == 8
    assert kept and set(dataset.column("topic").to_pylist()) <= kept  # every prompt names its topic

    # Exactly one copy of each document after the killed worker: kept + removed = what dedup kept.
    dedup_kept = pq.read_table(store.url("dedup", "kept.parquet"), filesystem=store.fs)
    decontam_kept = pq.read_table(store.url("decontam", "kept.parquet"), filesystem=store.fs)
    removed = pq.read_table(store.url("decontam", "removed.parquet"), filesystem=store.fs)
    ids = decontam_kept.column("prompt_id").to_pylist() + removed.column("prompt_id").to_pylist()
    assert sorted(ids) == sorted(dedup_kept.column("prompt_id").to_pylist())

    # Tokenized by two ranks and merged: every kept document is in the tokens the model trained on.
    tokens = json.loads(store.fs.cat_file(store.path("tokens", "metrics.json")))
    assert tokens["documents"] == decontam_kept.num_rows and tokens["tokens"] > 0, tokens
    assert store.fs.exists(store.path("checkpoints", "checkpoint", "config.json"))
    assert json.loads(store.fs.cat_file(store.path("eval", "results.json")))
