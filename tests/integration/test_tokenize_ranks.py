"""`cosmo tokenize --step tokenize|merge`: tokenization as the ranks of an Indexed Job.

Three ranks run as separate `cosmo` processes, side by side, then one merge; the merged folder
must hold the same documents, token counts and per-group counts as a one-process run of the same
input, in the same layout, and the trainer's reader must take it. A rank run again gives the same
files, a merge refuses ranks that are missing, and bad input stops with status 2 and one line.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosmoforge.cli.main import main as cosmo
from cosmoforge.tables import file_ranges, row_groups_covering, row_share
from cosmoforge.training.cpu_train import TrainConfig, token_windows
from cosmoforge.training.tokenize import read_metrics, tokenize_dataset
from cosmoforge.training.tokenize_ranks import WORK_FOLDER, step_world_size

DATA = Path(__file__).parents[1] / "data" / "training"
TOKENIZER = Path(__file__).parents[2] / "cosmoforge" / "data" / "tokenizers" / "bpe-600.json"
RANKS = 3
MERGE = ["--step", "merge", "--world-size", str(RANKS)]
# Compared between runs: everything in metrics.json that does not depend on where or how fast.
SAME = ("documents", "tokens", "files", "tokens_by", "tokenizer")


def tokenize_args(dataset: str, out: str, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "cosmoforge.cli.main", "tokenize", dataset, "--out", out]
    return [*command, "--tokenizer", str(TOKENIZER), *extra]


def run_cosmo(dataset: str, out: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(tokenize_args(dataset, out, *extra), capture_output=True, text=True, check=False)


def run_ranks(dataset: str, out: str, ranks: int = RANKS) -> None:
    """Every rank as its own process, all at once, as the pods of an Indexed Job run."""
    step = ["--step", "tokenize", "--world-size", str(ranks)]
    processes = [
        subprocess.Popen(
            tokenize_args(dataset, out, *step),
            env={**os.environ, "JOB_COMPLETION_INDEX": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(ranks)
    ]
    for rank, process in enumerate(processes):
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-2000:]
        assert stdout.startswith(f"rank {rank} of {ranks}:"), stdout


def merge(dataset: str, out: str) -> subprocess.CompletedProcess[str]:
    return run_cosmo(dataset, out, *MERGE)


def documents(folder: Path) -> Counter[tuple[int, ...]]:
    """Every document of the folder's token files (split by their .index), in any order."""
    found: Counter[tuple[int, ...]] = Counter()
    for path in sorted(folder.glob("*.ds")):
        data = path.read_bytes()
        tokens = struct.unpack(f"<{len(data) // 2}H", data)
        index = path.with_name(path.name + ".index").read_bytes()
        start = 0
        for end in struct.unpack(f"<{len(index) // 8}Q", index):
            found[tuple(tokens[start:end])] += 1
            start = end
    return found


