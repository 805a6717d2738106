"""The post-generation stage chain of a run: which stages run, in what order, reading what.

Three drivers run the same chain (the operator's Jobs, the embedded runner and the distributed
decontamination submitter); each used to spell out "dedup reads dataset/, decontamination reads
dedup/kept.parquet when dedup ran", and such copies drift. This module says it once, as a pure
function of the spec, with folders relative to the run root (`<output.uri>/<run>/`), so each
driver only joins them to its own root.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cosmoforge.spec.model import GenerationRunSpec, Phase
from cosmoforge.storage import DATASET, GENERATIONS, KEPT

StageName = Literal["compact", "dedup", "decontaminate", "tokenize", "train", "evaluate", "publish"]

# What the publish stage writes in the run root: a record of the last push (repo, commit, files).
PUBLISH = "publish"


@dataclass(frozen=True)
class PlannedStage:
    """One post-generation stage: its name, the run phase it shows, and where it reads and writes.

    `input` and `output` are relative to the run root: a folder or a file inside one.
    """

    name: StageName
    phase: Phase
    input: str
    output: str


class StageDisabled(LookupError):
    """The spec does not run the stage asked about."""


def post_stages(spec: GenerationRunSpec) -> list[PlannedStage]:
    """The enabled stages after generation, in order; each reads what the one before kept.

    Compaction comes first: the operator runs it as a Job (`cosmo compact`), the embedded driver
    in-process at the end of generation, where it also counts the run's outcome."""
    result = [PlannedStage("compact", Phase.compacting, GENERATIONS, DATASET)]
    current = DATASET
    postprocess = spec.postprocess
    if postprocess.dedup.enabled:
        result.append(PlannedStage("dedup", Phase.deduplicating, current, "dedup"))
        current = f"dedup/{KEPT}"
    if postprocess.decontaminate.enabled:
        result.append(PlannedStage("decontaminate", Phase.decontaminating, current, "decontam"))
        current = f"decontam/{KEPT}"
    training = spec.training
    if training is not None and training.enabled:
        result.append(PlannedStage("tokenize", Phase.training, current, "tokens"))
        result.append(PlannedStage("train", Phase.training, "tokens", "checkpoints"))
        if training.evaluate:
            result.append(PlannedStage("evaluate", Phase.evaluating, "checkpoints", "eval"))
    if spec.output.hub is not None:
        # Last, so what is published is what the whole chain ran on; it reads the final documents
        # (training reads them too and changes nothing).
        result.append(PlannedStage("publish", Phase.publishing, current, PUBLISH))
    return result


def stage(spec: GenerationRunSpec, name: StageName) -> PlannedStage:
    """The named stage as the spec runs it; `StageDisabled` when the spec leaves it out."""
    for planned in post_stages(spec):
        if planned.name == name:
            return planned
    raise StageDisabled(f"the spec does not run the {name} stage")


def stage_input(spec: GenerationRunSpec, name: StageName) -> str:
    """Where the named stage reads, relative to the run root (e.g. `dedup/kept.parquet`)."""
    return stage(spec, name).input


def final_data(spec: GenerationRunSpec) -> str:
    """The documents the data stages end with: the last one's kept file, else the dataset."""
    data = [s for s in post_stages(spec) if s.name in ("dedup", "decontaminate")]
    return f"{data[-1].output}/{KEPT}" if data else DATASET
