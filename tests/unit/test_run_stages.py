"""The post-generation stage chain, as every driver reads it: one table of specs and plans."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import small_run
from cosmoforge.runs.stages import (
    KEPT,
    PlannedStage,
    StageDisabled,
    final_data,
    post_stages,
    stage_input,
)
from cosmoforge.spec.model import GenerationRunSpec, Phase, parse_run

COMPACT = ("compact", Phase.compacting, "generations", "dataset")  # always first: shards -> dataset
DEDUP = ("dedup", Phase.deduplicating, "dataset", "dedup")
DECONTAM_AFTER_DEDUP = ("decontaminate", Phase.decontaminating, "dedup/kept.parquet", "decontam")
DECONTAM_ALONE = ("decontaminate", Phase.decontaminating, "dataset", "decontam")
TRAIN = ("train", Phase.training, "tokens", "checkpoints")
EVALUATE = ("evaluate", Phase.evaluating, "checkpoints", "eval")


def spec_of(dedup: bool, decontam: bool, training: dict[str, Any] | None) -> GenerationRunSpec:
    document = small_run()
    document["spec"]["postprocess"] = {"dedup": {"enabled": dedup}, "decontaminate": {"enabled": decontam}}
    if training is not None:
        document["spec"]["training"] = training
    return parse_run(document).spec


@pytest.mark.parametrize(
    ("dedup", "decontam", "training", "expected"),
    [
        (False, False, None, []),
        (True, False, None, [DEDUP]),
        (False, True, None, [DECONTAM_ALONE]),
        (True, True, None, [DEDUP, DECONTAM_AFTER_DEDUP]),
        (True, True, {"enabled": False}, [DEDUP, DECONTAM_AFTER_DEDUP]),
        (
            True,
            True,
            {},
            [
                DEDUP,
                DECONTAM_AFTER_DEDUP,
                ("tokenize", Phase.training, "decontam/kept.parquet", "tokens"),
                TRAIN,
                EVALUATE,
            ],
        ),
        (
            True,
            False,
            {"evaluate": False},
            [DEDUP, ("tokenize", Phase.training, "dedup/kept.parquet", "tokens"), TRAIN],
        ),
        (False, False, {}, [("tokenize", Phase.training, "dataset", "tokens"), TRAIN, EVALUATE]),
    ],
)
def test_stages_follow_the_spec_and_read_what_the_previous_one_kept(
    dedup: bool, decontam: bool, training: dict[str, Any] | None, expected: list[tuple[Any, ...]]
) -> None:
    spec = spec_of(dedup, decontam, training)
    assert post_stages(spec) == [PlannedStage(*row) for row in [COMPACT, *expected]]


@pytest.mark.parametrize(
    ("dedup", "decontam", "final"),
    [
        (False, False, "dataset"),
        (True, False, f"dedup/{KEPT}"),
        (False, True, f"decontam/{KEPT}"),
        (True, True, f"decontam/{KEPT}"),
    ],
)
def test_final_data_is_what_the_last_filter_kept(dedup: bool, decontam: bool, final: str) -> None:
    spec = spec_of(dedup, decontam, {})
    assert final_data(spec) == final
    assert stage_input(spec, "tokenize") == final  # training reads exactly that


def test_stage_input_names_one_stage_and_refuses_a_disabled_one() -> None:
    assert stage_input(spec_of(True, True, None), "decontaminate") == "dedup/kept.parquet"
    assert stage_input(spec_of(False, True, None), "decontaminate") == "dataset"
    with pytest.raises(StageDisabled, match="decontaminate"):
        stage_input(spec_of(True, False, None), "decontaminate")
    with pytest.raises(StageDisabled, match="evaluate"):
        stage_input(spec_of(True, True, {"evaluate": False}), "evaluate")
