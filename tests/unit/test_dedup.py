"""Dedup: exact groups, datatrove MinHash clusters, the same answer on any worker count, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosmoforge.cli.main import main as cosmo
from cosmoforge.postprocess.dedup import EXACT, MINHASH, DedupConfig, DedupError, deduplicate, exact_groups

VOCABULARY = (
    "river mountain lantern orchard copper violin harbor meadow glacier pepper saddle thunder "
    "marble canvas falcon walnut ember quartz tundra willow beacon citrus pebble velvet anchor "
    "juniper cobalt prairie lagoon saffron"
).split()


def essay(seed: int, words: int = 150) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCABULARY) for _ in range(words))


def edit(text: str, every: int, seed: int) -> str:
    """Replace one word in `every` with a word from outside the vocabulary."""
    rng = random.Random(seed)
    return " ".join("zeppelin" if rng.randrange(every) == 0 else word for word in text.split())


def replace_word(text: str, seed: int) -> str:
    """The text with one word, chosen by `seed`, replaced by a word from outside the vocabulary."""
    words = text.split()
    words[random.Random(seed).randrange(len(words))] = f"zeppelin{seed}"
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    originals = [essay(seed) for seed in range(30)]
    return [
        *originals,  # rows 0-29
        originals[0],  # 30: exact copy of 0
        originals[1] + "",  # 31: exact copy of 1
        # One word of 150 changed: Jaccard ~0.94 over 5-grams, which 14 x 8 hashes miss about
        # once in 200,000 whatever the hash function (a few % of words would miss one in 25).
        replace_word(originals[2], 1),  # 32: near-duplicate of 2
        replace_word(originals[3], 2),  # 33: near-duplicate of 3
        replace_word(originals[3], 3),  # 34: another near-duplicate of 3
        "",  # 35
        "   ",  # 36
        "",  # 37: exact copy of 35
        "too short",  # 38
    ]


def test_exact_groups_point_at_the_first_row() -> None:
    assert exact_groups(["a", "b", "a", "", "b", ""]).tolist() == [0, 1, 0, 3, 1, 3]


def test_exact_and_near_duplicates_are_removed_with_reasons_and_clusters(corpus: list[str]) -> None:
    result = deduplicate(corpus, DedupConfig(), workers=1)
    removed = {row: result.reason[row] for row in range(len(corpus)) if not result.kept[row]}
    assert removed == {30: EXACT, 31: EXACT, 32: MINHASH, 33: MINHASH, 34: MINHASH, 37: EXACT}
    assert result.kept_row[[30, 31, 32, 33, 34, 37]].tolist() == [0, 1, 2, 3, 3, 35]
    assert result.cluster[33] == result.cluster[34] == result.cluster[3] >= 0
    assert result.cluster[2] == result.cluster[32] != result.cluster[3]
    assert result.cluster[0] == result.cluster[30] and result.cluster[5] == -1
    assert result.counts["removed_exact"] == 3 and result.counts["removed_minhash"] == 3
    assert result.counts["kept"] == len(corpus) - 6 and result.counts["empty_documents"] == 3
    assert result.counts["clusters"] == 5


def test_worker_count_does_not_change_the_answer(corpus: list[str]) -> None:
    one, two = deduplicate(corpus, workers=1), deduplicate(corpus, workers=2)
    assert one.kept.tolist() == two.kept.tolist()
    assert one.cluster.tolist() == two.cluster.tolist()
    assert one.kept_row.tolist() == two.kept_row.tolist()


def test_distant_edits_stay_and_numbers_are_normalised(corpus: list[str]) -> None:
    far = edit(corpus[4], 2, 9)  # half the words changed
    numbers = ["Order 1234 shipped on day 17 " + corpus[5], "Order 9876 shipped on day 42 " + corpus[5]]
    result = deduplicate([corpus[4], far, *numbers])
    # datatrove turns every number into 0 before hashing, so the two orders are near-duplicates.
    assert result.kept.tolist() == [True, True, True, False]


def test_exact_only_and_invalid_settings() -> None:
    result = deduplicate(["same text here", "same text here"], DedupConfig(minhash=False))
    assert result.reason == [None, EXACT]
    with pytest.raises(DedupError, match="buckets must be at least 1"):
        DedupConfig(buckets=0)


def test_a_large_document_is_deduplicated() -> None:
    big = essay(99, 200_000)  # about 1.3 MB
    result = deduplicate([big, big, essay(98)])
    assert result.reason == [None, EXACT, None]


def test_cli_writes_kept_removed_with_clusters_and_counts(
    tmp_path: Path, corpus: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(corpus))), "text": corpus}), source)
    out = tmp_path / "out"
    assert cosmo(["dedup", str(source), "--out", str(out), "--workers", "2"]) == 0, capsys.readouterr().err
    kept, removed = pq.read_table(out / "kept.parquet"), pq.read_table(out / "removed.parquet")
    assert kept.num_rows + removed.num_rows == len(corpus)
    assert removed.column("id").to_pylist() == [30, 31, 32, 33, 34, 37]
    assert removed.column_names == ["id", "text", "dedup_reason", "dedup_cluster", "dedup_kept_row"]
    assert removed.column("dedup_reason").to_pylist() == [
        "exact",
        "exact",
        "minhash",
        "minhash",
        "minhash",
        "exact",
    ]
    counts = json.loads((out / "counts.json").read_text())
    assert counts["removed"] == 6 and counts["config"]["buckets"] == 14


@pytest.mark.parametrize(
    ("content", "arguments", "message"),
    [
        (b'{"text": "ok"}\n{"text": "\xfe"}\n', [], "line 2: not UTF-8"),
        (b'{"body": "x"}\n', [], "no column 'text'"),
        (b'{"text": "ok"}\n', ["--buckets", "0"], "buckets must be at least 1"),
        (b'{"text": "ok"}\n', ["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, arguments: list[str], message: str
) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_bytes(content)
    code = cosmo(["dedup", str(source), "--out", str(tmp_path / "out"), *arguments])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_cli_missing_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cosmo(["dedup", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
