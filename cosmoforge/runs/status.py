"""A run's status as the dispatcher reports it, and the pure rules that move it.

Kept free of I/O so the decisions that matter — when a run is finished, whether it failed, how
worker events add up — are plain functions with plain tests. The queue's own rules (its limits,
when it is drained) live with the queue, in `cosmoforge.queue`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cosmoforge.spec.model import Phase

ACTIVE = frozenset({Phase.pending.value, Phase.generating.value})
FINAL = frozenset({Phase.succeeded.value, Phase.failed.value, Phase.cancelled.value})
PHASES = [Phase.pending.value, Phase.generating.value, *sorted(FINAL)]


@dataclass
class RunStatus:
    run: str
    phase: str = Phase.pending.value
    prompts: int = 0
    already_done: int = 0
    published: int = 0
    generated: int = 0
    failed: int = 0
    queued: int = 0
    in_flight: int = 0
    tokens: int = 0
    tokens_per_second: float = 0.0
    output_uri: str = ""
    message: str = ""
    errors: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    updated_at: float = 0.0

    @property
    def final(self) -> bool:
        return self.phase in FINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunStatus:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class WorkerEvent:
    generated: int = 0
    failed: int = 0
    tokens: int = 0
    errors: Mapping[str, int] = field(default_factory=dict)


def parse_event(data: bytes) -> WorkerEvent | None:
    """A generator's flush event, or None for anything malformed (never fatal to the dispatcher)."""
    try:
        raw = json.loads(data)
        errors = raw.get("errors") or {}
        return WorkerEvent(
            generated=int(raw.get("generated", 0)),
            failed=int(raw.get("failed", 0)),
            tokens=int(raw.get("tokens", 0)),
            errors={str(kind): int(count) for kind, count in errors.items()},
        )
    except (ValueError, TypeError, AttributeError):
        return None


def apply_event(status: RunStatus, event: WorkerEvent) -> None:
    """Live counts from worker events; redeliveries can overcount, so they stay within the manifest."""
    status.generated += event.generated
    status.failed += event.failed
    if status.prompts:
        status.generated = min(status.generated, status.prompts)
        status.failed = min(status.failed, status.prompts - status.generated)
    status.tokens += event.tokens
    for kind, count in event.errors.items():
        status.errors[kind] = status.errors.get(kind, 0) + count


@dataclass(frozen=True)
class Outcome:
    phase: str
    message: str


def outcome(prompts: int, generated: int, failed: int, samples: Mapping[str, tuple[int, str]]) -> Outcome:
    """The final phase and message once the queue is drained and storage is counted.

    `samples` maps each error kind to (prompts failed with it, one error message) so that the
    message says what went wrong, not only how often.
    """
    missing = prompts - generated - failed
    failures = failure_summary(samples)
    if missing > 0:
        text = f"{missing} of {prompts} prompts have neither a completion nor a recorded failure"
        return Outcome(Phase.failed.value, f"{text}; {failures}" if failures else text)
    if prompts == 0:
        return Outcome(Phase.succeeded.value, "the spec yields no prompts")
    if generated == 0:
        return Outcome(Phase.failed.value, f"all {prompts} prompts failed: {failures}")
    if failed:
        return Outcome(Phase.succeeded.value, f"{generated} generated, {failed} failed: {failures}")
    return Outcome(Phase.succeeded.value, f"all {prompts} prompts generated")


def failure_summary(samples: Mapping[str, tuple[int, str]], width: int = 300) -> str:
    parts = []
    for kind, (count, example) in sorted(samples.items(), key=lambda item: -item[1][0]):
        example = " ".join(example.split())
        example = example if len(example) <= width else example[: width - 1] + "…"
        parts.append(f"{kind} x{count} (e.g. {example})")
    return "; ".join(parts)
