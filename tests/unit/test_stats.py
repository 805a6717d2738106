"""Measured diversity: prompt distributions and document duplication/opening statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import EXAMPLES
from cosmoforge.cli.main import main
from cosmoforge.postprocess.stats import StatsError, dataset_stats, document_stats, exact_duplicates, opening


def test_prompts_command_writes_prompts_stats_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prompts", str(EXAMPLES / "quickstart.yaml"), "--out", str(tmp_path)]) == 0
    prompts = pq.read_table(tmp_path / "prompts")
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["prompts"] == prompts.num_rows == 31
    assert stats["seed_kind"] == {"outline": 11, "web": 6, "wikihow": 5, "instruction": 5, "math": 4}
    assert sum(stats["audience"].values()) == 31 and stats["style"]["story"] == 5
    assert (tmp_path / "distributions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        main(["prompts", str(EXAMPLES / "quickstart.yaml"), "--out", str(tmp_path / "l"), "--limit", "7"])
        == 0
    )
    assert pq.read_table(tmp_path / "l" / "prompts").num_rows == 7


def test_every_seed_kind_reaches_its_template(tmp_path: Path) -> None:
    assert main(["prompts", str(EXAMPLES / "quickstart.yaml"), "--out", str(tmp_path)]) == 0
    rows = pq.read_table(tmp_path / "prompts").to_pylist()
    by_kind = {
        kind: [r for r in rows if r["seed_kind"] == kind]
        for kind in ("outline", "wikihow", "web", "math", "instruction")
    }
    unit = next(r for r in by_kind["outline"] if r["seed_id"] == "c0-u2")
    assert '"Introduction to Ecology"' in unit["prompt"] and "1. What an ecosystem is" in unit["prompt"]
    assert "Units already written: What an ecosystem is, Food webs and energy flow" in unit["prompt"]
    assert all('topic: "How to' in r["prompt"] for r in by_kind["wikihow"])
    assert all("web page" in r["prompt"] for r in by_kind["web"])
    assert all("Check every calculation" in r["prompt"] for r in by_kind["math"])
    story_audiences = {"young_children", "general_audience", "reddit_post"}
    assert all(r["style"] == "story" and r["audience"] in story_audiences for r in by_kind["instruction"])
    assert {r["template_id"] for r in rows} == {"outline", "wikihow", "web", "math", "story"}


def test_opening_and_duplicates_are_normalized() -> None:
    assert opening("  Once upon a TIME, in a land far away") == "once upon a time in"
    assert exact_duplicates(["A  text.", "a text.", "another"]) == 1


def test_document_stats_measure_openings_overall_and_per_style() -> None:
    texts = ["Once upon a time there was a cat."] * 3 + [
        f"Document {i} starts differently here." for i in range(7)
    ]
    styles = ["story"] * 3 + ["textbook"] * 7
    stats = document_stats(pa.table({"text": texts, "style": styles, "audience": ["x"] * 10}))
    assert stats["exact_duplicates"] == 2 and stats["exact_duplicate_rate"] == 0.2
    assert stats["openings"]["most_common_share"] == 0.3
    assert stats["openings"]["top"][0]["opening"] == "once upon a time there"
    assert stats["openings_by_style"]["story"]["most_common_share"] == 1.0
    assert stats["openings_by_style"]["textbook"]["distinct_openings"] == 7


def test_stats_command_reads_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "run" / "dataset"
    folder.mkdir(parents=True)
    pq.write_table(
        pa.table({"body": ["one text", "one text", "two text"]}), folder / "data-00000-of-00001.parquet"
    )
    assert main(["stats", str(tmp_path / "run"), "--text-field", "body", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exact_duplicates"] == 1
    with pytest.raises(StatsError, match="no column 'text'"):
        dataset_stats(str(tmp_path / "run"))
    assert main(["stats", str(tmp_path / "absent")]) == 2


def test_near_duplicates_are_counted_with_the_dedup_parameters() -> None:
    base = (
        "The water cycle moves water between the oceans, the air and the land. Heat from the sun "
        "evaporates water from lakes and seas; the vapour rises, cools and condenses into clouds, "
        "and rain or snow returns it to the ground, where rivers carry it back to the sea again."
    )
    near = base.replace("rivers carry", "streams carry")
    other = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside leaves."
    stats = document_stats(pa.table({"text": [base, near, other, base]}))
    assert stats["exact_duplicates"] == 1
    assert stats["near_duplicates"] == 1 and stats["near_duplicate_rate"] == 0.25
