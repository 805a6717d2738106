"""One level-based reconcile of a GenerationRun: observe, decide, act, write status.

Every handler that reacts to a run (create, resume, spec update, the timer) calls `reconcile`,
which recomputes the run's state from what it observes (the spec, the children, the queue, the
dispatcher, the stages recorded in status) and converges the children towards it. That makes
the operator idempotent by construction: an operator restart, a replayed watch event or a child
deleted by hand lead to the same result. Data in object storage is never deleted here.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kopf

from cosmoforge.operator import autoscale
from cosmoforge.operator.advance import advance
from cosmoforge.operator.children import adopt_and_apply, pause_keda, scale
from cosmoforge.operator.dispatch import QueueProbe, dispatcher_status, register_run
from cosmoforge.operator.kube import DEPLOYMENT, Kube
from cosmoforge.operator.progress import (
    TERMINAL,
    Counts,
    condition,
    counts_from,
    progress_text,
    set_condition,
)
from cosmoforge.operator.render import (
    COMPONENT_LABEL,
    Platform,
    RenderError,
    child_name,
    deploys_server,
    initial_replicas,
    output_uri,
    run_root,
    workloads,
)
from cosmoforge.queue.state import QueueState
from cosmoforge.spec.model import GenerationRun, Phase, SpecError, dump_run
from cosmoforge.spec.validation import validate_document

Logger = logging.Logger | logging.LoggerAdapter[Any]
Conditions = list[dict[str, Any]]


async def reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Logger) -> None:
    """One pass at a time per run: the timer and a spec change must not interleave their acts."""
    lock = memo.get("lock")
    if lock is None:
        lock = memo["lock"] = asyncio.Lock()
    async with lock:
        await _reconcile(body, patch, memo, logger)


def document_of(body: kopf.Body) -> dict[str, Any]:
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": body.metadata.name, "namespace": body.metadata.namespace},
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
    }


def namespace_of(body: kopf.Body) -> str:
    return body.metadata.namespace or "default"


def phase_of(status: Mapping[str, Any]) -> Phase:
    try:
        return Phase(status.get("phase") or Phase.pending)
    except ValueError:
        return Phase.pending


def is_true(conditions: Sequence[Mapping[str, Any]], kind: str) -> bool:
    found = condition(conditions, kind)
    return found is not None and found.get("status") == "True"


@dataclass(frozen=True)
class Generation:
    """What the pass observed of generation: the queue, registration and the counts."""

    queue: QueueState | None
    registered: bool
    counts: Counts
    done: bool


async def _reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Logger) -> None:
    status = dict(body.get("status") or {})
    platform: Platform = memo.platform
    accepted = _accept(body, patch, status, platform, logger)
    if accepted is None:
        return
    run, phase, conditions = accepted
    kube: Kube = memo.kube
    if phase in TERMINAL:
        await scale(kube, run, 0)
        patch.status["replicas"] = 0
        patch.status["conditions"] = conditions
        return
    queue_state = await observe_queue(memo.queue, run, owns_queue=not platform.dispatcher, logger=logger)
    reachable = queue_state is not None
    reason = "StreamReady" if reachable else "QueueUnavailable"
    conditions = set_condition(conditions, "QueueReachable", reachable, reason, platform.nats_url)
    try:
        registered, dispatched, conditions = await register(run, platform, conditions, logger)
    except SpecError as error:
        reject(body, patch, conditions, error.problems, logger)
        return
    generation, conditions = _generation(body, queue_state, registered, dispatched, conditions)
    units = await _converge_workloads(body, kube, run, platform, generation, memo)

    outputs = dict(status.get("outputs") or {})
    outputs.setdefault("dataset", f"{run_root(run, platform)}/dataset")
    if generation.counts.error:
        phase = Phase.failed
        conditions = set_condition(conditions, "Failed", True, "GenerationFailed", generation.counts.error)
        kopf.warn(body, reason="GenerationFailed", message=generation.counts.error)
    else:
        phase, conditions = await advance(
            body, kube, run, platform, generation.done, outputs, conditions, logger
        )
    if phase in TERMINAL:
        await scale(kube, run, 0)
        units = 0
    suspended = run.spec.suspend
    conditions = set_condition(conditions, "Suspended", suspended, "SpecSuspend" if suspended else "Running")
    write_status(patch, phase, generation.counts, units, outputs, conditions, body)
    if phase != phase_of(status):
        kopf.info(body, reason="Phase", message=f"{phase_of(status)} -> {phase}")


def _accept(
    body: kopf.Body, patch: kopf.Patch, status: Mapping[str, Any], platform: Platform, logger: Logger
) -> tuple[GenerationRun, Phase, Conditions] | None:
    """The run, its phase and conditions if its spec is usable here; else rejected, and None."""
    conditions = list(status.get("conditions") or [])
    phase = phase_of(status)
    try:
        run = validate_document(document_of(body), source=f"{body.metadata.namespace}/{body.metadata.name}")
        run_root(run, platform)
    except SpecError as error:
        reject(body, patch, conditions, error.problems, logger)
        return None
    except RenderError as error:
        reject(body, patch, conditions, [(error.field, error.reason)], logger)
        return None
    valid = condition(conditions, "Valid")
    if phase == Phase.failed and valid is not None and valid.get("status") == "False":
        phase = Phase.pending  # the spec was fixed: start over
    conditions = set_condition(conditions, "Valid", True, "SpecAccepted", "the spec is valid")
    return run, phase, conditions


def _generation(
    body: kopf.Body,
    queue_state: QueueState | None,
    registered: bool,
    dispatched: Mapping[str, Any] | None,
    conditions: Conditions,
) -> tuple[Generation, Conditions]:
    """Generation's counts, and whether it is over (once over, it stays over: `Generated`)."""
    counts = counts_from(queue_state, dispatched)
    generated_before = is_true(conditions, "Generated")
    if counts.done and not generated_before:
        conditions = set_condition(conditions, "Generated", True, "QueueDrained", progress_text(counts))
        kopf.info(body, reason="Generated", message=f"generation finished: {progress_text(counts)}")
    done = generated_before or counts.done
    return Generation(queue_state, registered, counts, done), conditions


