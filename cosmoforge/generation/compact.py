"""Compaction: generation shards -> the run's dataset, exactly one row per prompt id.

Workers may write the same prompt twice (a redelivery after a lost ack, a worker killed after
its shard landed); compaction is where at-least-once delivery becomes exactly-once data. It is
deterministic: the earliest completion of each prompt wins and rows are ordered by prompt id.

Compacting again (a resumed run, a changed spec) replaces `dataset/` without ever leaving a
reader with nothing or with half a dataset: the new one is written whole in a folder beside it,
then the two are swapped, and only then is the old one deleted. A crash while writing leaves the
old dataset as it was; a crash during the swap is repaired by the next compaction, and readers
fall back to the old folder meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cosmoforge.redaction import redact_urls
from cosmoforge.spec import records
from cosmoforge.storage import DATASET, FAILURES, GENERATIONS, RunStore

ROWS_PER_FILE = 100_000
# Beside the dataset, not in it: `load_dataset("parquet", data_dir=...)` must see documents only.
FAILED_TABLE = "failed.parquet"
# Beside `dataset/` while a compaction writes (STAGING) and swaps (PREVIOUS); the dot keeps them
# out of globs over the run folder.
STAGING = f".{DATASET}.new"
PREVIOUS = f".{DATASET}.old"


@dataclass(frozen=True)
class Compacted:
    rows: int
    failures: int
    duplicates_dropped: int
    files: list[str]
    tokens: int
    models: list[str] = field(default_factory=list)


def first_per_id(table: pa.Table, order_by: str) -> pa.Table:
    """One row per prompt_id: the one with the smallest `order_by`, sorted by prompt_id."""
    if table.num_rows == 0:
        return table
    ordered = table.sort_by([("prompt_id", "ascending"), (order_by, "ascending")])
    ids = ordered.column("prompt_id").to_numpy(zero_copy_only=False)
    keep = np.ones(len(ids), dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    return ordered.filter(pa.array(keep))


def compact_dataset(store: RunStore, run_name: str, spec_yaml: str, keep: Iterable[str]) -> Compacted:
    """The dataset a run ends with: compacted shards of the prompts in `keep`, and its card.

    Every driver finishes a run through this one function, so the dataset folder, the failure
    table and the card (with the models that wrote the documents) look the same whoever ran it.
    """
    return compact(store, keep=set(keep), card=lambda result: dataset_card(run_name, spec_yaml, result))


def dataset_models(store: RunStore) -> list[str]:
    """The models whose completions are in the compacted dataset, sorted."""
    table = read_dataset(store, columns=["model"])
    return sorted(set(table.column("model").to_pylist())) if table is not None else []


def compact(
    store: RunStore, keep: set[str] | None = None, card: Callable[[Compacted], str] | None = None
) -> Compacted:
    """Replace `dataset/` with one compacted from the shards (`card(result)` as its README);
    `keep` limits it to the prompts of the current spec. The old dataset stays readable until
    the new one is complete."""
    recover(store)
    generations = store.read_folder(GENERATIONS)
    generations = generations if generations is not None else records.GENERATIONS.empty_table()
    generations = generations.cast(records.GENERATIONS)
    if keep is not None:
        generations = generations.filter(
            pc.is_in(generations.column("prompt_id"), value_set=pa.array(list(keep), type=pa.string()))
        )
    unique = first_per_id(generations, "finished_at")

    failures = store.read_folder(FAILURES)
    failures = failures if failures is not None else records.FAILURES.empty_table()
    failures = failures.cast(records.FAILURES)
    if keep is not None:
        failures = failures.filter(
            pc.is_in(failures.column("prompt_id"), value_set=pa.array(list(keep), type=pa.string()))
        )
    failures = first_per_id(failures, "failed_at")
    # A prompt that failed once and succeeded on a later run is not a failure.
    failures = failures.filter(
        pc.invert(pc.is_in(failures.column("prompt_id"), value_set=unique.column("prompt_id")))
    )

    count = max(1, -(-unique.num_rows // ROWS_PER_FILE))
    names = [f"data-{index:05d}-of-{count:05d}.parquet" for index in range(count)]
    result = Compacted(
        rows=unique.num_rows,
        failures=failures.num_rows,
        duplicates_dropped=generations.num_rows - unique.num_rows,
        files=[store.url(DATASET, name) for name in names],
        tokens=int(pc.sum(unique.column("completion_tokens")).as_py() or 0),
        models=sorted({model for model in unique.column("model").to_pylist() if model}),
    )
    store.remove(STAGING)  # a crashed compaction's leftovers
    for index, name in enumerate(names):
        store.write_table(f"{STAGING}/{name}", unique.slice(index * ROWS_PER_FILE, ROWS_PER_FILE))
    if card is not None:
        store.write_text(f"{STAGING}/README.md", card(result))
    swap_in(store, STAGING, DATASET, PREVIOUS)
    if failures.num_rows:
        store.write_table(FAILED_TABLE, failures)  # one file: replaced whole (RunStore.open_atomic)
    else:
        store.remove(FAILED_TABLE)
    return result


def swap_in(store: RunStore, staged: str, target: str, previous: str) -> None:
    """Make the complete folder `staged` the `target`: the old target moves aside first (readers
    fall back to it, see `read_dataset`) and is deleted once the new one is in place."""
    store.remove(previous)
    if store.fs.exists(store.path(target)):
        store.fs.mv(store.path(target), store.path(previous), recursive=True)
    store.fs.mv(store.path(staged), store.path(target), recursive=True)
    store.remove(previous)


def recover(store: RunStore) -> None:
    """After a crash between the two moves of `swap_in`: put the old dataset back."""
    if not store.fs.exists(store.path(DATASET)) and store.fs.exists(store.path(PREVIOUS)):
        store.fs.mv(store.path(PREVIOUS), store.path(DATASET), recursive=True)


def read_dataset(store: RunStore, columns: list[str] | None = None) -> pa.Table | None:
    """The compacted documents (without the failure table that sits beside them); during a
    swap, the previous dataset."""
    tables = []
    paths = store.list_parquet(DATASET) or store.list_parquet(PREVIOUS)
    for path in paths:
        if path.rsplit("/", 1)[-1].startswith("data-"):
            with store.fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle, columns=columns))
    return pa.concat_tables(tables) if tables else None


def dataset_card(run_name: str, spec_yaml: str, result: Compacted) -> str:
    """The dataset's README: counts, models, columns, and the spec (credentials in URIs masked)."""
    spec_yaml = redact_urls(spec_yaml)
    columns = "\n".join(f"- `{field.name}` ({field.type})" for field in records.GENERATIONS)
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data-*.parquet
tags:
- synthetic
- cosmoforge
---
# {run_name}

Synthetic documents generated by cosmoforge from the spec below.

- documents: {result.rows}
- generated tokens: {result.tokens}
- failed prompts: {result.failures} (listed with their reasons in `../{FAILED_TABLE}`)
- models: {", ".join(result.models) or "none"}

Load it with `datasets.load_dataset("parquet", data_files="<this folder>/data-*.parquet")`.

## Columns

Every row is one prompt's completion and carries its lineage:

{columns}

## Spec

```yaml
{spec_yaml.rstrip()}
```
"""
