"""The run's storage layout under `output.uri/<run-name>/`, reached through fsspec.

Object storage is the source of truth for progress: a prompt counts as done when a durable
shard under `generations/` holds its completion, so any process can resume a run from storage
alone. Shards are written whole (one PUT on object stores, write-then-rename on local disks),
so a reader never sees half a shard.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

PROMPTS = "prompts"
GENERATIONS = "generations"
FAILURES = "failures"
DATASET = "dataset"  # the compacted dataset: what the first post-generation stage reads
KEPT = "kept.parquet"  # what each data stage keeps, in its output folder; the next stage reads it


@dataclass(frozen=True)
class RunStore:
    """Paths and parquet I/O for one run; `root` is `<output.uri>/<run-name>`."""

    fs: fsspec.AbstractFileSystem
    root: str
    uri: str

    @classmethod
    def open(cls, output_uri: str, run_name: str) -> RunStore:
        if "://" not in output_uri:
            output_uri = os.path.abspath(output_uri)
        fs, base = url_to_fs(output_uri)
        root = f"{base.rstrip('/')}/{run_name}"
        uri = output_uri.rstrip("/") + "/" + run_name
        return cls(fs, root, uri)

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def url(self, *parts: str) -> str:
        return "/".join((self.uri, *parts))

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode("utf-8"))

    def read_text(self, relative: str) -> str | None:
        # Asked of the store itself, not of a cached listing, and in one request: another process
        # may have written or removed the file since this one last looked.
        try:
            return self.fs.cat_file(self.path(relative)).decode("utf-8")
        except FileNotFoundError:
            return None

    def write_bytes(self, relative: str, data: bytes) -> None:
        with self.open_atomic(relative) as handle:
            handle.write(data)

    @contextlib.contextmanager
    def open_atomic(self, relative: str) -> Iterator[BinaryIO]:
        """A file written through the handle appears whole or not at all: write-then-rename
        with fsync on local disks, one upload on object stores (which publish on close)."""
        path = self.path(relative)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not _is_local(self.fs):
            with self.fs.open(path, "wb") as remote:
                yield remote
            return
        temporary = f"{parent}/.{uuid.uuid4().hex}.tmp"
        try:
            with open(temporary, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)

    def write_table(self, relative: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(relative, buffer.getvalue())

    def write_tables(self, relative: str, schema: pa.Schema, tables: Iterable[pa.Table]) -> int:
        """One parquet file from a stream of tables (one row group each); returns the row count."""
        buffer = io.BytesIO()
        rows = 0
        with pq.ParquetWriter(buffer, schema, compression="zstd") as writer:
            for table in tables:
                writer.write_table(table)
                rows += table.num_rows
        self.write_bytes(relative, buffer.getvalue())
        return rows

    def list_parquet(self, folder: str) -> list[str]:
        path = self.path(folder)
        self.fs.invalidate_cache(path)
        if not self.fs.exists(path):
            return []
        return sorted(p for p in self.fs.find(path) if p.endswith(".parquet"))

    def read_tables(self, folder: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for path in self.list_parquet(folder):
            with self.fs.open(path, "rb") as handle:
                yield pq.read_table(handle, columns=columns)

    def read_folder(self, folder: str, columns: list[str] | None = None) -> pa.Table | None:
        tables = list(self.read_tables(folder, columns))
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def ids_in(self, folder: str) -> set[str]:
        """Prompt ids already recorded under a folder (generations or failures)."""
        done: set[str] = set()
        for table in self.read_tables(folder, columns=["prompt_id"]):
            done.update(table.column("prompt_id").to_pylist())
        return done

    def remove(self, folder: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # absent, or another process removed it first
            self.fs.rm(self.path(folder), recursive=True)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
