"""Every recipe in recipes/cosmopedia (and the headline example) against small local copies of the
public datasets it reads, with their real column names and types.

The Hugging Face Hub cannot be reached here. `datasets` loads a local folder named like the
repository (`HuggingFaceTB/cosmopedia`) with the same code that loads the repository itself
(configs from the card, parquet files per config and split), so each recipe runs unchanged
in a folder holding those copies: a renamed column, a nested field read the wrong way, a wrong
config or split fails here, not on a cluster.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import COSMO, REPO
from cosmoforge.prompts.builder import build_prompts
from cosmoforge.prompts.fields import resolve
from cosmoforge.prompts.seeds import HUB_DATASET, record_hash
from cosmoforge.spec.model import GenerationRun, SeedSource
from cosmoforge.spec.validation import load_file

EXAMPLE = REPO / "manifests" / "examples" / "cosmopedia-mixtral.yaml"
RECIPES = [*sorted((REPO / "recipes" / "cosmopedia").glob("*.yaml")), EXAMPLE]

STRING = pa.string()
# HuggingFaceTB/cosmopedia: one config per split, the same six columns in each.
COSMOPEDIA = pa.schema(
    [
        ("prompt", STRING),
        ("text", STRING),
        ("token_length", pa.int64()),
        ("audience", STRING),
        ("format", STRING),
        ("seed_data", STRING),
    ]
)
COSMOPEDIA_CONFIGS = (
    "auto_math_text",
    "khanacademy",
    "openstax",
    "stanford",
    "stories",
    "web_samples_v1",
    "web_samples_v2",
    "wikihow",
)
TURN = pa.struct([("from", STRING), ("value", STRING), ("weight", pa.float64())])
OPENHERMES = pa.schema(
    [
        ("conversations", pa.list_(TURN)),
        ("source", STRING),
        ("category", STRING),
        ("id", STRING),
        ("title", STRING),
        ("model", STRING),
        ("system_prompt", STRING),
        ("skip_prompt_formatting", pa.bool_()),
    ]
)
ULTRACHAT = pa.schema([("id", STRING), ("data", pa.list_(STRING))])
AMT_META = pa.struct(
    [
        ("domain", STRING),
        ("url", STRING),
        ("openwebmath_score", pa.float64()),
        ("openwebmath_perplexity", pa.float64()),
        ("lm_name", STRING),
        ("lm_label", STRING),
        ("lm_q1_score", pa.float64()),
        ("lm_q2_score", pa.float64()),
        ("lm_q1q2_score", pa.float64()),
    ]
)
AUTOMATHTEXT = pa.schema([("url", STRING), ("text", STRING), ("date", STRING), ("meta", AMT_META)])
FINEWEB = pa.schema(
    [
        ("text", STRING),
        ("id", STRING),
        ("dump", STRING),
        ("url", STRING),
        ("date", STRING),
        ("file_path", STRING),
        ("language", STRING),
        ("language_score", pa.float64()),
        ("token_count", pa.int64()),
    ]
)

FORMATS = {
    "stories": ["story_children", "story_reddit", "story_life_lessons", "story_forums", "story_morality"],
    "wikihow": ["wikihow"],
}
AUDIENCES = ["college_students", "high_school_studnets", "grade_school_students", "researchers", "general"]


def cosmopedia_rows(config: str) -> list[dict[str, Any]]:
    formats = FORMATS.get(
        config, ["textbook_academic_tone", "blogpost", "textbook_narrative_tone", "wikihow"]
    )
    return [
        {
            "prompt": f"Write a {formats[i % len(formats)]} for {AUDIENCES[i % 5]} about {config} seed {i}.",
            "text": f"an old document {i}",
            "token_length": 900 + i,
            "audience": AUDIENCES[i % 5] if config != "stories" else "general",
            "format": formats[i % len(formats)],
            "seed_data": f"{config} seed {i}: "
            + "some words of material " * (8 if i % 3 else 80)
            + f"end {i}.",
        }
        for i in range(10)
    ]


def openhermes_rows() -> list[dict[str, Any]]:
    rows = []
    labels = [
        ("airoboros2.2", "orca"),
        ("glaive-code-assist", None),
        ("camelai", None),
        (None, "general"),
        ("airoboros2.2", "rp"),
        ("airoboros2.2", "coding"),
        ("metamath", None),
        ("airoboros2.2", "riddle"),
    ]
    for i, (source, category) in enumerate(labels):
        turns = [
            {"from": "human", "value": f"hermes question {i}?", "weight": 0.0},
            {"from": "gpt", "value": f"hermes answer {i}", "weight": 1.0},
        ]
        if i % 2:
            turns.insert(0, {"from": "system", "value": "You are an assistant.", "weight": None})
        rows.append(
            {
                "conversations": turns,
                "source": source,
                "category": category,
                "id": None,
                "title": None,
                "model": None,
                "system_prompt": None,
                "skip_prompt_formatting": False,
            }
        )
    return rows


def fineweb_rows() -> list[dict[str, Any]]:
    return [
        {
            "text": f"A web page {i} about gardening and the weather. " * 4,
            "id": f"<urn:uuid:{i:08d}>",
            "dump": "CC-MAIN-2024-10",
            "url": f"https://example.org/{i}",
            "date": "2024-02-20T00:00:00Z",
            "file_path": "s3://commoncrawl/x.warc.gz",
            "language": "en" if i % 4 else "fr",
            "language_score": 0.9,
            "token_count": 60,
        }
        for i in range(200)
    ]


def automathtext_rows() -> list[dict[str, Any]]:
    meta = {
        "domain": "math.example.org",
        "url": None,
        "openwebmath_score": 0.9,
        "openwebmath_perplexity": 3.0,
        "lm_name": "Qwen-72B",
        "lm_label": "1-1",
        "lm_q1_score": 0.9,
        "lm_q2_score": 0.8,
        "lm_q1q2_score": 0.85,
    }
    return [
        {
            "url": f"https://math.example.org/{i}",
            "text": f"Let x be a real number {i}. " * 60 + f"Hence q{i}.",
            "date": "2023-01-01",
            "meta": meta,
        }
        for i in range(6)
    ]


def _repository(root: Path, configs: dict[str, list[dict[str, Any]]], schema: pa.Schema) -> None:
    """A dataset repository as on the Hub: parquet per config, configs listed in the card."""
    card = ["---", "configs:"]
    for config, rows in configs.items():
        path = root / "data" / config / "train-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        card += [
            f"- config_name: {config}",
            "  data_files:",
            "  - split: train",
            f"    path: data/{config}/*.parquet",
        ]
    (root / "README.md").write_text("\n".join([*card, "---", ""]))


ROWS: dict[str, dict[str, list[dict[str, Any]]]] = {
    "HuggingFaceTB/cosmopedia": {config: cosmopedia_rows(config) for config in COSMOPEDIA_CONFIGS},
    "teknium/OpenHermes-2.5": {"default": openhermes_rows()},
    "stingning/ultrachat": {
        "default": [{"id": str(i), "data": [f"chat question {i}?", "reply"]} for i in range(6)]
    },
    "math-ai/AutoMathText": {
        "web-0.50-to-1.00": automathtext_rows(),
        "arxiv-0.50-to-1.00": automathtext_rows(),
    },
}
SCHEMAS = {
    "HuggingFaceTB/cosmopedia": COSMOPEDIA,
    "teknium/OpenHermes-2.5": OPENHERMES,
    "stingning/ultrachat": ULTRACHAT,
    "math-ai/AutoMathText": AUTOMATHTEXT,
}
FINEWEB_FILE = "HuggingFaceFW/fineweb/sample/10BT/000_00000.parquet"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    for repo, configs in ROWS.items():
        _repository(root / repo, configs, SCHEMAS[repo])
    (root / FINEWEB_FILE).parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(fineweb_rows(), schema=FINEWEB), root / FINEWEB_FILE)
    return root


def _rows_of(seed: SeedSource) -> list[dict[str, Any]]:
    match = HUB_DATASET.match(seed.uri)
    if match is None:
        return fineweb_rows()
    return ROWS[match.group("repo")][seed.config or "default"]


def _local(run: GenerationRun, hub: Path) -> GenerationRun:
    """Files inside a Hub repository are read by fsspec; here they are the local copies."""
    for seed in run.spec.seeds:
        if seed.uri.startswith("hf://datasets/") and not HUB_DATASET.match(seed.uri):
            seed.uri = str(hub / seed.uri.removeprefix("hf://datasets/"))
    run.spec.clustering = None  # clustering has its own tests; topics join by the same record ids
    return run


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_reads_the_real_columns(recipe: Path, hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = load_file(recipe)
    monkeypatch.chdir(hub)
    prompts = list(build_prompts(_local(run, hub)))
    by_source = collections.defaultdict(list)
    for prompt in prompts:
        by_source[prompt.seed_source].append(prompt)
    assert set(by_source) == {seed.name for seed in run.spec.seeds}
    for seed in run.spec.seeds:
        rows = {
            record_hash(row) if seed.id_field is None else str(resolve(seed.id_field, row)): row
            for row in _rows_of(seed)
        }
        for prompt in by_source[seed.name]:
            row = rows[prompt.seed_id]
            text = resolve(seed.text_field, row)
            if seed.kind == "prompt":
                assert prompt.prompt == text
                assert (prompt.audience, prompt.style) == (row["audience"], row["format"])
                continue
            assert text[:40] in prompt.prompt and f"{text[:40]}\n" not in prompt.prompt[:5]
            # Long fixture texts end in words found nowhere else: cut, they are not in the prompt.
            cut = len(text) > (seed.max_chars or run.spec.prompts.max_seed_chars)
            assert (text[-8:] in prompt.prompt) != cut
            if seed.audience_field is not None:
                named = str(resolve(seed.audience_field, row))
                audience = seed.audience_map.get(named, named)
                stories = seed.kind == "instruction"
                if audience in (run.spec.prompts.story_audiences if stories else run.spec.prompts.audiences):
                    assert prompt.audience == audience
            if seed.style_field is not None:
                style = seed.style_map.get(
                    str(resolve(seed.style_field, row)), resolve(seed.style_field, row)
                )
                if style in run.spec.prompts.styles:
                    assert prompt.style == style
            if seed.kind == "instruction":
                assert prompt.style == "story"
                assert "You are an assistant." not in prompt.prompt and "answer" not in prompt.prompt


def test_openhermes_recipe_drops_cosmopedias_exclusions(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = load_file(REPO / "recipes" / "cosmopedia" / "openhermes-stories.yaml")
    monkeypatch.chdir(hub)
    prompts = list(build_prompts(run))
    kept = sorted({p.prompt.split('"""')[1].strip() for p in prompts})
    assert kept == ["hermes question 0?", "hermes question 3?", "hermes question 6?"]


def test_fineweb_recipe_keeps_english_and_a_seeded_sample(hub: Path) -> None:
    run = _local(load_file(REPO / "recipes" / "cosmopedia" / "fineweb-web.yaml"), hub)
    ids = [p.seed_id for p in build_prompts(run)]
    english = [row["id"] for row in fineweb_rows() if row["language"] == "en"]
    assert set(ids) <= set(english) and 3 <= len(ids) <= 35
    assert ids == [p.seed_id for p in build_prompts(run)]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_headline_example_without_network_fails_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run(
        [*COSMO, "prompts", str(EXAMPLE), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "seed error: seed 'stanford' (hf://datasets/HuggingFaceTB/cosmopedia): unreachable ("
    )


def test_plan_works_on_the_headline_example(hub: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the tokenizer falls back to a stand-in's count
    result = subprocess.run(
        [*COSMO, "plan", str(EXAMPLE), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=hub,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"prompts": ' in result.stdout and '"stanford": ' in result.stdout