def write_dataset(folder: Path, parts: list[list[dict[str, object]]], row_group_size: int = 5) -> Path:
    folder.mkdir(parents=True)
    for number, rows in enumerate(parts):
        table = (
            pa.Table.from_pylist(rows)
            if rows
            else pq.read_schema(DATA / "dataset" / "part-00000.parquet").empty_table()
        )
        pq.write_table(table, folder / f"part-{number:05d}.parquet", row_group_size=row_group_size)
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training test data with small row groups, so that shares start and stop inside them."""
    rows = pq.read_table(DATA / "dataset").to_pylist()
    return write_dataset(tmp_path_factory.mktemp("data") / "dataset", [rows[:29], rows[29:]])


@pytest.fixture(scope="module")
def single(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "tokens"
    tokenize_dataset(str(dataset), str(out), tokenizer=str(TOKENIZER))
    return out


@pytest.fixture(scope="module")
def ranked(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ranked") / "tokens"
    run_ranks(str(dataset), str(out))
    merged = merge(str(dataset), str(out))
    assert merged.returncode == 0, merged.stderr[-2000:]
    return out


def test_merged_ranks_equal_one_process(single: Path, ranked: Path) -> None:
    ours, theirs = read_metrics(str(ranked)), read_metrics(str(single))
    assert {key: ours[key] for key in SAME} == {key: theirs[key] for key in SAME}
    assert ours["documents"] == 48 and ours["tokens"] > 0
    # Same documents, in another order: the merge shuffles across ranks.
    assert documents(ranked) == documents(single)
    assert sorted(p.name for p in ranked.iterdir()) == sorted(p.name for p in single.iterdir())
    assert (ranked / "tokenizer.json").read_bytes() == (single / "tokenizer.json").read_bytes()
    assert not (ranked / WORK_FOLDER).exists()


def test_trainer_reads_the_merged_folder(single: Path, ranked: Path) -> None:
    config = TrainConfig(preset="tiny", batch_size=4, sequence_length=32)
    windows = token_windows(str(ranked), read_metrics(str(ranked)), config)
    assert len(windows) == len(token_windows(str(single), read_metrics(str(single)), config)) > 4
    assert windows[0]["input_ids"].shape[0] == 33


def test_a_rank_with_no_rows_a_killed_rank_and_a_repeated_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = pq.read_table(DATA / "dataset").to_pylist()[:8]
    # Rows 0..2 for rank 0, 2..5 for rank 1, 5..8 for rank 2; the third file has no rows at all and
    # rank 0's rows have no text, so rank 0 ends with no documents.
    rows[0]["text"] = rows[1]["text"] = ""
    dataset = str(write_dataset(tmp_path / "small", [rows[:3], rows[3:], []], row_group_size=2))
    out = tmp_path / "tokens"
    run_ranks(dataset, str(out))
    work = out / WORK_FOLDER / "of-00003"
    assert json.loads((work / "rank-00000.json").read_text())["documents"] == 0
    before = {path.name: path.read_bytes() for path in (work / "tokens").iterdir()}

    # Rank 1 killed on its way: its marker is not written yet, its token file is cut short.
    (work / "rank-00001.json").unlink()
    cut = work / "tokens" / "cosmo_00001_00000_doc_shuffled.ds"
    cut.write_bytes(cut.read_bytes()[:10])
    refused = merge(dataset, str(out))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"cosmo tokenize: error: {work}: rank(s) 1 of 3 have not finished `--step tokenize`"
    ]
    assert not (out / "metrics.json").exists()

    again = run_cosmo(dataset, str(out), "--step", "tokenize", "--world-size", "3", "--rank", "1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert {path.name: path.read_bytes() for path in (work / "tokens").iterdir()} == before
    merged = merge(dataset, str(out))
    assert merged.returncode == 0, merged.stderr[-2000:]

    tokenize_dataset(dataset, str(tmp_path / "single"), tokenizer=str(TOKENIZER))
    ours, theirs = read_metrics(str(out)), read_metrics(str(tmp_path / "single"))
    assert {key: ours[key] for key in SAME} == {key: theirs[key] for key in SAME}
    assert ours["documents"] == 6
    assert documents(out) == documents(tmp_path / "single")

    # A merge pod run again after it succeeded (the work folder is gone) reports the same result.
    capsys.readouterr()
    assert cosmo(["tokenize", dataset, "--out", str(out), "--tokenizer", str(TOKENIZER), *MERGE]) == 0
    assert capsys.readouterr().out.startswith("6 documents -> ")
    assert read_metrics(str(out)) == ours


def bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    """(cosmo tokenize arguments, what the one line must say) for each kind of bad input."""
    empty = write_dataset(tmp_path / "empty", [[]])
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"content": ["a document"]}), other)
    step = ["--step", "tokenize", "--world-size", "3", "--rank", "2", "--tokenizer"]
    return [
        (
            [str(tmp_path / "missing"), *step, str(TOKENIZER)],
            f"dataset {tmp_path / 'missing'} does not exist",
        ),
        ([str(empty), *step, str(TOKENIZER)], f"dataset {empty} has no rows"),
        ([str(other), *step, str(TOKENIZER)], f"dataset file {other} has no 'text' column"),
        ([str(DATA / "dataset"), *step, "no-such-org/no-such"], "tokenizer 'no-such-org/no-such' not found"),
        ([str(DATA / "dataset"), *step, str(tmp_path / "none.json")], "none.json' not found"),
        ([str(DATA / "dataset"), *step[:-2], "3", "--tokenizer", str(TOKENIZER)], "rank 3 is outside"),
        ([str(DATA / "dataset"), *MERGE, "--tokenizer", str(TOKENIZER)], "have not finished"),
    ]


def test_bad_input_exits_2_with_one_line_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tokens"
    # What earlier stages left there: a finished rank's marker must survive a rank with bad input.
    kept = out / WORK_FOLDER / "of-00003" / "rank-00000.json"
    kept.parent.mkdir(parents=True)
    kept.write_text("{}")
    for args, message in bad_inputs(tmp_path):
        capsys.readouterr()
        assert cosmo(["tokenize", args[0], "--out", str(out), *args[1:]]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cosmo tokenize: error: "), lines
        assert message in lines[0], lines
    # And as its own process, as a pod runs it: a corrupt file, named, on the only line of stderr.
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "part-00000.parquet").write_bytes(b"not parquet at all")
    failed = run_cosmo(str(corrupt), str(out), "--step", "tokenize", "--world-size", "3", "--rank", "2")
    assert failed.returncode == 2
    assert failed.stderr.startswith(
        f"cosmo tokenize: error: dataset file {corrupt}/part-00000.parquet is not "
    )
    assert len(failed.stderr.strip().splitlines()) == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == [kept.relative_to(out)]


def test_ranks_and_merge_in_a_bucket(s3_bucket: str, single: Path, dataset: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(f"{dataset}/", f"{s3_bucket}/run/dataset/", recursive=True)
    out = f"s3://{s3_bucket}/run/tokens"
    run_ranks(f"s3://{s3_bucket}/run/dataset", out)
    merged = merge(f"s3://{s3_bucket}/run/dataset", out)
    assert merged.returncode == 0, merged.stderr[-2000:]
    ours, theirs = read_metrics(out), read_metrics(str(single))
    assert {key: ours[key] for key in SAME if key != "tokenizer"} == {
        key: theirs[key] for key in SAME if key != "tokenizer"
    }
    assert not fs.exists(f"{s3_bucket}/run/tokens/{WORK_FOLDER}")
    config = TrainConfig(preset="tiny", batch_size=4, sequence_length=32)
    assert len(token_windows(out, ours, config)) == len(token_windows(str(single), theirs, config))


def test_step_world_size() -> None:
    assert step_world_size("tokenize", 8) == 8
    assert step_world_size("merge", 8) == 1
    with pytest.raises(ValueError, match="unknown tokenize step"):
        step_world_size("shuffle", 2)
    with pytest.raises(ValueError, match="at least one rank"):
        step_world_size("tokenize", 0)


@pytest.mark.parametrize("total", [0, 1, 2, 7, 48])
@pytest.mark.parametrize("ranks", [1, 3, 5])
def test_shares_cover_every_row_once(total: int, ranks: int) -> None:
    shares = [row_share(total, rank, ranks) for rank in range(ranks)]
    assert [row for start, stop in shares for row in range(start, stop)] == list(range(total))
    assert max(stop - start for start, stop in shares) - min(stop - start for start, stop in shares) <= 1


def test_shares_map_to_files_and_row_groups() -> None:
    # Files of 5, 0 and 7 rows; rows 3..9 are the end of the first and the start of the third.
    assert file_ranges([5, 0, 7], 3, 9) == [(0, 3, 5), (2, 0, 4)]
    assert file_ranges([5, 0, 7], 5, 5) == []
    # Row groups of 4 rows: rows 3..9 are in groups 0, 1 and 2, the first starting at row 0.
    assert row_groups_covering([4, 4, 4, 4], 3, 9) == ([0, 1, 2], 0)
    assert row_groups_covering([4, 4, 4, 4], 4, 8) == ([1], 4)
