"""`cosmo run` end to end with the real small model, to local disk and to S3-compatible storage."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import datasets
import fsspec
import pyarrow.parquet as pq

from conftest import COSMO, small_run, write_spec
from cosmoforge.generation.compact import read_dataset
from cosmoforge.spec.records import GENERATIONS
from cosmoforge.storage import RunStore

LINEAGE = {"prompt_id", "seed_source", "seed_id", "audience", "style", "topic", "model", "sampling",
           "prompt_tokens", "completion_tokens", "finish_reason", "started_at", "finished_at"}  # fmt: skip


def _cosmo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COSMO, *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def test_run_writes_a_dataset_and_a_second_run_generates_nothing(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "run.yaml", small_run("e2e"))
    out = tmp_path / "out"
    first = _cosmo("run", str(spec), "--out", str(out))
    assert first.returncode == 0, first.stderr
    dataset_dir = first.stdout.strip().splitlines()[-1]
    assert dataset_dir == f"{out}/e2e/dataset"

    data = datasets.load_dataset("parquet", data_files=f"{dataset_dir}/data-*.parquet", split="train")
    assert data.num_rows == 10  # 6 web + 4 math seeds, one prompt each
    assert set(data.column_names) >= LINEAGE
    assert len(set(data["prompt_id"])) == 10
    assert all(text.strip() for text in data["text"])
    assert set(data["model"]) == {"HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert all(0 < n <= 12 for n in data["completion_tokens"])
    assert {"web", "math"} == set(data["seed_source"])
    assert (out / "e2e" / "spec.yaml").exists() and (out / "e2e" / "dataset" / "README.md").exists()
    assert "generated now" in first.stderr

    shards = sorted(p.name for p in (out / "e2e" / "generations").iterdir())
    second = _cosmo("run", str(spec), "--out", str(out))
    assert second.returncode == 0, second.stderr
    assert "nothing to generate" in second.stderr
    assert "starting the embedded model" not in second.stderr
    assert sorted(p.name for p in (out / "e2e" / "generations").iterdir()) == shards
    again = datasets.load_dataset("parquet", data_files=f"{dataset_dir}/data-*.parquet", split="train")
    assert sorted(again["prompt_id"]) == sorted(data["prompt_id"])
    assert sorted(again["text"]) == sorted(data["text"])


def test_run_resumes_a_partial_run_without_regenerating(tmp_path: Path) -> None:
    """Completions already in storage are kept; only the missing prompts are generated."""
    spec = write_spec(tmp_path / "run.yaml", small_run("resume"))
    out = tmp_path / "out"
    assert _cosmo("run", str(spec), "--out", str(out)).returncode == 0
    generations = out / "resume" / "generations"
    shards = sorted(generations.iterdir())
    kept = pq.read_table(shards[0], schema=GENERATIONS)
    for shard in shards[1:]:
        shard.unlink()

    again = _cosmo("run", str(spec), "--out", str(out))
    assert again.returncode == 0, again.stderr
    dataset = read_dataset(RunStore.open(str(out), "resume"))
    assert dataset is not None and dataset.num_rows == 10
    by_id = dict(
        zip(dataset.column("prompt_id").to_pylist(), dataset.column("worker").to_pylist(), strict=True)
    )
    # The surviving shard's rows were not generated again: they still carry their first worker.
    for prompt_id, worker in zip(
        kept.column("prompt_id").to_pylist(), kept.column("worker").to_pylist(), strict=True
    ):
        assert by_id[prompt_id] == worker
    assert len(set(by_id.values())) == 2


def test_run_to_s3_compatible_storage(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    document = small_run("s3run")
    document["spec"]["seeds"] = document["spec"]["seeds"][1:]  # 4 math prompts keep it short
    spec = write_spec(tmp_path / "run.yaml", document)
    result = _cosmo("run", str(spec), "--out", f"s3://{s3_bucket}/runs")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"s3://{s3_bucket}/runs/s3run/dataset")
    fs = fsspec.filesystem("s3")
    files = fs.glob(f"{s3_bucket}/runs/s3run/dataset/data-*.parquet")
    assert len(files) == 1
    with fs.open(files[0], "rb") as handle:
        table = pq.read_table(handle)
    assert table.num_rows == 4 and all(t.strip() for t in table.column("text").to_pylist())
    assert fs.exists(f"{s3_bucket}/runs/s3run/spec.yaml")


def test_run_reports_seed_errors_without_a_traceback(tmp_path: Path) -> None:
    document = small_run("badseed")
    document["spec"]["seeds"] = [{"name": "web", "kind": "web", "uri": str(tmp_path / "missing.jsonl")}]
    result = _cosmo("run", str(write_spec(tmp_path / "run.yaml", document)), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_rerun_with_postprocessing_dedups_and_decontaminates_without_generating(tmp_path: Path) -> None:
    document = small_run("post")
    document["spec"]["seeds"] = document["spec"]["seeds"][1:]  # 4 math prompts
    document["spec"]["generation"]["maxNewTokens"] = 40
    document["spec"]["postprocess"] = {"dedup": {"enabled": False}, "decontaminate": {"enabled": False}}
    spec = write_spec(tmp_path / "run.yaml", document)
    out = tmp_path / "out"
    assert _cosmo("run", str(spec), "--out", str(out)).returncode == 0
    dataset = read_dataset(RunStore.open(str(out), "post"))
    assert dataset is not None and dataset.num_rows == 4

    # A benchmark that contains one generated document verbatim: decontamination must remove it.
    leaked = dataset.column("text").to_pylist()[0]
    benchmark = tmp_path / "leaky.jsonl"
    benchmark.write_text(json.dumps({"text": leaked, "task_name": "leaky"}) + "\n")
    document["spec"]["postprocess"] = {
        "dedup": {"enabled": True},
        "decontaminate": {"enabled": True, "benchmarks": [str(benchmark)]},
    }
    again = _cosmo("run", str(write_spec(spec, document)), "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "nothing to generate" in again.stderr
    counts = json.loads((out / "post" / "dedup" / "counts.json").read_text())
    assert counts["documents"] == 4
    report = json.loads((out / "post" / "decontam" / "report.json").read_text())
    assert report["documents_removed"] == 1
    final = pq.read_table(out / "post" / "decontam" / "kept.parquet")
    assert final.num_rows == counts["kept"] - 1
    assert leaked not in final.column("text").to_pylist()
    removed = pq.read_table(out / "post" / "decontam" / "removed.parquet").to_pylist()
    assert removed[0]["text"] == leaked and removed[0]["decontam_ratio"] > 0.5


def test_run_clusters_web_seeds_before_building_prompts(tmp_path: Path) -> None:
    """spec.clustering makes the run cluster web seeds that have no topics, with the run's model."""
    from conftest import REPO
    from cosmoforge.clustering.pipeline import read_assignments, read_topics

    document = small_run("clustered")
    corpus = REPO / "tests" / "data" / "clustering" / "subjects.jsonl"
    document["spec"]["seeds"] = [
        {"name": "web", "kind": "web", "uri": str(corpus), "idField": "id", "limit": 4}
    ]
    document["spec"]["clustering"] = {"clusters": 4, "samplesPerLabel": 3, "sampleSize": 100}
    document["spec"]["generation"]["maxNewTokens"] = 4
    result = _cosmo("run", str(write_spec(tmp_path / "run.yaml", document)), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    topics = read_topics(str(tmp_path / "out" / "clustered" / "topics" / "web"))
    assert topics.num_rows == 4 and sum(topics.column("size").to_pylist()) == 40
    # Every cluster is either kept with a label or says why not (the 135M model rarely gives a
    # usable score); a prompt carries its cluster's label exactly when that cluster was kept.
    rows = topics.to_pylist()
    assert all((row["kept"] and row["label"]) or row["reason"] for row in rows)
    kept = {row["cluster_id"]: row["label"] for row in rows if row["kept"]}
    clusters: dict[str, int] = {}
    for shard in read_assignments(str(tmp_path / "out" / "clustered" / "topics" / "web")):
        clusters.update(
            zip(shard.column("id").to_pylist(), shard.column("cluster_id").to_pylist(), strict=True)
        )
    dataset = read_dataset(RunStore.open(str(tmp_path / "out"), "clustered"))
    assert dataset is not None and dataset.num_rows == 4
    for seed_id, topic in zip(
        dataset.column("seed_id").to_pylist(), dataset.column("topic").to_pylist(), strict=True
    ):
        # topicConditioning is 0.5, so a kept cluster's label may or may not be used.
        assert topic is None or topic == kept.get(clusters[seed_id])