async def _converge_workloads(
    body: kopf.Body,
    kube: Kube,
    run: GenerationRun,
    platform: Platform,
    generation: Generation,
    memo: kopf.Memo,
) -> int:
    """Server, Service, generators and scaler as decided for this pass; the server replicas."""
    namespace = namespace_of(body)
    server = await kube.get(DEPLOYMENT, namespace, child_name(run.name, "inference"))
    units = decide_replicas(run, server, generation.queue, generation.done, memo)
    keda = run.spec.generation.autoscaling.mode == "keda"
    for manifest in workloads(run, platform, units):
        if manifest["metadata"]["labels"][COMPONENT_LABEL] == "generator" and not generation.registered:
            continue  # workers read the spec the dispatcher writes: start them after registration
        await adopt_and_apply(kube, body, manifest, keep_replicas=keda)
    if keda:
        await pause_keda(kube, run, namespace, paused=units == 0)
    return units


def reject(
    body: kopf.Body,
    patch: kopf.Patch,
    conditions: Conditions,
    problems: Sequence[tuple[str, str]],
    logger: Logger,
) -> None:
    """An unusable spec: phase Failed, a condition and an event naming field and reason; no children."""
    message = "; ".join(f"{field}: {reason}" for field, reason in problems)
    logger.warning(f"invalid spec: {message}")
    patch.status["phase"] = Phase.failed.value
    patch.status["conditions"] = set_condition(conditions, "Valid", False, "InvalidSpec", message)
    kopf.warn(body, reason="InvalidSpec", message=message)


async def observe_queue(
    probe: QueueProbe, run: GenerationRun, owns_queue: bool, logger: Logger
) -> QueueState | None:
    """The run's queue; without a dispatcher the operator owns its stream and consumer."""
    try:
        if owns_queue:
            await probe.ensure_topology(run)
        return await probe.state(run.name)
    except Exception as error:  # NATS down or restarting: keep replicas, try again next tick
        logger.warning(f"queue of {run.name} unreachable: {error!r}")
        await probe.close()
        return None


