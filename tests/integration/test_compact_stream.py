"""Streaming compaction: bucketed by prompt-id range, equal to compacting one table in memory.

Every test writes real parquet shards (the workers' schema) and compares the dataset with a
reference computed here the plain way: all shards in one list, the earliest completion of each
prompt (shard order breaking ties), sorted by prompt id. Small `rows_per_file` values make many
buckets and files out of a few hundred rows.
"""

from __future__ import annotations

import hashlib
import subprocess
import textwrap
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import COSMO
from cosmoforge.generation.compact import (
    BUCKETS,
    FAILED_TABLE,
    STAGING,
    bucket_bounds,
    bucket_of,
    compact,
    compact_run,
    read_dataset,
)
from cosmoforge.spec import records
from cosmoforge.storage import DATASET, FAILURES, GENERATIONS, PROMPTS, RunStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = "apiVersion: cosmoforge.io/v1alpha1\nkind: GenerationRun\nmetadata:\n  name: streamed\n"
WORDS = np.array("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split())


def prompt_id(n: int) -> str:
    return hashlib.sha256(f"prompt {n}".encode()).hexdigest()[:24]


def generations(ids: list[int], seconds: list[int], worker: str, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = [
        {"prompt_id": prompt_id(n), "run": "streamed", "seed_source": f"src{n % 3}", "audience": "students",
         "style": "textbook", "text": f"{worker} {n} " + " ".join(rng.choice(WORDS, 40)),
         "model": f"m{n % 2}", "completion_tokens": n % 7 + 1, "finished_at": T0 + timedelta(seconds=s),
         "worker": worker}
        for n, s in zip(ids, seconds, strict=True)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=records.GENERATIONS)


def failures(ids: list[int], seconds: list[int], kind: str) -> pa.Table:
    rows = [
        {"prompt_id": prompt_id(n), "error_kind": kind, "error": f"{kind} {n}", "attempts": 3,
         "failed_at": T0 + timedelta(seconds=s)}
        for n, s in zip(ids, seconds, strict=True)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=records.FAILURES)


def write_run(store: RunStore) -> None:
    """300 prompts over four shards; a third delivered twice or three times, some at the same
    instant (then the earlier shard wins); some failed, some of those succeeded later."""
    store.write_text("spec.yaml", SPEC)
    store.write_table(f"{GENERATIONS}/a-0.parquet", generations(list(range(0, 150)), [10] * 150, "a"))
    store.write_table(f"{GENERATIONS}/b-0.parquet", generations(list(range(100, 250)), [5] * 150, "b", 1))
    store.write_table(f"{GENERATIONS}/b-1.parquet", generations(list(range(240, 300)), [5] * 60, "b", 2))
    # Ties with b-0 (same second): the shard listed first, b-0, must win as in one sorted table.
    store.write_table(f"{GENERATIONS}/c-0.parquet", generations(list(range(200, 230)), [5] * 30, "c", 3))
    store.write_table(f"{FAILURES}/a-0.parquet", failures([10, 300, 301, 302], [1, 1, 1, 1], "timeout"))
    store.write_table(f"{FAILURES}/b-0.parquet", failures([301, 303], [0, 2], "connection"))


def reference(store: RunStore, folder: str, order_by: str, keep: set[str] | None = None) -> list[dict]:
    rows = [row for table in store.read_tables(folder) for row in table.to_pylist()]
    rows = [row for row in rows if keep is None or row["prompt_id"] in keep]
    best: dict[str, dict] = {}
    for row in rows:
        if row["prompt_id"] not in best or row[order_by] < best[row["prompt_id"]][order_by]:
            best[row["prompt_id"]] = row
    return [best[key] for key in sorted(best)]


def failed_reference(store: RunStore, keep: set[str] | None = None) -> list[dict]:
    done = {row["prompt_id"] for row in reference(store, GENERATIONS, "finished_at", keep)}
    return [row for row in reference(store, FAILURES, "failed_at", keep) if row["prompt_id"] not in done]


def dataset_rows(store: RunStore) -> list[dict]:
    table = read_dataset(store)
    assert table is not None
    return table.to_pylist()


def file_sizes(store: RunStore) -> list[int]:
    sizes = []
    for path in store.list_parquet(DATASET):
        with store.fs.open(path, "rb") as handle:
            sizes.append(pq.read_metadata(handle).num_rows)
    return sizes


def write_manifest(store: RunStore, ids: list[int]) -> set[str]:
    table = pa.Table.from_pylist([{"prompt_id": prompt_id(n)} for n in ids], schema=records.PROMPTS)
    half = table.num_rows // 2
    store.write_table(f"{PROMPTS}/prompts-00000.parquet", table.slice(0, half))
    store.write_table(f"{PROMPTS}/prompts-00001.parquet", table.slice(half))
    return {prompt_id(n) for n in ids}


def test_ids_spread_over_buckets_in_order() -> None:
    bounds = bucket_bounds(7)
    ids = sorted(prompt_id(n) for n in range(2000))
    buckets = bucket_of(pa.array(ids), bounds)
    assert (np.diff(buckets) >= 0).all()  # sorted ids -> non-decreasing buckets
    counts = np.bincount(buckets, minlength=7)
    assert counts.min() > 2000 / 7 * 0.7  # uniform hash prefixes fill every bucket
    # Ids that are not hex still land in order (tests and old runs use names like "p001").
    odd = sorted(["p001", "Z", "0", "ffffffff0", "", "zz", "9:", "a"])
    assert (np.diff(bucket_of(pa.array(odd), bounds)) >= 0).all()


@pytest.mark.parametrize("rows_per_file", [7, 40, 1000])
def test_the_dataset_equals_compacting_one_table(tmp_path: Path, rows_per_file: int) -> None:
    store = RunStore.open(str(tmp_path), "streamed")
    write_run(store)
    result = compact(store, rows_per_file=rows_per_file)

    expected = reference(store, GENERATIONS, "finished_at")
    assert dataset_rows(store) == expected
    assert [row["worker"] for row in expected if row["prompt_id"] == prompt_id(210)] == ["b"]
    assert (result.rows, result.duplicates_dropped) == (300, 390 - 300)
    assert result.tokens == sum(row["completion_tokens"] for row in expected)
    assert result.models == ["m0", "m1"]
    files = -(-300 // rows_per_file)
    assert file_sizes(store) == [rows_per_file] * (files - 1) + [300 - rows_per_file * (files - 1)]
    assert [path.rsplit("/", 1)[-1] for path in store.list_parquet(DATASET)] == [
        f"data-{index:05d}-of-{files:05d}.parquet" for index in range(files)
    ]
    failed = pq.read_table(store.path(FAILED_TABLE)).to_pylist()
    assert failed == failed_reference(store)
    assert [row["prompt_id"] for row in failed] == sorted(prompt_id(n) for n in (300, 301, 302, 303))
    assert next(row for row in failed if row["prompt_id"] == prompt_id(301))["error_kind"] == "connection"
    assert result.failures == 4
    assert not store.fs.exists(store.path(BUCKETS)) and not store.fs.exists(store.path(STAGING))


def test_the_manifest_limits_documents_and_failures(tmp_path: Path) -> None:
    store = RunStore.open(str(tmp_path), "streamed")
    write_run(store)
    keep = write_manifest(store, [n for n in range(0, 310) if n % 3 != 0])
    result = compact_run(store, "streamed", SPEC, rows_per_file=25)

    assert dataset_rows(store) == reference(store, GENERATIONS, "finished_at", keep)
    assert result.rows == len([n for n in range(300) if n % 3 != 0])
    failed = pq.read_table(store.path(FAILED_TABLE)).to_pylist()
    assert failed == failed_reference(store, keep)
    assert {row["prompt_id"] for row in failed} == {prompt_id(301), prompt_id(302)}  # 300, 303: not kept
    card = store.read_text(f"{DATASET}/README.md")
    assert card is not None and "# streamed" in card and f"documents: {result.rows}" in card


def test_keep_as_chunks_is_the_same_as_a_set(tmp_path: Path) -> None:
    ids = [prompt_id(n) for n in range(0, 300, 2)]
    chunks = [pa.array(ids[:50]), ids[50:90], pa.chunked_array([ids[90:]])]
    outcomes = []
    for name, keep in [("set", set(ids)), ("chunks", chunks), ("array", pa.array(ids))]:
        store = RunStore.open(str(tmp_path), name)
        write_run(store)
        result = compact(store, keep=keep, rows_per_file=30)
        outcomes.append((replace(result, files=[]), dataset_rows(store)))
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert outcomes[0][0].rows == 150


def cosmo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COSMO, *args], capture_output=True, text=True, timeout=120)


def test_the_command_compacts_a_run_folder(tmp_path: Path) -> None:
    store = RunStore.open(str(tmp_path / "out"), "some-folder")
    write_run(store)
    done = cosmo("compact", store.uri, "--rows-per-file", "50")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        f"300 documents, 90 duplicates dropped, 4 failures, 6 files in {store.uri}/{DATASET}"
    ]
    assert dataset_rows(store) == reference(store, GENERATIONS, "finished_at")
    card = store.read_text(f"{DATASET}/README.md")
    assert card is not None and "# streamed" in card  # the spec's name, not the folder's


