"""The training progress file both trainers write, and the status summary read from it.

The CPU trainer (`cosmo train`) and the nanotron launcher write the same small JSON file,
`progress.json`, into the train stage's output folder (`<run>/checkpoints/`) while they train:
the latest step with its loss, tokens/s and MFU, and a bounded history (the loss curve). The
evaluation writes `results.json` into its own folder. `training_summary` turns the two into
the few numbers a run's status shows, so the operator and `cosmo report` read one shape
whichever trainer ran. Pure functions over parsed JSON; no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

PROGRESS_FILE = "progress.json"
HISTORY = 500


@dataclass(frozen=True)
class ProgressRecord:
    step: int
    total_steps: int
    loss: float
    tokens_per_second: float
    consumed_tokens: int
    learning_rate: float
    time: float
    # 6·parameters·tokens/s over the GPUs' bf16 peak; None on a CPU or an unknown GPU.
    mfu: float | None = None


@dataclass
class Progress:
    """Latest record first, bounded history after."""

    run: str
    latest: ProgressRecord | None = None
    history: list[ProgressRecord] = field(default_factory=list)

    def add(self, record: ProgressRecord) -> None:
        self.latest = record
        self.history = [*self.history, record][-HISTORY:]

    def to_json(self) -> str:
        return json.dumps(
            {
                "run": self.run,
                "latest": asdict(self.latest) if self.latest else None,
                "history": [asdict(record) for record in self.history],
            }
        )


def training_summary(
    progress: Mapping[str, Any] | None, results: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The status's view of training and evaluation (camelCase, as the CR's status fields).

    `step`/`totalSteps`, `loss`, `tokensPerSecond` and `mfu` come from the latest progress
    record; `evaluation` maps each task to its `acc_norm` (the figure the Cosmopedia blog
    compares). Missing inputs give missing keys, never zeros that look measured."""
    summary: dict[str, Any] = {}
    latest = (progress or {}).get("latest")
    if isinstance(latest, Mapping):
        summary["step"] = int(latest["step"])
        summary["totalSteps"] = int(latest["total_steps"])
        summary["loss"] = round(float(latest["loss"]), 4)
        summary["tokensPerSecond"] = round(float(latest["tokens_per_second"]), 1)
        if latest.get("mfu") is not None:
            summary["mfu"] = round(float(latest["mfu"]), 4)
    tasks = (results or {}).get("tasks")
    if isinstance(tasks, list) and tasks:
        summary["evaluation"] = {str(task["task"]): round(float(task["acc_norm"]), 4) for task in tasks}
    return summary
