"""What a run will cost and has cost: the estimate in the status, the ETA, the spend so far."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import small_run
from cosmoforge.operator.progress import Counts, duration_text, eta_seconds, spend
from cosmoforge.operator.reconcile import cost_status, estimate_text
from cosmoforge.report.data import collect
from cosmoforge.runs.plan import Assumptions, estimate
from cosmoforge.spec.model import GenerationRun, Phase, dump_run, parse_run
from cosmoforge.storage import RunStore


def gpu_run(**cost: float | str) -> GenerationRun:
    document = small_run("mixtral", engine="tgi", model="mistralai/Mixtral-8x7B-Instruct-v0.1")
    document["spec"]["generation"].update(maxNewTokens=2000, replicas={"min": 1, "max": 4}, gpusPerReplica=2)
    document["spec"]["cost"] = cost
    return parse_run(document)


def test_eta_is_the_remaining_prompts_at_the_tokens_per_prompt_seen_so_far() -> None:
    # 100 of 1,000 prompts done in 50,000 tokens (500 each); 900 left at 1,000 tokens/s.
    counts = Counts(prompts=1000, generated=90, failed=10, tokens=45_000, tokens_per_second=1000.0)
    assert eta_seconds(counts) == pytest.approx(900 * 500 / 1000)
    assert eta_seconds(Counts(prompts=10, generated=8, failed=2)) == 0.0  # nothing left
    assert eta_seconds(Counts(prompts=10)) is None  # no pace yet
    assert eta_seconds(Counts(prompts=10, generated=1, tokens=5)) is None  # no rate yet


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, ""), (0, "0s"), (44.6, "45s"), (60, "1m"), (3599, "59m"), (3600 * 3 + 20 * 60, "3h20m"),
     (86_400 * 2 + 3600 * 4 + 59, "2d4h")],
)  # fmt: skip
def test_duration_text(seconds: float | None, text: str) -> None:
    assert duration_text(seconds) == text


def test_spend_adds_the_gpus_seen_last_time_for_the_time_since() -> None:
    first = spend(None, gpus=8, now=1000.0, gpu_hour_price=3.0)
    assert first == {"gpus": 8, "gpuHours": 0.0, "cost": 0.0, "observedAt": 1000.0}
    # Half an hour at 8 GPUs, whatever runs now (the scale-down counts from now on).
    second = spend(first, gpus=2, now=1000.0 + 1800, gpu_hour_price=3.0)
    assert second["gpuHours"] == pytest.approx(4.0) and second["cost"] == pytest.approx(12.0)
    third = spend(second, gpus=0, now=1000.0 + 1800 + 3600, gpu_hour_price=None)
    assert third["gpuHours"] == pytest.approx(6.0) and third["cost"] is None
    assert spend(third, gpus=0, now=1.0, gpu_hour_price=None)["gpuHours"] == pytest.approx(6.0)  # clock skew


def test_the_spec_cost_section_feeds_the_estimate_and_flags_override_it() -> None:
    run = gpu_run(gpuHourPrice=2.0, tokensPerSecond=500.0)
    planned = estimate(run, 1000)
    # min(2000, 833.3) tokens a prompt; 833,334 tokens at 500 tokens/s per GPU.
    assert planned.completion_tokens == 833_334
    assert planned.gpu_hours == pytest.approx(833_334 / 500 / 3600)
    assert planned.wall_hours == pytest.approx(planned.gpu_hours / 8)
    assert planned.cost == pytest.approx(planned.gpu_hours * 2.0)
    assert planned.throughput_source == "given"
    flagged = estimate(run, 1000, Assumptions(gpu_hour_price=4.0))
    assert flagged.cost == pytest.approx(planned.cost * 2)


def test_status_carries_the_estimate_once_prompts_are_counted_then_eta_and_spend() -> None:
    run = gpu_run(gpuHourPrice=3.0)
    assert "estimate" not in cost_status(run, Counts(), {}, Phase.generating, now=10.0)

    counts = Counts(prompts=1000, generated=100, tokens=50_000, tokens_per_second=100.0)
    status = cost_status(run, counts, {"replicas": 2}, Phase.generating, now=10.0)
    assert status["estimate"]["prompts"] == 1000 and status["estimate"]["cost"] == pytest.approx(
        1.0, abs=0.01
    )
    assert "Cosmopedia" in status["estimate"]["source"]
    assert "1000 prompts" in estimate_text(status["estimate"])
    assert status["tokens"] == 50_000 and status["eta"] == "1h15m"  # 900 x 500 / 100 s
    assert status["spend"]["gpus"] == 4  # 2 replicas x 2 GPUs

    later = cost_status(run, counts, {"replicas": 2, **status}, Phase.generating, now=10.0 + 900)
    assert "estimate" not in later  # unchanged: not written again
    assert later["spend"]["gpuHours"] == pytest.approx(1.0) and later["spend"]["cost"] == pytest.approx(3.0)

    over = cost_status(run, counts, {**later, "replicas": 0}, Phase.succeeded, now=10.0 + 1800)
    assert over["eta"] == ""
    # The last interval counts at the GPUs seen before it; none after the end.
    assert over["spend"]["gpuHours"] == pytest.approx(2.0) and over["spend"]["gpus"] == 0


def test_the_report_prices_gpu_hours_at_the_specs_price_unless_told_otherwise(tmp_path: Path) -> None:
    run = gpu_run(gpuHourPrice=3.0)
    store = RunStore.open(str(tmp_path), run.name)
    store.write_text("spec.yaml", dump_run(run))
    assert collect(store)["estimate"]["gpu_hour_price"] == 3.0
    assert collect(store, gpu_hour_price=5.0)["estimate"]["gpu_hour_price"] == 5.0


def test_training_status_comes_from_the_files_the_trainers_write(s3_bucket: str) -> None:
    import asyncio
    import json
    import logging

    from cosmoforge.operator.reconcile import training_status
    from cosmoforge.operator.render import Platform

    document = small_run("trained")
    document["spec"]["training"] = {"preset": "tiny", "evalTasks": ["arc_easy"]}
    document["spec"]["output"] = {"uri": f"s3://{s3_bucket}/runs"}
    run = parse_run(document)
    logger = logging.getLogger("test")
    platform = Platform()
    assert asyncio.run(training_status(run, platform, logger)) == {}  # nothing written yet

    store = RunStore.open(f"s3://{s3_bucket}/runs", "trained")
    latest = {"step": 40, "total_steps": 100, "loss": 3.21234, "tokens_per_second": 1234.56, "mfu": None}
    store.write_text("checkpoints/progress.json", json.dumps({"latest": latest}))
    assert asyncio.run(training_status(run, platform, logger)) == {
        "step": 40, "totalSteps": 100, "loss": 3.2123, "tokensPerSecond": 1234.6,
    }  # fmt: skip
    store.write_text("eval/results.json", json.dumps({"tasks": [{"task": "arc_easy", "acc_norm": 0.41239}]}))
    assert asyncio.run(training_status(run, platform, logger))["evaluation"] == {"arc_easy": 0.4124}
    store.write_text("eval/results.json", "{half a file")
    assert asyncio.run(training_status(run, platform, logger)) == {}  # read again on the next pass
