"""The prompt manifest and the one "which prompts are pending" rule, and the run's dataset card."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import small_run
from cosmoforge.generation.compact import FAILED_TABLE, compact_dataset, read_dataset
from cosmoforge.prompts import manifest
from cosmoforge.prompts.builder import Prompt, build_prompts
from cosmoforge.spec import records
from cosmoforge.spec.model import GenerationRun, parse_run
from cosmoforge.spec.validation import resolve_uri
from cosmoforge.storage import FAILURES, GENERATIONS, PROMPTS, RunStore


def _run() -> GenerationRun:
    document = small_run("manifest")
    for seed in document["spec"]["seeds"]:
        seed["uri"] = resolve_uri(seed["uri"])
    return parse_run(document)


def _prompts() -> list[Prompt]:
    prompts = list(build_prompts(_run()))
    assert len(prompts) == 10
    return prompts


def test_manifest_is_written_in_fixed_size_files_and_replaces_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RunStore.open(str(tmp_path), "manifest")
    prompts = _prompts()
    monkeypatch.setattr(manifest, "PROMPTS_PER_FILE", 4)
    monkeypatch.setattr(manifest, "ROW_GROUP", 3)
    assert manifest.write_prompts(store, iter(prompts)) == 10
    files = [path.rsplit("/", 1)[-1] for path in store.list_parquet(PROMPTS)]
    assert files == ["prompts-00000.parquet", "prompts-00001.parquet", "prompts-00002.parquet"]
    assert store.ids_in(PROMPTS) == {p.prompt_id for p in prompts}

    # A smaller spec leaves no file of the bigger manifest behind.
    assert manifest.write_prompts(store, iter(prompts[:3])) == 3
    assert len(store.list_parquet(PROMPTS)) == 1
    assert store.ids_in(PROMPTS) == {p.prompt_id for p in prompts[:3]}


def test_pending_prompts_are_the_manifest_without_completions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RunStore.open(str(tmp_path), "manifest")
    prompts = _prompts()
    monkeypatch.setattr(manifest, "PROMPTS_PER_FILE", 4)  # "done" is decided per manifest file
    manifest.write_prompts(store, iter(prompts))
    assert len(manifest.done_ids(store)) == 0

    count = manifest.PublishCount()
    everything = list(manifest.pending_messages(store, manifest.done_ids(store), count))
    assert [prompt_id for prompt_id, _ in everything] == [p.prompt_id for p in prompts]
    assert (count.offered, count.already_done) == (10, 0)
    assert json.loads(everything[0][1]) == prompts[0].to_dict()

    finished = [prompts[0], prompts[5], prompts[9]]
    rows = [{**p.to_dict(), "text": "done", "model": "m"} for p in [*finished, prompts[5]]]
    store.write_table(f"{GENERATIONS}/w-0.parquet", pa.Table.from_pylist(rows, schema=records.GENERATIONS))
    done = manifest.done_ids(store)
    assert sorted(done.to_pylist()) == sorted(p.prompt_id for p in finished)

    count = manifest.PublishCount()
    left = [prompt_id for prompt_id, _ in manifest.pending_messages(store, done, count)]
    assert left == [p.prompt_id for p in prompts if p not in finished]
    assert (count.offered, count.already_done) == (7, 3)


def test_compact_dataset_writes_documents_failures_and_a_card_with_the_models(tmp_path: Path) -> None:
    store = RunStore.open(str(tmp_path), "card")
    prompts = _prompts()[:4]
    early, late = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC)
    rows = [
        {**prompts[0].to_dict(), "text": "first", "model": "b/model", "finished_at": early},
        {**prompts[0].to_dict(), "text": "again", "model": "b/model", "finished_at": late},
        {**prompts[1].to_dict(), "text": "other", "model": "a/model", "finished_at": early},
        {**prompts[3].to_dict(), "text": "not in this spec", "model": "c/model", "finished_at": early},
    ]
    store.write_table(f"{GENERATIONS}/w-0.parquet", pa.Table.from_pylist(rows, schema=records.GENERATIONS))
    failure = {
        "prompt_id": prompts[2].prompt_id,
        "error_kind": "timeout",
        "error": "slow",
        "failed_at": early,
    }
    store.write_table(f"{FAILURES}/w-0.parquet", pa.Table.from_pylist([failure], schema=records.FAILURES))

    keep = [p.prompt_id for p in prompts[:3]]
    result = compact_dataset(store, "card", "kind: GenerationRun\n", keep)
    assert (result.rows, result.failures, result.duplicates_dropped) == (2, 1, 1)
    assert result.models == ["a/model", "b/model"]
    dataset = read_dataset(store)
    assert dataset is not None
    assert sorted(dataset.column("text").to_pylist()) == ["first", "other"]
    card = store.read_text("dataset/README.md")
    assert card is not None
    assert "- documents: 2" in card and "- models: a/model, b/model" in card
    assert "kind: GenerationRun" in card
    failed = store.read_folder(FAILED_TABLE)
    assert failed is not None and failed.column("error_kind").to_pylist() == ["timeout"]
