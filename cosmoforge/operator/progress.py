"""Where a run stands, decided from what is observed: pure functions the handlers feed.

A level-based operator must be able to recompute the phase from scratch after any restart, so
the phase is derived from observations (queue state, the dispatcher's counts, Jobs' ends, the
stages recorded as done in status), never from remembering which handler ran last.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from cosmoforge.operator.render import Stage
from cosmoforge.queue.state import QueueState
from cosmoforge.redaction import redact_urls
from cosmoforge.spec.model import Phase

TERMINAL = frozenset({Phase.succeeded, Phase.failed, Phase.cancelled})


class JobState(StrEnum):
    missing = "missing"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


def job_state(job: Mapping[str, Any] | None) -> JobState:
    if job is None:
        return JobState.missing
    status = job.get("status") or {}
    # An Indexed Job (nanotron across nodes) is done when every index is: the other nodes end
    # before node 0 has converted the checkpoint. A work-queue Job has no completion count.
    completions = int((job.get("spec") or {}).get("completions") or 1)
    if int(status.get("succeeded") or 0) >= completions:
        return JobState.succeeded
    for condition in status.get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "SuccessCriteriaMet"):
            return JobState.succeeded
        if condition.get("status") == "True" and condition.get("type") in ("Failed", "FailureTarget"):
            return JobState.failed
    backoff = int((job.get("spec") or {}).get("backoffLimit", 6))
    if int(status.get("failed") or 0) > backoff:
        return JobState.failed
    return JobState.running


@dataclass(frozen=True)
class Counts:
    prompts: int = 0
    generated: int = 0
    failed: int = 0
    tokens: int = 0  # completion tokens so far
    tokens_per_second: float = 0.0
    done: bool = False
    error: str = ""


def _int(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    return int(value) if isinstance(value, int | float | str) and str(value).strip() else 0


def dispatcher_phase(status: Mapping[str, Any]) -> str:
    """The dispatcher's phase as a bare lowercase word: PHASE_SUCCEEDED, 3 or "Succeeded" -> succeeded."""
    phase = status.get("phase", "")
    names = {1: "pending", 2: "generating", 3: "succeeded", 4: "failed", 5: "cancelled"}
    if isinstance(phase, int):
        return names.get(phase, "")
    return str(phase).lower().removeprefix("phase_")


def counts_from(queue: QueueState | None, dispatcher: Mapping[str, Any] | None) -> Counts:
    """Generation progress: the dispatcher's RunStatus when there is one, the queue's otherwise.

    Without a dispatcher, generation is done once something was published and the queue has
    drained; with one, when it reports the run succeeded (every prompt has a completion or a
    recorded failure) or failed.
    """
    if dispatcher:
        phase = dispatcher_phase(dispatcher)
        rate = dispatcher.get("tokens_per_second", dispatcher.get("tokensPerSecond", 0.0))
        return Counts(
            prompts=_int(dispatcher, "prompts"),
            generated=_int(dispatcher, "generated"),
            failed=_int(dispatcher, "failed"),
            tokens=_int(dispatcher, "tokens"),
            tokens_per_second=float(rate or 0.0),
            done=phase == "succeeded",
            error=str(dispatcher.get("message") or phase) if phase in ("failed", "cancelled") else "",
        )
    if queue is None:
        return Counts()
    done = queue.published > 0 and queue.depth == 0 and queue.stored == 0
    return Counts(prompts=queue.published, generated=max(0, queue.published - queue.depth), done=done)


def progress_text(counts: Counts) -> str:
    if counts.prompts <= 0:
        return ""
    finished = min(counts.prompts, counts.generated + counts.failed)
    return f"{finished}/{counts.prompts} ({100.0 * finished / counts.prompts:.0f}%)"


def eta_seconds(counts: Counts) -> float | None:
    """Seconds until every prompt has an answer, at the current pace; None before there is a pace.

    The pace is tokens/s over the tokens a finished prompt took so far: document counts move in
    shard-sized steps, tokens/s moves smoothly.
    """
    remaining = counts.prompts - counts.generated - counts.failed
    if counts.prompts > 0 and remaining <= 0:
        return 0.0
    if counts.generated <= 0 or counts.tokens <= 0 or counts.tokens_per_second <= 0:
        return None
    return remaining * (counts.tokens / counts.generated) / counts.tokens_per_second


