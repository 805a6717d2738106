"""The one reader for the tables users hand cosmoforge: seed data, benchmark files, documents.

Seeds, benchmarks and the documents that dedup and decontamination process used to be read by
three copies of this code, which drifted (one read csv, one compressed JSON, one named the line
of a bad byte). Here it is written once:

- formats: parquet; JSON lines (`.jsonl`, `.ndjson`, `.json`; a `.json` file may instead hold
  one JSON array of objects); csv with a header row; Arrow IPC (`.arrow`, stream or file). The
  format comes from the name unless the caller names it; JSON, csv and Arrow files may be
  compressed (`.gz`, `.zst`, `.bz2`, `.xz`);
- where: a local path or any fsspec URI; a file, a folder of such files (read in sorted order,
  hidden files skipped) or a `datasets.save_to_disk` folder;
- problems: `TableError`, one line naming the file and, where there is one, the line or row,
  so that every command can print it as it is.

`iter_rows` streams rows (a seed source of any size), `scan` streams record batches with the
schema of the whole input, `read_table` reads a whole table, and
`list_files` with `read_rows` let a caller cut an input into row ranges and read one range.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import orjson
import pyarrow as pa

FORMATS = ("parquet", "jsonl", "csv", "arrow")
SAVED_DATASET = "dataset"  # the format of a `datasets.save_to_disk` folder
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
_EXTENSIONS = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".arrow": "arrow",
}
_ALIASES = {"json": "jsonl", "ndjson": "jsonl", "ipc": "arrow"}
# What a folder listing picks up (a compressed file of another kind is refused by name later).
SUFFIXES = (*_EXTENSIONS, *COMPRESSIONS)
_KINDS = ".parquet, .jsonl, .json, .csv or .arrow"
BATCH_ROWS = 4096


class TableError(ValueError):
    """A table that cannot be read or used as given; the message is one line for the user."""


@dataclass(frozen=True)
class TableFile:
    """One file of an input (or the whole of a `save_to_disk` folder), as `list_files` finds it."""

    uri: str  # for messages and for reading it alone: the input's URI, or this file's
    path: str  # inside the filesystem
    format: str  # one of FORMATS, or SAVED_DATASET


def detect_format(uri: str, format: str = "auto") -> str:
    """One of FORMATS: `format` when given (aliases json, ndjson, ipc), else from the name."""
    if format != "auto":
        named = _ALIASES.get(format, format)
        if named not in FORMATS:
            raise TableError(f"{uri}: unknown format {format!r}; use one of {', '.join(FORMATS)}")
        return named
    name = uri.lower()
    for compression in COMPRESSIONS:
        name = name.removesuffix(compression)
    for suffix, kind in _EXTENSIONS.items():
        if name.endswith(suffix):
            return kind
    raise TableError(f"{uri}: cannot tell the format from the name; use {_KINDS}")


def _filesystem(uri: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(uri)
    except (ValueError, ImportError) as error:
        raise TableError(f"{uri}: cannot open: {error}") from None


def exists(uri: str) -> bool:
    """Whether `uri` names something that exists; an unknown protocol or a bad URI does not."""
    try:
        fs, path = _filesystem(uri)
        return bool(fs.exists(path))
    except Exception:  # fsspec back ends raise many types for "cannot tell"
        return False


def list_files(uri: str, format: str = "auto") -> tuple[Any, list[TableFile]]:
    """(filesystem, the files of `uri` in reading order): the file itself, a folder's table
    files sorted by path, or a `save_to_disk` folder as one entry."""
    if format != "auto":
        detect_format(uri, format)  # a bad name fails before the input is looked at
    fs, path = _filesystem(uri)
    if not fs.exists(path):
        raise TableError(f"{uri}: no such file or folder")
    if not fs.isdir(path):
        return fs, [TableFile(uri, path, detect_format(path, format))]
    root = path.rstrip("/")
    if fs.exists(f"{root}/state.json") and fs.exists(f"{root}/dataset_info.json"):
        return fs, [TableFile(uri, path, SAVED_DATASET)]
    found = sorted(p for p in fs.find(path) if p.lower().endswith(SUFFIXES) and "/." not in p)
    if not found:
        raise TableError(f"{uri}: folder holds no {_KINDS} files")
    # Local paths stay paths in messages; other files keep their protocol, to be read alone.
    name = fs.unstrip_protocol if "://" in uri else str
    return fs, [TableFile(name(p), p, detect_format(p, format)) for p in found]


def read_table(uri: str, format: str = "auto") -> pa.Table:
    """A file, a folder of files or a `save_to_disk` folder, as one table (columns unified)."""
    fs, files = list_files(uri, format)
    with _reading(uri):
        tables = [_read_file(fs, file) for file in files]
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")


def iter_rows(uri: str, format: str = "auto") -> Iterator[dict[str, Any]]:
    """The rows of `uri` as dicts, in file order, streamed: never the whole input in memory
    (but for a JSON array or a csv file, which are read whole)."""
    fs, files = list_files(uri, format)
    with _reading(uri):
        for file in files:
            for batch in _batches(fs, file):
                yield from batch if isinstance(batch, list) else batch.to_pylist()


def scan(
    uri: str, format: str = "auto", rows: int = BATCH_ROWS
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """(schema, record batches of at most `rows` rows): the rows of `read_table(uri)`, in order and
    with its schema, without holding the input whole when it is parquet (one row group at a time).

    The schema is known before any row is read, so a caller can refuse an unusable input early.
    Other formats are read whole first."""
    fs, files = list_files(uri, format)
    if any(file.format != "parquet" for file in files):
        table = read_table(uri, format)
        return table.schema, iter(table.to_batches(rows))
    import pyarrow.parquet as pq

    with _reading(uri):
        schemas = []
        for file in files:
            with fs.open(file.path, "rb") as handle:
                schemas.append(pq.ParquetFile(handle).schema_arrow)
        schema = schemas[0] if len(schemas) == 1 else pa.unify_schemas(schemas, promote_options="permissive")

    def batches() -> Iterator[pa.RecordBatch]:
        with _reading(uri):
            for file in files:
                with fs.open(file.path, "rb") as handle:
                    for batch in pq.ParquetFile(handle).iter_batches(batch_size=rows):
                        yield _conform(batch, schema)

    return schema, batches()


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` with `schema`'s columns, in its order: missing ones null, others cast (as
    `pa.concat_tables(..., promote_options="permissive")` makes the files of a folder one table)."""
    if batch.schema.equals(schema):
        return batch
    names = batch.schema.names
    columns = [
        batch.column(field.name).cast(field.type)
        if field.name in names
        else pa.nulls(batch.num_rows, field.type)
        for field in schema
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def read_rows(file: TableFile, start: int, stop: int, fs: Any = None) -> pa.Table:
    """Rows [start, stop) of one file of `list_files`; of a parquet file only the row groups
    holding them are read."""
    fs = fs if fs is not None else _filesystem(file.uri)[0]
    with _reading(file.uri):
        if file.format != "parquet":
            return _read_file(fs, file).slice(start, stop - start)
        import pyarrow.parquet as pq

        with fs.open(file.path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            wanted, first = row_groups_covering(group_sizes(parquet), start, stop)
            if not wanted:
                return parquet.schema_arrow.empty_table()
            table = parquet.read_row_groups(wanted)
        return table.slice(start - first, stop - start)


# --- a rank's share of the rows ------------------------------------------------------------------
# Ranks cut the input by rows, not by files, so every rank is equally busy whatever the number and
# size of the files; dedup's and tokenization's ranks cut it the same way.


def row_share(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop), counted across the files in order, that `rank` of `world_size` takes."""
    return total * rank // world_size, total * (rank + 1) // world_size


def file_ranges(file_rows: Sequence[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(file index, first row, stop row) of every file that overlaps the rows [start, stop)."""
    ranges = []
    offset = 0
    for index, rows in enumerate(file_rows):
        first, last = max(start - offset, 0), min(stop - offset, rows)
        if first < last:
            ranges.append((index, first, last))
        offset += rows
    return ranges


def rank_pieces(file_rows: Sequence[int], rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(file index, first row, stop row) pieces of `rank`'s contiguous share of all the rows."""
    return file_ranges(file_rows, *row_share(sum(file_rows), rank, world_size))


def group_sizes(parquet: Any) -> list[int]:
    """The rows in each row group of an open `pyarrow.parquet.ParquetFile`."""
    return [parquet.metadata.row_group(group).num_rows for group in range(parquet.metadata.num_row_groups)]


def parquet_range(
    parquet: Any, start: int, stop: int, batch_rows: int, columns: list[str] | None = None
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(file row of its first row, batch) for rows [start, stop) of an open parquet file, at most
    `batch_rows` at a time; only the row groups holding them are read."""
    groups, position = row_groups_covering(group_sizes(parquet), start, stop)
    if not groups:
        return
    for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
        low, high = max(start - position, 0), min(stop - position, batch.num_rows)
        if low < high:
            yield position + low, batch.slice(low, high - low)
        position += batch.num_rows
        if position >= stop:
            return


def row_groups_covering(group_rows: Sequence[int], start: int, stop: int) -> tuple[list[int], int]:
    """The row groups holding rows [start, stop) of a file, and the file row their first one starts at."""
    groups: list[int] = []
    first = offset = 0
    for group, rows in enumerate(group_rows):
        if offset < stop and offset + rows > start:
            first = first if groups else offset
            groups.append(group)
        offset += rows
    return groups, first


def text_type(schema: pa.Schema, field: str) -> pa.DataType:
    """The type of the text column `field`: string, binary or null. TableError if it is unusable."""
    if field not in schema.names:
        raise TableError(
            f"input has no column {field!r} (columns: {', '.join(schema.names)}); "
            "choose one with --text-field"
        )
    kind = schema.field(field).type
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    if text or pa.types.is_null(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return kind
    raise TableError(f"column {field!r} holds {kind}, not text; choose the text column with --text-field")


def text_column(table: pa.Table | pa.RecordBatch, field: str, first_row: int = 0) -> list[str]:
    """The text of every row; a null text reads as empty. TableError if the column is unusable.

    `first_row` is the number of the table's first row in the whole input, for messages."""
    kind = text_type(table.schema, field)
    column = table.column(field)
    if pa.types.is_null(kind):
        return [""] * len(column)
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        return [value or "" for value in column.to_pylist()]
    texts = []
    for row, value in enumerate(column.to_pylist()):
        try:
            texts.append(value.decode("utf-8") if value is not None else "")
        except UnicodeDecodeError as error:
            raise TableError(
                f"column {field!r}, row {first_row + row}: not valid UTF-8 "
                f"(byte {value[error.start]:#04x} at {error.start})"
            ) from None
    return texts


# --- one file ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _reading(uri: str) -> Iterator[None]:
    """Turns the I/O and Arrow errors of reading `uri` into one-line TableErrors."""
    try:
        yield
    except FileNotFoundError:
        raise TableError(f"{uri}: no such file or folder") from None
    except (OSError, pa.ArrowException) as error:
        raise TableError(f"{uri}: cannot read: {error}") from None


def _read_file(fs: Any, file: TableFile) -> pa.Table:
    if file.format == SAVED_DATASET:
        import datasets

        saved = datasets.load_from_disk(file.uri)
        if not isinstance(saved, datasets.Dataset):
            raise TableError(f"{file.uri} holds a DatasetDict; name one split's folder")
        return (saved.flatten_indices() if saved._indices is not None else saved).data.table
    if file.format == "parquet":
        import pyarrow.parquet as pq

        with fs.open(file.path, "rb") as handle:
            return pq.read_table(handle)
    with fs.open(file.path, "rb", compression="infer") as handle:
        if file.format == "jsonl":
            rows = list(_json_rows(handle, file.uri))
            try:
                return pa.Table.from_pylist(rows)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
                raise TableError(f"{file.uri}: rows do not share one schema: {error}") from None
        data = handle.read()
    return _csv_reader(data, file.uri).read_all() if file.format == "csv" else _arrow_table(data)


def _batches(fs: Any, file: TableFile) -> Iterator[pa.RecordBatch | list[dict[str, Any]]]:
    """A file's rows in pieces, without holding a parquet or JSON lines file whole: Arrow record
    batches, or lists of dicts for JSON."""
    if file.format == "parquet":
        import pyarrow.parquet as pq

        with fs.open(file.path, "rb") as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS)
    elif file.format == "jsonl":
        with fs.open(file.path, "rb", compression="infer") as handle:
            rows: list[dict[str, Any]] = []
            for row in _json_rows(handle, file.uri):
                rows.append(row)
                if len(rows) == BATCH_ROWS:
                    yield rows
                    rows = []
            yield rows
    elif file.format == "csv":
        with fs.open(file.path, "rb", compression="infer") as handle:
            data = handle.read()
        yield from _csv_reader(data, file.uri)
    else:
        yield from _read_file(fs, file).to_batches(BATCH_ROWS)


def _arrow_table(data: bytes) -> pa.Table:
    import pyarrow.ipc as ipc

    try:
        return ipc.open_stream(io.BytesIO(data)).read_all()
    except pa.ArrowInvalid:
        return ipc.open_file(io.BytesIO(data)).read_all()


def _csv_reader(data: bytes, source: str) -> Any:
    import pyarrow.csv as pacsv

    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TableError(_not_utf8(source, data[: error.start].count(b"\n") + 1, data, error)) from None
    return pacsv.open_csv(io.BytesIO(data))


def _not_utf8(source: str, line: int, data: bytes, error: UnicodeDecodeError) -> str:
    return f"{source}: line {line}: not UTF-8 (byte {data[error.start]:#04x}); re-encode it"


def _json_rows(handle: IO[bytes], source: str) -> Iterator[dict[str, Any]]:
    """The objects of JSON lines, or of one JSON array; errors name the line or record."""
    first = True
    for number, raw in enumerate(handle, start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise TableError(_not_utf8(source, number, raw, error)) from None
        if not line:
            continue
        if first and line.startswith("["):
            yield from _json_array(raw + handle.read(), source, number)
            return
        first = False
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            # orjson is about three times faster and strict; the standard library also reads NaN,
            # integers past 64 bits and lone surrogates, and says what is wrong otherwise.
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise TableError(f"{source}: line {number}: invalid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise TableError(f"{source}: line {number}: expected a JSON object")
        yield row


def _json_array(data: bytes, source: str, line: int) -> Iterator[dict[str, Any]]:
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        line += data[: error.start].count(b"\n")
        raise TableError(_not_utf8(source, line, data, error)) from None
    except json.JSONDecodeError as error:
        raise TableError(f"{source}: invalid JSON ({error})") from None
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise TableError(f"{source}: record {number}: expected a JSON object")
        yield row