async def register(
    run: GenerationRun, platform: Platform, conditions: Conditions, logger: Logger
) -> tuple[bool, dict[str, Any] | None, Conditions]:
    """Register the run with the dispatcher once, then read its status on every pass.

    A dispatcher that no longer knows the run gets it again: starting a known run resumes it,
    and nothing already generated is queued twice. A spec the dispatcher refuses fails the run.
    """
    if not platform.dispatcher:
        conditions = set_condition(conditions, "Registered", True, "NoDispatcher", "queue fed externally")
        return True, None, conditions
    status: dict[str, Any] | None = None
    if is_true(conditions, "Registered"):
        try:
            status = await dispatcher_status(platform.dispatcher, run.name)
        except Exception as error:
            if error_code(error) != "NOT_FOUND":
                logger.warning(f"dispatcher status for {run.name} failed: {error!r}")
                return True, None, conditions
    if status is None:
        runnable = run.model_copy(deep=True)
        runnable.spec.output.uri = output_uri(run, platform)
        try:
            status = await register_run(platform.dispatcher, dump_run(runnable))
        except Exception as error:
            if error_code(error) == "INVALID_ARGUMENT":
                problems = getattr(error, "problems", None) or [("spec", str(error))]
                raise SpecError("dispatcher", list(problems)) from error
            logger.warning(f"registering {run.name} with the dispatcher failed: {error!r}")
            reason = "DispatcherUnavailable"
            conditions = set_condition(conditions, "Registered", False, reason, str(error)[:500])
            return False, None, conditions
        conditions = set_condition(conditions, "Registered", True, "Dispatched", platform.dispatcher)
    return True, status, conditions


def error_code(error: Exception) -> str:
    """The gRPC status name of a dispatcher error ("NOT_FOUND", ...), or "" for anything else."""
    code = getattr(error, "code", "")
    if callable(code):
        code = code()
    return str(getattr(code, "name", code) or "")


def decide_replicas(
    run: GenerationRun,
    server: Mapping[str, Any] | None,
    queue_state: QueueState | None,
    generation_done: bool,
    memo: kopf.Memo,
) -> int:
    """Server replicas (or, with an external endpoint, 1 while generators should run, else 0)."""
    generation = run.spec.generation
    if not deploys_server(run):
        return 0 if run.spec.suspend or generation_done else 1
    current = int((server or {}).get("spec", {}).get("replicas", initial_replicas(run))) if server else None
    if generation.autoscaling.mode == "keda":
        stopped = run.spec.suspend or generation_done
        return 0 if stopped else (current if current is not None else initial_replicas(run))
    decision = autoscale.decide(
        current=current if current is not None else initial_replicas(run),
        depth=queue_state.depth if queue_state is not None else None,
        done=generation_done,
        suspended=run.spec.suspend,
        target_per_replica=generation.autoscaling.target_queue_per_replica,
        minimum=generation.replicas.min,
        maximum=generation.replicas.max,
        window=generation.autoscaling.stabilization_seconds,
        now=time.monotonic(),
        history=memo.get("history", ()),
    )
    memo["history"] = decision.history
    return decision.replicas


def write_status(
    patch: kopf.Patch,
    phase: Phase,
    counts: Counts,
    replicas: int,
    outputs: Mapping[str, str],
    conditions: Conditions,
    body: kopf.Body,
) -> None:
    patch.status["phase"] = phase.value
    patch.status["prompts"] = counts.prompts
    patch.status["generated"] = counts.generated
    patch.status["failed"] = counts.failed
    patch.status["progress"] = progress_text(counts)
    patch.status["tokensPerSecond"] = round(counts.tokens_per_second, 1)
    patch.status["replicas"] = replicas
    patch.status["outputs"] = dict(outputs)
    patch.status["conditions"] = conditions
    generation = body.metadata.get("generation")
    if generation is not None:
        patch.status["observedGeneration"] = generation
