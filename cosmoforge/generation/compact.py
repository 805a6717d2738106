"""Compaction: generation shards -> the run's dataset, exactly one row per prompt id.

Workers may write the same prompt twice (a redelivery after a lost ack, a worker killed after
its shard landed); compaction is where at-least-once delivery becomes exactly-once data. It is
deterministic: the earliest completion of each prompt wins and rows are ordered by prompt id.

Memory stays flat whatever the run's size: prompt ids are hash prefixes, so ranges of ids split
the rows into buckets of a fraction of `ROWS_PER_FILE` rows. A first pass reads the shards a
batch at a time and appends each batch's rows to their bucket's part files in a staging folder;
a second keeps the first completion of each prompt bucket by bucket. Buckets are id ranges in order, so
the buckets written one after the other are the whole dataset sorted by prompt id, cut into the
same files as one sorted table would be. The ids to keep (the run's prompt manifest) are
bucketed the same way, so they are never all in memory either.

Compacting again (a resumed run, a changed spec) replaces `dataset/` without ever leaving a
reader with nothing or with half a dataset: the new one is written whole in a folder beside it,
then the two are swapped, and only then is the old one deleted. A crash while writing leaves the
old dataset as it was; a crash during the swap is repaired by the next compaction, and readers
fall back to the old folder meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cosmoforge.redaction import redact_urls
from cosmoforge.spec import records
from cosmoforge.storage import DATASET, FAILURES, GENERATIONS, PROMPTS, RunStore

ROWS_PER_FILE = 100_000
# Beside the dataset, not in it: `load_dataset("parquet", data_dir=...)` must see documents only.
FAILED_TABLE = "failed.parquet"
# Beside `dataset/` while a compaction writes (STAGING) and swaps (PREVIOUS); the dot keeps them
# out of globs over the run folder.
STAGING = f".{DATASET}.new"
PREVIOUS = f".{DATASET}.old"
# The bucketed rows of the first pass; not inside STAGING, whose contents become the dataset.
BUCKETS = f".{DATASET}.buckets"
STAGED_FAILURES = f"{BUCKETS}/{FAILED_TABLE}"
# Rows routed to buckets are held up to this size before they are written out as part files:
# larger means fewer, bigger parts; the first pass never holds more than this and one batch.
BUFFER_BYTES = 64 * 2**20
# A dataset file is held whole while it is written, beside the bucket being deduplicated: buckets
# a fraction of a file keep that second part small, and about the same whatever the run's size
# (the footers count duplicates and unkept rows, so buckets are a little smaller than this).
BUCKETS_PER_FILE = 8
BATCH_ROWS = 8_192
ID_CHUNK = 65_536
# Without these a shard cannot be compacted; any other column missing from it is left empty.
REQUIRED_GENERATION_COLUMNS = ("prompt_id", "text", "finished_at")
REQUIRED_FAILURE_COLUMNS = ("prompt_id", "failed_at")
ID_SCHEMA = pa.schema([pa.field("prompt_id", pa.string())])
# Bucket bounds are ids of this many hex digits: 16**8 ranges, far more than any run's buckets.
BOUND_DIGITS = 8

# The prompt ids to keep: ids one by one, or chunks of them (Arrow arrays, lists, numpy arrays);
# an Arrow array of ids is one chunk.
KeepIds: TypeAlias = Iterable[Any]


class CompactError(ValueError):
    """A shard (or manifest file) compaction cannot use; the message names the file and why."""


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
    # Sorting indices over two columns and taking the winners once copies the rows once, not twice.
    order = pc.sort_indices(
        table.select(["prompt_id", order_by]),
        sort_keys=[("prompt_id", "ascending"), (order_by, "ascending")],
    )
    ids = table.column("prompt_id").take(order).to_numpy(zero_copy_only=False)
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    return table.take(order.filter(pa.array(first)))


def bucket_bounds(buckets: int) -> np.ndarray:
    """The ids where buckets 1..buckets-1 start: even steps over the hex id space."""
    space = 16**BOUND_DIGITS
    return np.array(
        [f"{index * space // buckets:0{BOUND_DIGITS}x}" for index in range(1, buckets)], dtype=str
    )


def bucket_of(ids: pa.Array | pa.ChunkedArray, bounds: np.ndarray) -> np.ndarray:
    """Each id's bucket. Comparing strings keeps the order of any ids (not only hex ones): a
    larger id never lands in an earlier bucket, so buckets in order stay sorted by id."""
    values = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=str)
    return np.searchsorted(bounds, values, side="right")


def compact_dataset(
    store: RunStore, run_name: str, spec_yaml: str, keep: KeepIds | None, rows_per_file: int | None = None
) -> Compacted:
    """The dataset a run ends with: compacted shards of the prompts in `keep`, and its card.

    Every driver finishes a run through this one function, so the dataset folder, the failure
    table and the card (with the models that wrote the documents) look the same whoever ran it.
    """
    return compact(
        store,
        keep=keep,
        card=lambda result: dataset_card(run_name, spec_yaml, result),
        rows_per_file=rows_per_file,
    )


def compact_run(
    store: RunStore, run_name: str, spec_yaml: str, rows_per_file: int | None = None
) -> Compacted:
    """Compact a run from storage alone: the prompts of its manifest (`prompts/`) when it has one,
    read a chunk at a time, else every shard."""
    keep = manifest_ids(store) if store.list_parquet(PROMPTS) else None
    return compact_dataset(store, run_name, spec_yaml, keep, rows_per_file)


def manifest_ids(store: RunStore) -> Iterator[pa.Array]:
    """The prompt ids of the run's manifest, in chunks."""
    for path in store.list_parquet(PROMPTS):
        for batch in _batches(store, path, ID_SCHEMA, ID_CHUNK):
            yield batch.column(0)


