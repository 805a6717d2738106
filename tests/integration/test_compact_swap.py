"""Compacting again replaces the dataset atomically: the old one stays readable until the new is whole.

Failures are injected into the real write path (a storage error on the second data file, one
in the middle of the swap) on a local folder and on an S3-compatible server (moto).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from cosmoforge.generation import compact as compaction
from cosmoforge.generation.compact import PREVIOUS, STAGING, compact_dataset, read_dataset
from cosmoforge.spec import records
from cosmoforge.storage import DATASET, GENERATIONS, RunStore

SPEC = "kind: GenerationRun\nspec:\n  seeds:\n  - uri: s3://reader:hunter2-secret@bucket/seeds\n"


def _rows(texts: list[str], model: str) -> pa.Table:
    at = datetime(2024, 1, 1, tzinfo=UTC)
    rows = [
        {"prompt_id": f"p{n:03d}", "text": text, "model": model, "finished_at": at, "completion_tokens": 1}
        for n, text in enumerate(texts)
    ]
    return pa.Table.from_pylist(rows, schema=records.GENERATIONS)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RunStore:
    if request.param == "local":
        return RunStore.open(str(tmp_path), "swap")
    bucket = request.getfixturevalue("s3_bucket")
    return RunStore.open(f"s3://{bucket}/runs", "swap")


def _texts(store: RunStore) -> list[str]:
    table = read_dataset(store)
    assert table is not None
    return sorted(table.column("text").to_pylist())


def _first_dataset(store: RunStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(compaction, "ROWS_PER_FILE", 2)  # several files, so a write can fail midway
    old = [f"old {n}" for n in range(5)]
    store.write_table(f"{GENERATIONS}/w-0.parquet", _rows(old, "old/model"))
    compact_dataset(store, "swap", SPEC, {f"p{n:03d}" for n in range(5)})
    assert _texts(store) == old
    # More prompts were generated since: the next compaction has a different, larger dataset.
    store.write_table(f"{GENERATIONS}/w-1.parquet", _rows([f"new {n}" for n in range(8)], "new/model"))
    return old


def _failing_on(call: int, real: Callable[..., None]) -> Callable[..., None]:
    calls = {"n": 0}

    def write(self: RunStore, relative: str, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == call:
            raise OSError("injected storage failure")
        real(self, relative, *args)

    return write


def test_a_failure_while_writing_leaves_the_old_dataset(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _first_dataset(store, monkeypatch)
    with monkeypatch.context() as patched:
        patched.setattr(RunStore, "write_table", _failing_on(2, RunStore.write_table))
        with pytest.raises(OSError, match="injected"):
            compact_dataset(store, "swap", SPEC, {f"p{n:03d}" for n in range(8)})
    assert _texts(store) == old  # whole, and only the old rows
    card = store.read_text(f"{DATASET}/README.md")
    assert card is not None and "old/model" in card
    # The next compaction succeeds and cleans up what the failed one left.
    result = compact_dataset(store, "swap", SPEC, {f"p{n:03d}" for n in range(8)})
    assert result.rows == 8 and result.models == ["new/model", "old/model"]
    assert len(_texts(store)) == 8
    assert not store.fs.exists(store.path(STAGING)) and not store.fs.exists(store.path(PREVIOUS))
    assert len(store.list_parquet(DATASET)) == 4  # 8 rows, 2 per file: no file of the old one left


def test_a_crash_in_the_middle_of_the_swap_is_repaired(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _first_dataset(store, monkeypatch)
    real_mv = type(store.fs).mv
    moves = {"n": 0}

    def crash_on_second_move(fs: object, *args: object, **kwargs: object) -> None:
        moves["n"] += 1
        if moves["n"] == 2:  # the old dataset is aside, the new one not yet in place
            raise OSError("injected crash")
        real_mv(fs, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(type(store.fs), "mv", crash_on_second_move)
        with pytest.raises(OSError, match="injected"):
            compact_dataset(store, "swap", SPEC, {f"p{n:03d}" for n in range(8)})
    assert _texts(store) == old  # readers fall back to the folder set aside
    compact_dataset(store, "swap", SPEC, {f"p{n:03d}" for n in range(8)})
    assert len(_texts(store)) == 8


def test_the_card_masks_credentials_in_uris(tmp_path: Path) -> None:
    store = RunStore.open(str(tmp_path), "card")
    store.write_table(f"{GENERATIONS}/w-0.parquet", _rows(["a"], "m"))
    compact_dataset(store, "card", SPEC, {"p000"})
    card = store.read_text(f"{DATASET}/README.md")
    assert card is not None
    assert "hunter2" not in card and "s3://***@bucket/seeds" in card
