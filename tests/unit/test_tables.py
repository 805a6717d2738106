"""The one table reader: every format and place gives the same rows; every problem is one TableError line."""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from cosmoforge import tables
from cosmoforge.cli.main import main as cosmo
from cosmoforge.postprocess.decontam import DecontamError
from cosmoforge.postprocess.stages import dedup, dedup_dataset
from cosmoforge.tables import TableError

# No nulls: csv has no way to tell a null string from an empty one.
ROWS = [{"id": i, "text": f"row number {i}", "topic": "t" if i % 2 else "u"} for i in range(7)]


def _write_all_formats(folder: Path) -> dict[str, Path]:
    table = pa.Table.from_pylist(ROWS)
    paths = {
        name: folder / name for name in ("a.parquet", "b.jsonl", "c.json", "d.csv", "e.arrow", "f.jsonl.gz")
    }
    pq.write_table(table, paths["a.parquet"], row_group_size=3)
    paths["b.jsonl"].write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    paths["c.json"].write_text(json.dumps(ROWS, indent=1))
    pacsv.write_csv(table, paths["d.csv"])
    with ipc.new_file(paths["e.arrow"], table.schema) as writer:
        writer.write_table(table)
    paths["f.jsonl.gz"].write_bytes(gzip.compress(paths["b.jsonl"].read_bytes()))
    return paths


def test_every_format_reads_the_same_rows_whole_or_streamed(tmp_path: Path) -> None:
    for path in _write_all_formats(tmp_path).values():
        assert tables.read_table(str(path)).to_pylist() == ROWS, path
        assert list(tables.iter_rows(str(path))) == ROWS, path
    folder = tables.read_table(str(tmp_path))  # six files, in name order
    assert folder.num_rows == 6 * len(ROWS) and folder.column("id").to_pylist()[:8] == [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        0,
    ]
    named = tmp_path / "rows.txt"
    named.write_bytes((tmp_path / "b.jsonl").read_bytes())
    assert tables.read_table(str(named), format="json").to_pylist() == ROWS


