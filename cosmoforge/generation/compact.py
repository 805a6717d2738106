"""Compaction: generation shards -> the run's dataset, exactly one row per prompt id.

Workers may write the same prompt twice (a redelivery after a lost ack, a worker killed after
its shard landed); compaction is where at-least-once delivery becomes exactly-once data. It is
deterministic: the earliest completion of each prompt wins and rows are ordered by prompt id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cosmoforge.spec import records
from cosmoforge.storage import DATASET, FAILURES, GENERATIONS, RunStore

ROWS_PER_FILE = 100_000
# Beside the dataset, not in it: `load_dataset("parquet", data_dir=...)` must see documents only.
FAILED_TABLE = "failed.parquet"


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
    result = compact(store, keep=set(keep))
    models = dataset_models(store)
    store.write_text(f"{DATASET}/README.md", dataset_card(run_name, spec_yaml, result, models))
    return replace(result, models=models)


def dataset_models(store: RunStore) -> list[str]:
    """The models whose completions are in the compacted dataset, sorted."""
    table = read_dataset(store, columns=["model"])
    return sorted(set(table.column("model").to_pylist())) if table is not None else []


def compact(store: RunStore, keep: set[str] | None = None) -> Compacted:
    """Rewrite `dataset/` from the shards; `keep` limits it to the prompts of the current spec."""
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

    store.remove(DATASET)
    store.remove(FAILED_TABLE)
    count = max(1, -(-unique.num_rows // ROWS_PER_FILE))
    files = []
    for index in range(count):
        name = f"{DATASET}/data-{index:05d}-of-{count:05d}.parquet"
        store.write_table(name, unique.slice(index * ROWS_PER_FILE, ROWS_PER_FILE))
        files.append(store.url(name))
    if failures.num_rows:
        store.write_table(FAILED_TABLE, failures)
    tokens = int(pc.sum(unique.column("completion_tokens")).as_py() or 0)
    return Compacted(
        rows=unique.num_rows,
        failures=failures.num_rows,
        duplicates_dropped=generations.num_rows - unique.num_rows,
        files=files,
        tokens=tokens,
    )


def read_dataset(store: RunStore, columns: list[str] | None = None) -> pa.Table | None:
    """The compacted documents (without the failure table that sits beside them)."""
    tables = []
    for path in store.list_parquet(DATASET):
        if path.rsplit("/", 1)[-1].startswith("data-"):
            with store.fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle, columns=columns))
    return pa.concat_tables(tables) if tables else None


def dataset_card(run_name: str, spec_yaml: str, result: Compacted, models: list[str]) -> str:
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
- models: {", ".join(models) or "none"}

Load it with `datasets.load_dataset("parquet", data_files="<this folder>/data-*.parquet")`.

## Columns

Every row is one prompt's completion and carries its lineage:

{columns}

## Spec

```yaml
{spec_yaml.rstrip()}
```
"""
