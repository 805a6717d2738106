"""`cosmo plan`: counts equal what the run builds, and the arithmetic matches a hand-worked case."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import EXAMPLES, small_run, write_spec
from cosmoforge.cli.main import main
from cosmoforge.prompts.builder import Prompt
from cosmoforge.runs.plan import (
    COSMOPEDIA_MEAN_TOKENS,
    Assumptions,
    TokenCounter,
    count_prompts,
    fill_ratio_of,
    plan_run,
)
from cosmoforge.spec.model import GenerationRun, parse_run


def prompt(index: int, text: str, audience: str = "researchers") -> Prompt:
    return Prompt(f"p{index}", "r", "web", "web", str(index), audience, "textbook", None, "web", "v1", text)


def mixtral_run(max_new_tokens: int, replicas: int, gpus: int) -> GenerationRun:
    document = small_run("mixtral", engine="tgi", model="mistralai/Mixtral-8x7B-Instruct-v0.1")
    generation = document["spec"]["generation"]
    generation.update(maxNewTokens=max_new_tokens, replicas={"min": 1, "max": replicas}, gpusPerReplica=gpus)
    return parse_run(document)


def test_the_arithmetic_of_a_hand_worked_case() -> None:
    # 1,000 prompts of 40 characters; a tokenizer that makes one token of every 10 characters.
    counts = count_prompts(prompt(i, "x" * 40, "children" if i % 4 else "researchers") for i in range(1000))
    counter = TokenCounter(lambda texts: [len(t) // 10 for t in texts], "tens", exact=True)
    run = mixtral_run(max_new_tokens=2000, replicas=4, gpus=2)
    plan = plan_run(run, counts, counter, Assumptions(gpu="H100", gpu_hour_price=3.0))

    assert plan.prompts == 1000
    assert plan.by_audience == {"children": 750, "researchers": 250}
    # 2,000 prompts sampled at most: all 1,000 counted exactly, 4 tokens each.
    assert plan.prompt_tokens == 4000
    # Cosmopedia's mean, 25e9 / 30e6 = 833.3 tokens, under the 2,000-token budget.
    assert plan.completion_tokens_per_prompt == pytest.approx(833.333, abs=1e-3)
    assert plan.completion_tokens == 833_334
    # 25e9 tokens in 10,000 GPU-hours = 694.4 tokens/s per GPU.
    assert plan.tokens_per_second_per_gpu == pytest.approx(694.444, abs=1e-3)
    assert plan.gpu_hours == pytest.approx(833_334 / (25e9 / 36e6) / 3600)  # 0.3333 GPU-hours
    assert plan.gpu_hours == pytest.approx(1 / 3, rel=1e-5)
    assert plan.gpus == 8
    assert plan.wall_hours == pytest.approx(1 / 24, rel=1e-5)
    assert plan.cost == pytest.approx(1.0, rel=1e-5)


def test_overrides_and_a_budget_under_the_published_mean() -> None:
    counts = count_prompts(prompt(i, "word " * 20) for i in range(10))
    run = mixtral_run(max_new_tokens=500, replicas=1, gpus=1)
    default = plan_run(run, counts)
    assert default.completion_tokens == 5000  # min(500, 833) per prompt
    assert default.prompt_tokens == 250  # 1,000 characters at 4 per token: no tokenizer
    assert "estimate" in default.prompt_tokens_source
    given = plan_run(run, counts, None, Assumptions(fill_ratio=0.5, tokens_per_second=100.0))
    assert given.completion_tokens == 2500
    assert given.gpu_hours == pytest.approx(2500 / 100 / 3600)
    assert given.cost is None
    unknown = plan_run(run, counts, None, Assumptions(gpu="T4"))
    assert unknown.gpu_hours is None and "no published figure" in unknown.throughput_source


def test_sampled_token_counts_are_scaled_by_characters() -> None:
    counts = count_prompts((prompt(i, "ab" * (i + 1)) for i in range(10)), sample_size=5)
    counter = TokenCounter(lambda texts: [len(t) for t in texts], "chars", exact=False)
    run = mixtral_run(max_new_tokens=100, replicas=1, gpus=1)
    plan = plan_run(run, counts, counter)
    # One token per character on the sample, so the scaled total is every character.
    assert plan.prompt_tokens == sum(2 * (i + 1) for i in range(10))
    assert "scaled" in plan.prompt_tokens_source and "stand-in" in plan.prompt_tokens_source
    assert COSMOPEDIA_MEAN_TOKENS > 100


def test_fill_ratio_of_a_finished_run() -> None:
    assert fill_ratio_of([50, 100, 150], [200, 200, 200]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        fill_ratio_of([], [])


def test_cosmo_plan_counts_what_the_run_builds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = EXAMPLES / "quickstart.yaml"
    assert main(["plan", str(spec), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert main(["prompts", str(spec), "--out", str(tmp_path / "prompts")]) == 0
    capsys.readouterr()
    built = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "prompts").rglob("*.parquet"))
    assert planned["prompts"] == built > 0
    assert sum(planned["by_source"].values()) == built
    # The embedded engine's own tokenizer is shipped, so prompt tokens are counted, not guessed.
    assert planned["prompt_tokens_source"].startswith("counted with the model's tokenizer")
    assert planned["completion_tokens"] == built * 192  # maxNewTokens 192, under the published mean


def test_cosmo_plan_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path / "run.yaml", small_run("table"))
    assert main(["plan", str(spec), "--tokens-per-second", "10", "--gpu-hour-price", "2"]) == 0
    out = capsys.readouterr().out
    for label in ("prompts", "prompt tokens", "completion tokens", "GPU-hours", "wall time", "cost"):
        assert label in out


def test_cosmo_plan_rejects_a_bad_fill_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path / "run.yaml", small_run("bad"))
    assert main(["plan", str(spec), "--fill-ratio", "1.5"]) == 2
    assert "--fill-ratio" in capsys.readouterr().err