def dataset_models(store: RunStore) -> list[str]:
    """The models whose completions are in the compacted dataset, sorted."""
    table = read_dataset(store, columns=["model"])
    return sorted(set(table.column("model").to_pylist())) if table is not None else []


def compact(
    store: RunStore,
    keep: KeepIds | None = None,
    card: Callable[[Compacted], str] | None = None,
    rows_per_file: int | None = None,
) -> Compacted:
    """Replace `dataset/` with one compacted from the shards (`card(result)` as its README);
    `keep` limits it to the prompts of the current spec. The old dataset stays readable until
    the new one is complete. A shard that cannot be read raises CompactError naming it."""
    rows_per_file = rows_per_file or ROWS_PER_FILE
    recover(store)
    generations = _survey(store, GENERATIONS, REQUIRED_GENERATION_COLUMNS)
    failures = _survey(store, FAILURES, REQUIRED_FAILURE_COLUMNS)
    bucket_rows = max(1, rows_per_file // BUCKETS_PER_FILE)
    buckets = max(1, -(-max(generations.rows, failures.rows) // bucket_rows))
    store.remove(STAGING)  # a crashed compaction's leftovers
    store.remove(BUCKETS)
    try:
        parts = _partition(store, bucket_bounds(buckets), generations, failures, keep)
        unique, failed = _stage_failures(store, parts)
        result = _stage_dataset(store, parts, unique, failed, rows_per_file)
        if card is not None:
            store.write_text(f"{STAGING}/README.md", card(result))
        swap_in(store, STAGING, DATASET, PREVIOUS)
        if failed:  # staged whole (RunStore.open_atomic); one move publishes it
            store.fs.mv(store.path(STAGED_FAILURES), store.path(FAILED_TABLE))
        else:
            store.remove(FAILED_TABLE)
    finally:
        store.remove(BUCKETS)
    return result


@dataclass(frozen=True)
class _Shards:
    paths: list[str]
    rows: int


def _survey(store: RunStore, folder: str, required: Sequence[str]) -> _Shards:
    """The shards of a folder and their row count, from the footers alone: enough to size the
    buckets, and to refuse a truncated shard or one without the needed columns before any work."""
    paths = store.list_parquet(folder)
    rows = 0
    for path in paths:
        with _reading(store, path), store.fs.open(path, "rb") as handle:
            metadata = pq.read_metadata(handle)
        missing = [name for name in required if name not in metadata.schema.to_arrow_schema().names]
        if missing:
            raise CompactError(f"{_url(store, path)}: missing required column(s) {', '.join(missing)}")
        rows += metadata.num_rows
    return _Shards(paths, rows)


@contextlib.contextmanager
def _reading(store: RunStore, path: str) -> Iterator[None]:
    try:
        yield
    except (pa.ArrowException, OSError) as error:  # pyarrow raises OSError for corrupt pages
        raise CompactError(f"{_url(store, path)}: not a readable parquet file ({error})") from error


def _url(store: RunStore, path: str) -> str:
    return store.uri + path[len(store.root) :] if path.startswith(store.root) else path


def _batches(store: RunStore, path: str, schema: pa.Schema, rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """A parquet file a batch at a time, in `schema` (older shards may lack optional columns)."""
    with _reading(store, path), store.fs.open(path, "rb") as handle:
        file = pq.ParquetFile(handle)
        present = [name for name in schema.names if name in file.schema_arrow.names]
        if "prompt_id" not in present:  # the manifest; shards were checked by `_survey`
            raise CompactError(f"{_url(store, path)}: missing required column(s) prompt_id")
        for batch in file.iter_batches(batch_size=rows, columns=present):
            yield _conform(pa.Table.from_batches([batch]), schema, _url(store, path))


def _conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """`table` in `schema`, with the columns it lacks left empty."""
    columns = []
    for column in schema:
        if column.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, column.type))
            continue
        try:
            columns.append(table.column(column.name).cast(column.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise CompactError(f"{where}: column {column.name} is not {column.type} ({error})") from error
    return pa.Table.from_arrays(columns, schema=schema)


def id_chunks(keep: KeepIds) -> Iterator[pa.Array]:
    """`keep` as string arrays of at most about ID_CHUNK ids, whatever shape it came in."""
    if isinstance(keep, pa.Array | pa.ChunkedArray):
        keep = [keep]
    pending: list[str] = []
    for item in keep:
        if isinstance(item, str):
            pending.append(item)
            if len(pending) >= ID_CHUNK:
                yield pa.array(pending, type=pa.string())
                pending = []
        elif isinstance(item, pa.ChunkedArray):
            yield item.combine_chunks().cast(pa.string())
        elif isinstance(item, pa.Array):
            yield item.cast(pa.string())
        else:
            yield pa.array(list(item), type=pa.string())
    if pending:
        yield pa.array(pending, type=pa.string())


@dataclass
class _Parts:
    """Rows routed to their bucket, written out as part files whenever the buffer is full."""

    store: RunStore
    folder: str
    bounds: np.ndarray
    schema: pa.Schema
    buffered: dict[int, list[pa.Table]] = field(default_factory=dict)
    size: int = 0
    flushes: int = 0
    paths: dict[int, list[str]] = field(default_factory=dict)

    def add(self, table: pa.Table) -> None:
        buckets = bucket_of(table.column("prompt_id"), self.bounds)
        counts = np.bincount(buckets, minlength=len(self.bounds) + 1)
        # A stable sort: within a bucket rows keep their shard order, which breaks ties in
        # `first_per_id` the way one table of all the shards in order would.
        grouped = table.take(pa.array(np.argsort(buckets, kind="stable")))
        start = 0
        for bucket in np.flatnonzero(counts):
            self.buffered.setdefault(int(bucket), []).append(grouped.slice(start, int(counts[bucket])))
            start += int(counts[bucket])
        self.size += table.nbytes
        if self.size >= BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        for bucket, pieces in sorted(self.buffered.items()):
            relative = f"{self.folder}/b-{bucket:05d}/part-{self.flushes:06d}.parquet"
            _write_part(self.store, relative, pa.concat_tables(pieces))
            self.paths.setdefault(bucket, []).append(relative)
        self.buffered.clear()
        self.size = 0
        self.flushes += 1

    def read(self, bucket: int, columns: list[str] | None = None) -> pa.Table:
        tables = [_read_part(self.store, relative, columns) for relative in self.paths.get(bucket, [])]
        if tables:
            return pa.concat_tables(tables)
        empty = self.schema.empty_table()
        return empty.select(columns) if columns is not None else empty


def _write_part(store: RunStore, relative: str, table: pa.Table) -> None:
    # Parts are scratch: no rename or fsync (a crash restarts compaction), and lz4 for speed.
    path = store.path(relative)
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with store.fs.open(path, "wb") as handle:
        pq.write_table(table, handle, compression="lz4")


def _read_part(store: RunStore, relative: str, columns: list[str] | None) -> pa.Table:
    with store.fs.open(store.path(relative), "rb") as handle:
        return pq.read_table(handle, columns=columns)


@dataclass
class _Partitioned:
    bounds: np.ndarray
    generations: _Parts
    failures: _Parts
    keep: _Parts | None


def _partition(
    store: RunStore, bounds: np.ndarray, generations: _Shards, failures: _Shards, keep: KeepIds | None
) -> _Partitioned:
    """Pass 1: every row (and id to keep) into its bucket's part files, a batch at a time."""
    parts = _Partitioned(
        bounds,
        _Parts(store, f"{BUCKETS}/{GENERATIONS}", bounds, records.GENERATIONS),
        _Parts(store, f"{BUCKETS}/{FAILURES}", bounds, records.FAILURES),
        None if keep is None else _Parts(store, f"{BUCKETS}/keep", bounds, ID_SCHEMA),
    )
    if keep is not None and parts.keep is not None:
        for ids in id_chunks(keep):
            parts.keep.add(pa.Table.from_arrays([ids], schema=ID_SCHEMA))
        parts.keep.flush()
    for shards, target in ((generations, parts.generations), (failures, parts.failures)):
        for path in shards.paths:
            for table in _batches(store, path, target.schema):
                target.add(table)
        target.flush()
    return parts


def _kept(parts: _Partitioned, bucket: int, table: pa.Table) -> pa.Table:
    if parts.keep is None:
        return table
    wanted = parts.keep.read(bucket).column("prompt_id").combine_chunks()
    return table.filter(pc.is_in(table.column("prompt_id"), value_set=wanted))


def _stage_failures(store: RunStore, parts: _Partitioned) -> tuple[list[int], int]:
    """Pass 2, ids only: each bucket's number of distinct documents (which names the files), and
    its failures streamed into one staged table; returns both counts."""
    unique: list[int] = []
    failed = 0
    with contextlib.ExitStack() as stack:
        writer = None
        for bucket in range(len(parts.bounds) + 1):
            generated = pc.unique(
                _kept(parts, bucket, parts.generations.read(bucket, ["prompt_id"]))
                .column("prompt_id")
                .combine_chunks()
            )
            unique.append(len(generated))
            failures = _failures_of(parts, bucket, generated)
            if not failures.num_rows:
                continue
            if writer is None:
                handle = stack.enter_context(store.open_atomic(STAGED_FAILURES))
                writer = stack.enter_context(pq.ParquetWriter(handle, records.FAILURES, compression="zstd"))
            writer.write_table(failures)
            failed += failures.num_rows
    return unique, failed


def _failures_of(parts: _Partitioned, bucket: int, generated: pa.Array) -> pa.Table:
    failures = first_per_id(_kept(parts, bucket, parts.failures.read(bucket)), "failed_at")
    # A prompt that failed once and succeeded on a later run is not a failure.
    return failures.filter(pc.invert(pc.is_in(failures.column("prompt_id"), value_set=generated)))


@dataclass
class _Files:
    """Sorted rows cut into files of `rows_per_file` rows, as slicing one sorted table would."""

    store: RunStore
    names: list[str]
    rows_per_file: int
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    written: int = 0

    def add(self, table: pa.Table) -> None:
        rest = None
        while table.num_rows:
            take = min(self.rows_per_file - self.pending_rows, table.num_rows)
            rest = table.slice(0, take)
            self.pending.append(rest)
            self.pending_rows += take
            table = table.slice(take)
            if self.pending_rows == self.rows_per_file:
                self._write()
                rest = None
        if rest is not None:
            # The rows left for the next file are copied, so the rest of this bucket can be freed.
            self.pending[-1] = rest.take(pa.array(np.arange(rest.num_rows)))

    def close(self) -> None:
        if self.pending_rows or self.written < len(self.names):  # an empty dataset is one empty file
            self._write()

    def _write(self) -> None:
        table = pa.concat_tables(self.pending) if self.pending else records.GENERATIONS.empty_table()
        self.store.write_table(f"{STAGING}/{self.names[self.written]}", table)
        self.written += 1
        self.pending, self.pending_rows = [], 0


def _stage_dataset(
    store: RunStore, parts: _Partitioned, unique: list[int], failed: int, rows_per_file: int
) -> Compacted:
    """Pass 2, rows: each bucket's first completion per prompt, into the staged dataset files."""
    count = max(1, -(-sum(unique) // rows_per_file))
    names = [f"data-{index:05d}-of-{count:05d}.parquet" for index in range(count)]
    files = _Files(store, names, rows_per_file)
    kept = tokens = 0
    models: set[str] = set()
    for bucket, expected in enumerate(unique):
        generations = _kept(parts, bucket, parts.generations.read(bucket))
        documents = first_per_id(generations, "finished_at")
        if documents.num_rows != expected:
            raise RuntimeError(f"bucket {bucket}: {documents.num_rows} documents, counted {expected}")
        kept += generations.num_rows
        tokens += int(pc.sum(documents.column("completion_tokens")).as_py() or 0)
        models.update(model for model in pc.unique(documents.column("model")).to_pylist() if model)
        del generations
        files.add(documents)
        del documents
        # Arrow's allocator keeps freed blocks for reuse; handing them back keeps the process's
        # memory at what the next bucket needs rather than at the high-water mark of any bucket.
        pa.default_memory_pool().release_unused()
    files.close()
    return Compacted(
        rows=sum(unique),
        failures=failed,
        duplicates_dropped=kept - sum(unique),
        files=[store.url(DATASET, name) for name in names],
        tokens=tokens,
        models=sorted(models),
    )


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
