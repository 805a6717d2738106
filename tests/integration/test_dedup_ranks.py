"""`cosmo dedup --step`: the MinHash dedup as ranks of Indexed Jobs gives the one-process answer.

Real datatrove, real parquet/jsonl files, real processes for the pods of each step (run side by
side, as an Indexed Job's pods are), and one run on an S3 server. The reference is `cosmo dedup`
without --step on the same input: the same kept.parquet, removed.parquet and counts.json.
The corpus puts exact copies and near-duplicates in other ranks than their originals, exact
copies of near-duplicates, and texts too short to have a signature.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import COSMO
from cosmoforge.cli.main import main as cosmo
from cosmoforge.postprocess.dedup_ranks import (
    STEPS,
    WORK,
    node_keys,
    step_world_size,
    without_copies,
)
from cosmoforge.tables import rank_pieces

VOCABULARY = (
    "river mountain lantern orchard copper violin harbor meadow glacier pepper saddle thunder "
    "marble canvas falcon walnut ember quartz tundra willow beacon citrus pebble velvet anchor "
    "juniper cobalt prairie lagoon saffron"
).split()
# Few buckets keep the number of pods small; both sides of every comparison use the same flags.
FLAGS = ["--buckets", "4", "--hashes-per-bucket", "4"]
BUCKETS = 4


def essay(seed: int, words: int = 80) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCABULARY) for _ in range(words))


def edit(text: str, every: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join("zeppelin" if rng.randrange(every) == 0 else word for word in text.split())


def corpus() -> list[str]:
    originals = [essay(seed) for seed in range(200)]
    near = [edit(originals[2], 40, 1), edit(originals[3], 40, 2), edit(originals[3], 40, 3)]
    extra = [
        originals[5],  # exact copies, which shuffling spreads over the ranks
        originals[150],
        originals[150],
        *near,
        near[1],  # an exact copy of a near-duplicate
        edit(originals[120], 40, 4),
        "too short",
        "too short",
        "",
        "   ",
        "",
    ]
    documents = originals + extra
    random.Random(7).shuffle(documents)
    return documents


def write_parquet(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True)
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    half = len(texts) // 2
    pq.write_table(table.slice(0, half), folder / "a.parquet", row_group_size=40)
    pq.write_table(table.slice(half), folder / "b.parquet", row_group_size=40)
    return folder


def outputs(out: str) -> dict[str, Any]:
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(out)
    fs.invalidate_cache()
    found: dict[str, Any] = {}
    for name in ("kept.parquet", "removed.parquet"):
        with fs.open(f"{root}/{name}", "rb") as handle:
            table = pq.read_table(handle)
        found[name] = (table.schema.names, table.to_pylist())
    found["counts"] = json.loads(fs.cat_file(f"{root}/counts.json"))
    return found


def one_process(source: str, out: str, *extra: str) -> dict[str, Any]:
    assert cosmo(["dedup", source, "--out", out, *FLAGS, *extra]) == 0
    return outputs(out)


def pods(source: str, out: str, step: str, world: int, ranks: list[int] | None = None) -> None:
    """The pods of one step's Indexed Job, side by side; each gets its rank as Kubernetes gives it."""
    started = [
        subprocess.Popen(
            [*COSMO, "dedup", source, "--out", out, "--step", step, "--world-size", str(world), *FLAGS],
            env={**os.environ, "JOB_COMPLETION_INDEX": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank in (range(world) if ranks is None else ranks)
    ]
    for process in started:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr.decode()
        assert b"done" in stdout or step == "finish"


def steps_in_process(source: str, out: str, ranks: int, *extra: str) -> None:
    for step in STEPS:
        world = step_world_size(step, ranks, BUCKETS)
        for rank in range(world):
            arguments = ["--step", step, "--rank", str(rank), "--world-size", str(world)]
            assert cosmo(["dedup", source, "--out", out, *arguments, *FLAGS, *extra]) == 0


def test_step_world_sizes() -> None:
    assert [step_world_size(step, 3, 14) for step in STEPS] == [3, 14, 1, 3, 1]


def test_row_ranges_cut_the_rows_into_contiguous_shares() -> None:
    shares = [rank_pieces([5, 0, 4], rank, 3) for rank in range(3)]
    assert shares == [[(0, 0, 3)], [(0, 3, 5), (2, 0, 1)], [(2, 1, 4)]]
    assert rank_pieces([2], 0, 3) == [] and rank_pieces([2], 2, 3) == [(0, 1, 2)]


def test_exact_copies_leave_the_pairs_datatrove_gives_without_them() -> None:
    # One run of equal signatures: (0,1) (0,4) (1,2) (2,0), the copies (0,4) and (2,0) included.
    pairs = np.array([[0, 1, 0, 4], [0, 4, 1, 2], [1, 2, 2, 0], [3, 3, 3, 5]], dtype=np.uint32)
    copies = np.sort(node_keys(np.array([0, 2]), np.array([4, 0])))
    assert without_copies(pairs, copies).tolist() == [[0, 1, 1, 2], [3, 3, 3, 5]]


def test_pods_of_each_step_give_the_one_process_answer_and_survive_reruns(tmp_path: Path) -> None:
    source = str(write_parquet(tmp_path / "docs", corpus()))
    out = tmp_path / "dedup"
    for step in STEPS[:-1]:
        pods(source, str(out), step, step_world_size(step, 3, BUCKETS))
    # Pods restarted (run here, to spare the test a process start each): signatures rank 1 as if
    # killed while it wrote (a signature file cut short, no mark of its end), cluster after it finished.
    signatures = out / WORK / "signatures" / "bucket_000" / "00001.minhash.sig"
    signatures.write_bytes(signatures.read_bytes()[:50])
    (out / WORK / "done" / "signatures" / "00001.json").unlink()
    rerun = ["--world-size", "3", "--rank", "1", *FLAGS]
    assert cosmo(["dedup", source, "--out", str(out), "--step", "signatures", *rerun]) == 0
    assert cosmo(["dedup", source, "--out", str(out), "--step", "cluster", *FLAGS]) == 0
    # A pod killed while it wrote its part: the part is cut short, the rank runs again.
    part = out / WORK / "parts" / "kept" / "00001.parquet"
    part.write_bytes(part.read_bytes()[:100])
    assert cosmo(["dedup", source, "--out", str(out), "--step", "filter", *rerun]) == 0
    assert not (out / "kept.parquet").exists() and not (out / "counts.json").exists()
    pods(source, str(out), "finish", 1)
    assert not (out / WORK).exists()
    found = outputs(str(out))
    assert found == one_process(source, str(tmp_path / "one"))
    counts = found["counts"]
    assert counts["removed_exact"] >= 5 and counts["removed_minhash"] >= 2, counts
    assert counts["documents"] == len(corpus()) == counts["kept"] + counts["removed"]
    assert cosmo(["dedup", source, "--out", str(out), "--step", "finish", *FLAGS]) == 0
    assert outputs(str(out)) == found  # a finish run again once done changes nothing


@pytest.mark.parametrize("extra", [[], ["--no-exact"]])
def test_a_rank_without_rows_and_jsonl_files(tmp_path: Path, extra: list[str]) -> None:
    texts = corpus()[:120]
    texts += [texts[3], "too short", texts[100]]
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, rows in (("a.jsonl", texts[:60]), ("b.jsonl", texts[60:])):
        (folder / name).write_text(
            "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(rows))
        )
    # Three ranks over two files: rank 0 reads none.
    steps_in_process(str(folder), str(tmp_path / "ranks"), 3, *extra)
    assert outputs(str(tmp_path / "ranks")) == one_process(str(folder), str(tmp_path / "one"), *extra)


def test_on_object_storage(s3_bucket: str, tmp_path: Path) -> None:
    import fsspec

    source = write_parquet(tmp_path / "docs", corpus()[:90] + corpus()[:5])
    fs = fsspec.filesystem("s3")
    fs.put(str(source) + "/", f"{s3_bucket}/docs/", recursive=True)
    steps_in_process(f"s3://{s3_bucket}/docs", f"s3://{s3_bucket}/ranks", 2)
    assert not fs.exists(f"{s3_bucket}/ranks/{WORK}")
    expected = one_process(f"s3://{s3_bucket}/docs", f"s3://{s3_bucket}/one")
    assert outputs(f"s3://{s3_bucket}/ranks") == expected and expected["counts"]["removed_exact"] >= 5


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nope.parquet", "no such file or folder"),
        (lambda d: (d / "bad.parquet").write_bytes(b"PAR1 not really") and d / "bad.parquet", "cannot read"),
        (lambda d: d / "empty", "folder holds no"),
        (
            lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "t.parquet") or d / "t.parquet",
            "no column",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    source = make(tmp_path)
    arguments = ["--step", "signatures", "--rank", "1", "--world-size", "3"]
    assert cosmo(["dedup", str(source), "--out", str(tmp_path / "out"), *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert str(source) in err


def test_a_step_before_its_predecessor_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_parquet(tmp_path / "docs", corpus()[:10])
    assert cosmo(["dedup", str(source), "--out", str(tmp_path / "out"), "--step", "cluster"]) == 2
    err = capsys.readouterr().err
    assert "signatures" in err and err.count("\n") == 1
    arguments = ["--step", "buckets", "--rank", "0", "--world-size", "3"]
    assert cosmo(["dedup", str(source), "--out", str(tmp_path / "out"), *arguments]) == 2
    assert "runs as 14 rank(s), not 3" in capsys.readouterr().err