def test_any_fsspec_uri_and_row_ranges_of_parquet(tmp_path: Path) -> None:
    memory = fsspec.filesystem("memory")
    memory.pipe("/tables-test/part-1.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS[:3]).encode())
    memory.pipe("/tables-test/part-2.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS[3:]).encode())
    try:
        assert tables.read_table("memory://tables-test").to_pylist() == ROWS
        _, files = tables.list_files("memory://tables-test")
        assert [tables.read_table(file.uri).num_rows for file in files] == [3, 4]  # each readable alone
    finally:
        memory.rm("/tables-test", recursive=True)
    path = _write_all_formats(tmp_path)["a.parquet"]  # row groups of 3
    ((file,),) = [tables.list_files(str(path))[1]]
    assert tables.read_rows(file, 2, 5).to_pylist() == ROWS[2:5]
    assert tables.read_rows(file, 6, 9).to_pylist() == ROWS[6:]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', "line 2: not UTF-8 (byte 0xff)"),
        ("a.jsonl", b'{"text": "ok"}\n\n{"text": broken\n', "line 3: invalid JSON"),
        ("a.jsonl", b'{"text": "ok"}\n[1, 2]\n', "line 2: expected a JSON object"),
        ("a.json", b'[{"text": "ok"}, 3]', "record 2: expected a JSON object"),
        ("a.csv", b"text\nok\n\xfe\n", "line 3: not UTF-8"),
        ("a.parquet", b"PAR1 not really parquet", "cannot read"),
        ("a.txt", b"text", "cannot tell the format from the name"),
    ],
)
def test_problems_are_one_line_naming_the_file(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    for read in (tables.read_table, lambda uri: list(tables.iter_rows(uri))):
        with pytest.raises(TableError, match=re.escape(message)) as raised:
            read(str(path))
        assert str(raised.value).startswith(str(path)) and "\n" not in str(raised.value)


def test_json_lines_read_what_the_standard_library_reads(tmp_path: Path) -> None:
    """The fast parser refuses NaN and Infinity; such lines still read, as Python's json reads them."""
    path = tmp_path / "scores.jsonl"
    lines = (
        '{"text": "a", "score": 0.5}',
        '{"text": "b", "score": NaN}',
        '{"text": "c", "score": -Infinity}',
    )
    path.write_text("\n".join(lines) + "\n")
    scores = tables.read_table(str(path)).column("score").to_pylist()
    assert scores[0] == 0.5 and math.isnan(scores[1]) and scores[2] == -math.inf


def test_missing_input_unknown_format_and_empty_folder(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"n": 1}\n{"n": "one"}\n')
    with pytest.raises(TableError, match="rows do not share one schema"):
        tables.read_table(str(mixed))
    mixed.unlink()
    with pytest.raises(TableError, match="no such file or folder"):
        tables.read_table(str(tmp_path / "absent.parquet"))
    with pytest.raises(TableError, match="unknown format 'xml'"):
        tables.read_table(str(tmp_path), format="xml")
    with pytest.raises(TableError, match="folder holds no"):
        tables.read_table(str(tmp_path))


def test_dedup_of_a_corrupt_file_reports_the_readers_error_not_a_decontamination_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "docs.parquet"
    corrupt.write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(TableError, match="cannot read") as raised:
        dedup_dataset(str(corrupt), str(tmp_path / "out"), dedup.DedupConfig())
    assert not isinstance(raised.value, DecontamError)  # dedup's input errors are its own
    assert cosmo(["dedup", str(corrupt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cosmo dedup: error: {corrupt}: cannot read") and err.count("\n") == 1


def test_scan_streams_the_rows_and_schema_of_read_table(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(
        pa.table({"id": [1, 2, 3], "text": ["a", "b", None]}), folder / "0.parquet", row_group_size=2
    )
    pq.write_table(pa.table({"text": ["c"], "group": ["web"]}), folder / "1.parquet")
    (tmp_path / "rows.jsonl").write_text('{"text": "x"}\n{"text": "y", "n": 2}\n')
    for uri in (str(folder), str(tmp_path / "rows.jsonl"), str(folder / "0.parquet")):
        whole = tables.read_table(uri)
        schema, batches = tables.scan(uri, rows=2)
        streamed = list(batches)
        assert schema.equals(whole.schema) and all(len(batch) <= 2 for batch in streamed)
        assert pa.Table.from_batches(streamed, schema).equals(whole)
    assert tables.text_type(schema, "text") == pa.string()
    with pytest.raises(TableError, match="holds int64, not text"):
        tables.text_type(schema, "id")
    with pytest.raises(TableError, match="no column 'body'"):
        tables.text_type(schema, "body")
    batch = pa.record_batch({"text": pa.array([b"ok", b"\xc3\x28"], type=pa.binary())})
    with pytest.raises(TableError, match="row 41: not valid UTF-8"):
        tables.text_column(batch, "text", first_row=40)


@pytest.mark.parametrize(("start", "stop"), [(0, 23), (3, 9), (4, 8), (7, 8), (22, 23), (5, 5)])
def test_a_parquet_range_reads_only_its_rows_in_batches_labelled_by_file_row(
    tmp_path: Path, start: int, stop: int
) -> None:
    path = tmp_path / "groups.parquet"
    pq.write_table(
        pa.table({"n": list(range(23)), "text": [f"t{i}" for i in range(23)]}), path, row_group_size=4
    )
    with pq.ParquetFile(path) as parquet:
        assert tables.group_sizes(parquet) == [4, 4, 4, 4, 4, 3]
        pieces = list(tables.parquet_range(parquet, start, stop, batch_rows=3, columns=["n"]))
    assert all(batch.num_rows <= 3 and batch.schema.names == ["n"] for _, batch in pieces)
    assert [n for _, batch in pieces for n in batch.column("n").to_pylist()] == list(range(start, stop))
    assert [first for first, _ in pieces] == [batch.column("n")[0].as_py() for _, batch in pieces]
    shares = [tables.rank_pieces([23, 0, 5], rank, 4) for rank in range(4)]
    assert shares == [[(0, 0, 7)], [(0, 7, 14)], [(0, 14, 21)], [(0, 21, 23), (2, 0, 5)]]
