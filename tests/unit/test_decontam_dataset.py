"""`decontaminate_dataset` streams its input: the outputs equal checking the whole table at once,
for a folder of parquet files with differing columns and small row groups, and a failure part
way leaves no output behind."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosmoforge import tables
from cosmoforge.postprocess import decontam, evalsets, stages
from cosmoforge.postprocess.decontam import Config, cache, dataset

DATA = Path(__file__).parents[1] / "data" / "benchmarks"
BENCHMARKS = [str(DATA / name) for name in ("piqa.jsonl", "siqa.jsonl", "mmlu.jsonl", "arc_easy.jsonl")]
WORDS = "the soil warms and seedlings move outside once frost has passed in late spring".split()


@pytest.fixture(autouse=True)
def index_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV, str(tmp_path / "index-cache"))


def write_folder(folder: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    items = evalsets.load_benchmarks(BENCHMARKS)
    folder.mkdir()
    for number in range(3):
        texts = []
        for _ in range(150):
            words = [rng.choice(WORDS) for _ in range(rng.randrange(0, 60))]
            if rng.random() < 0.2:
                words.insert(rng.randrange(len(words) + 1), rng.choice(items).text)
            texts.append(" ".join(words))
        columns = {"id": [f"{number}-{row}" for row in range(150)], "text": texts}
        if number != 1:  # one file without the group column: its rows have no group
            columns["seed_source"] = [rng.choice(["web", "stories", None]) for _ in texts]
        pq.write_table(pa.table(columns), folder / f"part-{number}.parquet", row_group_size=37)


def test_streamed_outputs_equal_checking_the_whole_table(tmp_path: Path) -> None:
    write_folder(tmp_path / "in")
    report = stages.decontaminate_dataset(
        str(tmp_path / "in"), str(tmp_path / "out"), BENCHMARKS, Config(), workers=2
    )
    table = tables.read_table(str(tmp_path / "in"))
    index = decontam.build_index(evalsets.load_benchmarks(BENCHMARKS))
    texts = tables.text_column(table, "text")
    verdicts = list(decontam.check_all(texts, index, workers=1))
    kept, removed = stages.split_by_verdict(table, verdicts)
    assert 20 < removed.num_rows < 150
    assert pq.read_table(tmp_path / "out" / "kept.parquet").equals(kept, check_metadata=False)
    assert pq.read_table(tmp_path / "out" / "removed.parquet").equals(removed, check_metadata=False)
    groups = stages.groups_of(table, "seed_source")
    expected = decontam.build_report(verdicts, index, groups, sum(1 for text in texts if not text.strip()))
    assert report == expected == json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "kept.parquet",
        "removed.parquet",
        "report.json",
        "report.md",
    ]


def test_a_failure_part_way_leaves_no_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    texts = [b"fine text"] * 5000 + [b"bad \xff byte"]
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.binary())}), folder / "docs.parquet")
    monkeypatch.setattr(dataset, "ROW_GROUP_ROWS", 100)  # so kept rows are written before the error
    with pytest.raises(evalsets.InputError, match="row 5000: not valid UTF-8"):
        stages.decontaminate_dataset(str(folder), str(tmp_path / "out"), BENCHMARKS[:1], Config(), workers=2)
    assert list((tmp_path / "out").iterdir()) == []