def duration_text(seconds: float | None) -> str:
    """A short duration for a printer column: 45s, 12m, 3h20m, 2d4h; "" when unknown."""
    if seconds is None:
        return ""
    whole = round(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m" if minutes else f"{secs}s"


def spend(
    previous: Mapping[str, Any] | None, gpus: int, now: float, gpu_hour_price: float | None
) -> dict[str, Any]:
    """GPU-hours used so far: the GPUs the last reconcile saw, for the time since it; `gpus` now.

    Kept in the status so it survives an operator restart; time while the operator was down is
    counted at the GPUs it last saw, which is what the cluster kept running.
    """
    previous = previous or {}
    hours = float(previous.get("gpuHours") or 0.0)
    since, seen = previous.get("observedAt"), previous.get("gpus")
    if isinstance(since, int | float) and isinstance(seen, int) and now > since:
        hours += seen * (now - since) / 3600
    cost = round(hours * gpu_hour_price, 2) if gpu_hour_price is not None else None
    return {"gpus": gpus, "gpuHours": round(hours, 6), "cost": cost, "observedAt": now}


@dataclass(frozen=True)
class Step:
    """What to do now: the phase to report, Jobs to create or delete, or the stage that failed.

    `start`: create the stage's Jobs (its own and its pool's); `pool`: create the stage's worker
    pool, which is missing while the stage runs; `stop`: delete these Jobs (by component), a
    pool whose work is over or cannot finish, or the rest of a failed stage; `failed_part`: the
    component whose Job failed `failed`.
    """

    phase: Phase
    start: Stage | None = None
    failed: Stage | None = None
    failed_part: str = ""
    pool: Stage | None = None
    stop: tuple[str, ...] = ()


def next_step(
    stages: Sequence[Stage], jobs: Mapping[str, JobState], generation_done: bool, finished: Sequence[str]
) -> Step:
    """Stages run one at a time, in order, each after the previous one succeeded.

    `jobs` holds the state of each Job by component. A stage with a worker pool is over when
    its own Job is; the pool failing fails it too. A pool whose pods all ended while the stage
    runs (idle workers leave; a node drain ends them cleanly) is deleted, to be created again
    on the next pass; once the stage is over, a pool still running is deleted.
    """
    if not generation_done:
        return Step(Phase.generating)
    stop: list[str] = []
    for stage in stages:
        state = JobState.succeeded if stage.name in finished else jobs.get(stage.name, JobState.missing)
        part = stage.pool.part if stage.pool is not None else ""
        pool = jobs.get(part, JobState.missing) if part else None
        running_pool = [part] if pool == JobState.running else []
        if state == JobState.succeeded:
            stop += running_pool
            continue
        if state == JobState.failed:
            return Step(Phase.failed, failed=stage, failed_part=stage.name, stop=(*stop, *running_pool))
        if pool == JobState.failed:
            rest = [stage.name] if state == JobState.running else []
            return Step(Phase.failed, failed=stage, failed_part=part, stop=(*stop, *rest))
        if state == JobState.missing:
            return Step(stage.phase, start=stage, stop=tuple(stop))
        if pool == JobState.succeeded:
            return Step(stage.phase, stop=(*stop, part))
        if pool == JobState.missing:
            return Step(stage.phase, pool=stage, stop=tuple(stop))
        return Step(stage.phase, stop=tuple(stop))
    return Step(Phase.succeeded, stop=tuple(stop))


FAILURE_LINE_CHARS = 400


def failure_line(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a stage's Job failed, in the command's own words: the last line of the newest failed
    container's termination message (its log's tail, as FallbackToLogsOnError keeps it)."""
    ended = [
        (state.get("finishedAt") or "", state.get("message") or "")
        for pod in pods
        for status in (pod.get("status") or {}).get("containerStatuses") or []
        if (state := (status.get("state") or {}).get("terminated") or {}) and state.get("exitCode")
    ]
    for _, message in sorted(ended, reverse=True):
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        if lines:
            return redact_urls(lines[-1])[:FAILURE_LINE_CHARS]
    return None


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Sequence[Mapping[str, Any]], kind: str, status: bool, reason: str, message: str = ""
) -> list[dict[str, Any]]:
    """Conditions with `kind` set; its transition time moves only when its status changes."""
    value = "True" if status else "False"
    result: list[dict[str, Any]] = []
    found = False
    for condition in conditions:
        if condition.get("type") != kind:
            result.append(dict(condition))
            continue
        found = True
        moved = condition.get("status") != value
        stamp = now_text() if moved else condition.get("lastTransitionTime") or now_text()
        result.append(
            {"type": kind, "status": value, "reason": reason, "message": message, "lastTransitionTime": stamp}
        )
    if not found:
        result.append(
            {
                "type": kind,
                "status": value,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now_text(),
            }
        )
    return result


def condition(conditions: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == kind), None)


def is_true(conditions: Sequence[Mapping[str, Any]], kind: str) -> bool:
    found = condition(conditions, kind)
    return found is not None and found.get("status") == "True"
