"""The dataset as the Hub shows it: one config per seed source, parquet files of bounded size.

A run's final documents (one folder or one kept file, sorted by prompt id) are split by
`seed_source` into `data/<source>/train-NNNNN-of-NNNNN.parquet` in a local folder. The split is
deterministic (same documents, same bytes), which is what lets a rerun of a push compare its
files with the repo's and upload only those that differ. Memory is bounded by one buffered row
group per source, however large the dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cosmoforge import tables
from cosmoforge.report.data import Counters

DATA = "data"
SPLIT = "train"
SOURCE_COLUMN = "seed_source"
UNKNOWN_SOURCE = "unknown"  # the config of rows without a seed source (none in a cosmoforge run)
ROWS_PER_FILE = 100_000
ROW_GROUP_BYTES = 64 << 20  # a source's buffered rows are written as one row group at this size


class NothingToPublish(ValueError):
    """The run has no documents to publish."""


@dataclass
class ConfigData:
    """One config of the published dataset: its files (repo paths) and the counts of its rows."""

    name: str
    files: list[str] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)


@dataclass(frozen=True)
class StagedData:
    folder: Path  # the local folder that mirrors the repo's `data/`
    schema: pa.Schema
    configs: dict[str, ConfigData]  # by name, sorted


def data_path(config: str, index: int, count: int) -> str:
    """A data file's path in the repo (the layout `datasets` reads a config's split from)."""
    return f"{DATA}/{config}/{SPLIT}-{index:05d}-of-{count:05d}.parquet"


def config_glob(config: str) -> str:
    return f"{DATA}/{config}/{SPLIT}-*"


class _ConfigWriter:
    """Writes one config's rows into numbered files of `rows_per_file` rows; the names get their
    "-of-N" once the last file is closed, when N is known."""

    def __init__(self, folder: Path, config: ConfigData, schema: pa.Schema, rows_per_file: int):
        self.folder, self.config, self.schema, self.rows_per_file = folder, config, schema, rows_per_file
        self.buffer: list[pa.Table] = []
        self.buffered_bytes = 0
        self.rows_in_file = 0
        self.writer: pq.ParquetWriter | None = None
        self.partials: list[Path] = []

    def add(self, table: pa.Table) -> None:
        self.config.counters.add(table, sample_size=0)
        while table.num_rows:
            take = min(table.num_rows, self.rows_per_file - self.rows_in_file)
            part, table = table.slice(0, take), table.slice(take)
            self.buffer.append(part)
            self.buffered_bytes += part.nbytes
            self.rows_in_file += take
            if self.rows_in_file == self.rows_per_file:
                self._close_file()
            elif self.buffered_bytes >= ROW_GROUP_BYTES:
                self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        if self.writer is None:
            partial = self.folder / self.config.name / f".{len(self.partials):05d}.partial"
            partial.parent.mkdir(parents=True, exist_ok=True)
            self.partials.append(partial)
            self.writer = pq.ParquetWriter(partial, self.schema, compression="zstd")
        table = pa.concat_tables(self.buffer)
        self.writer.write_table(table, row_group_size=max(1, table.num_rows))
        self.buffer, self.buffered_bytes = [], 0

    def _close_file(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.rows_in_file = 0

    def finish(self) -> None:
        self._close_file()
        count = len(self.partials)
        for index, partial in enumerate(self.partials):
            name = data_path(self.config.name, index, count)
            os.replace(partial, self.folder.parent / name)
            self.config.files.append(name)


def _by_source(table: pa.Table) -> list[tuple[str, pa.Table]]:
    if SOURCE_COLUMN not in table.column_names:
        return [(UNKNOWN_SOURCE, table)]
    sources = table.column(SOURCE_COLUMN).fill_null(UNKNOWN_SOURCE)
    return [
        (str(name), table.filter(pc.equal(sources, name))) for name in sorted(pc.unique(sources).to_pylist())
    ]


def stage_data(uri: str, folder: Path, rows_per_file: int = ROWS_PER_FILE) -> StagedData:
    """Split the documents at `uri` (a file or folder, any fsspec URI) into the repo's data files
    under `folder/data/`, in input order within each config; `tables.TableError` if unreadable."""
    if rows_per_file < 1:
        raise ValueError("rows per file must be at least 1")
    schema, batches = tables.scan(uri)
    data = folder / DATA
    data.mkdir(parents=True, exist_ok=True)
    writers: dict[str, _ConfigWriter] = {}
    for batch in batches:
        for name, part in _by_source(pa.Table.from_batches([batch], schema=schema)):
            if name not in writers:
                writers[name] = _ConfigWriter(data, ConfigData(name), schema, rows_per_file)
            writers[name].add(part)
    if not writers:
        raise NothingToPublish(f"{uri} holds no documents")
    for writer in writers.values():
        writer.finish()
    return StagedData(data, schema, {name: writers[name].config for name in sorted(writers)})