def test_the_command_compacts_a_run_on_s3(s3_bucket: str) -> None:
    store = RunStore.open(f"s3://{s3_bucket}/out", "streamed")
    write_run(store)
    keep = write_manifest(store, list(range(50, 280)))
    done = cosmo("compact", f"s3://{s3_bucket}/out/streamed", "--rows-per-file", "40")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("230 documents, ")
    assert dataset_rows(store) == reference(store, GENERATIONS, "finished_at", keep)
    assert file_sizes(store)[:-1] == [40] * 5
    assert not store.fs.exists(store.path(BUCKETS))


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_the_command_refuses_bad_input_with_one_line(tmp_path: Path) -> None:
    store = RunStore.open(str(tmp_path), "run")
    line = one_error_line(cosmo("compact", store.uri))
    assert f"{store.uri}/{GENERATIONS}" in line and "no such folder" in line

    store.fs.makedirs(store.path(GENERATIONS), exist_ok=True)
    line = one_error_line(cosmo("compact", store.uri))
    assert "no generation shards" in line

    write_run(store)
    assert cosmo("compact", store.uri, "--rows-per-file", "64").returncode == 0
    before = dataset_rows(store)

    shard = Path(store.path(GENERATIONS, "b-0.parquet"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a shard cut short
    line = one_error_line(cosmo("compact", store.uri))
    assert f"{store.uri}/{GENERATIONS}/b-0.parquet" in line and "not a readable parquet file" in line
    shard.write_bytes(data)

    bare = generations([1, 2], [0, 0], "d").drop_columns(["text", "finished_at"])
    pq.write_table(bare, store.path(GENERATIONS, "d-0.parquet"))
    line = one_error_line(cosmo("compact", store.uri))
    assert f"{GENERATIONS}/d-0.parquet" in line and "missing required column(s) text, finished_at" in line

    line = one_error_line(cosmo("compact", store.uri, "--rows-per-file", "0"))
    assert "--rows-per-file" in line
    assert dataset_rows(store) == before  # nothing of the dataset was lost
    assert len(store.list_parquet(DATASET)) == 5


CHILD = textwrap.dedent(
    """
    import sys
    import pyarrow as pa
    from cosmoforge.generation import compact as compaction
    from cosmoforge.storage import RunStore

    # The first pass holds rows up to this budget; below a bucket's size so that buckets, not
    # the budget, bound memory in a run this small.
    compaction.BUFFER_BYTES = 256 * 1024
    result = compaction.compact(RunStore.open(sys.argv[1], "run"), rows_per_file=int(sys.argv[2]))
    print(result.rows, pa.default_memory_pool().max_memory())
    """
)


def peak_arrow_bytes(root: Path, shards: int, rows_per_shard: int, rows_per_file: int) -> tuple[int, int]:
    """Compact `shards` shards in a fresh process; its documents and Arrow's peak allocation
    (counted bytes, not timings or RSS: the same on any machine)."""
    store = RunStore.open(str(root), "run")
    store.fs.makedirs(store.path(GENERATIONS), exist_ok=True)
    rng = np.random.default_rng(shards)
    text = " ".join(rng.choice(WORDS, 200))  # ~1.2 KB documents
    for shard in range(shards):
        ids = [rng.bytes(12).hex() for _ in range(rows_per_shard)]
        rows = {"prompt_id": ids, "text": [f"{shard} {n} {text}" for n in range(rows_per_shard)],
                "finished_at": [T0] * rows_per_shard}  # fmt: skip
        table = pa.table(rows).cast(pa.schema([records.GENERATIONS.field(name) for name in rows]))
        pq.write_table(table, store.path(GENERATIONS, f"w-{shard:04d}.parquet"))
    done = subprocess.run(
        [COSMO[0], "-c", CHILD, str(root), str(rows_per_file)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    documents, peak = done.stdout.split()
    return int(documents), int(peak)


def test_memory_stays_flat_as_the_run_grows(tmp_path: Path) -> None:
    small = peak_arrow_bytes(tmp_path / "small", shards=8, rows_per_shard=500, rows_per_file=500)
    large = peak_arrow_bytes(tmp_path / "large", shards=32, rows_per_shard=500, rows_per_file=500)
    assert (small[0], large[0]) == (4_000, 16_000)
    # Holding the whole run would make the peak 4x; one bucket at a time keeps it about level.
    assert large[1] < 1.6 * small[1], (small, large)
