"""One level-based reconcile of a GenerationRun: observe, decide, act, write status.

Every handler that reacts to a run (create, resume, spec update, the timer) calls `reconcile`,
which recomputes the run's state from what it observes (the spec, the children, the queue, the
dispatcher, the stages recorded in status) and converges the children towards it. That makes
the operator idempotent by construction: an operator restart, a replayed watch event or a child
deleted by hand lead to the same result. Data in object storage is never deleted here.

Outside Kubernetes the run is its key, `<namespace>/<name>` (`render.run_key`): the dispatcher,
the queue and storage know it by that. A dispatcher that already runs the key with another spec
(the run was created again while its predecessor could not be cancelled) fails the run with a
`Registered=False/SpecConflict` condition instead of being asked again on every pass.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kopf

from cosmoforge.generation import metrics
from cosmoforge.generation.load import saturation as saturated_share
from cosmoforge.operator import autoscale
from cosmoforge.operator.advance import advance, cluster_first
from cosmoforge.operator.children import adopt_and_apply, pause_keda, scale
from cosmoforge.operator.dispatch import QueueProbe, dispatcher_status, register_run
from cosmoforge.operator.kube import DEPLOYMENT, Kube
from cosmoforge.operator.progress import (
    TERMINAL,
    Counts,
    condition,
    counts_from,
    duration_text,
    eta_seconds,
    is_true,
    progress_text,
    set_condition,
    spend,
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
    with_topics_from,
    workloads,
)
from cosmoforge.operator.render.common import run_key
from cosmoforge.queue.state import QueueState
from cosmoforge.runs.plan import assumptions_of, estimate
from cosmoforge.spec.model import GenerationRun, Phase, SpecError, dump_run
from cosmoforge.spec.problems import summary
from cosmoforge.spec.validation import validate_document_async

Logger = logging.Logger | logging.LoggerAdapter[Any]
Conditions = list[dict[str, Any]]
CONFLICT = "SpecConflict"


class SpecConflict(Exception):
    """The dispatcher runs the run's key with another spec and refuses this one."""


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
    accepted = await _accept(body, patch, status, platform, logger)
    if accepted is None:
        return
    run, phase, conditions = accepted
    kube: Kube = memo.kube
    if phase in TERMINAL:
        await scale(kube, run, 0)
        patch.status["replicas"] = 0
        patch.status["conditions"] = conditions
        return
    outputs = dict(status.get("outputs") or {})
    clustering, conditions = await cluster_first(body, kube, run, platform, outputs, conditions)
    if clustering is not None:
        # Prompts wait for the topics: no registration and no generators yet, and the server
        # keeps at least one replica, for the labeller, whatever the (empty) queue says.
        pending = Generation(None, registered=False, counts=Counts(), done=False)
        servers = 0 if clustering in TERMINAL else initial_replicas(run)
        units = await _converge_workloads(body, kube, run, platform, pending, memo, replicas=servers)
        write_status(patch, clustering, pending.counts, units, outputs, conditions, body)
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
    except SpecConflict as error:
        conflict(body, patch, conditions, str(error), logger)
        return
    generation, conditions = _generation(body, queue_state, registered, dispatched, conditions)
    units = await _converge_workloads(body, kube, run, platform, generation, memo)

    if generation.counts.error:
        phase = Phase.failed
        conditions = set_condition(conditions, "Failed", True, "GenerationFailed", generation.counts.error)
        kopf.warn(body, reason="GenerationFailed", message=generation.counts.error)
    else:
        phase, conditions = await advance(
            body, kube, run, platform, generation.done, outputs, conditions, logger
        )
    if "compact" in outputs:  # named only once it exists: status never points at data to come
        outputs["dataset"] = outputs["compact"]
    if phase in TERMINAL:
        await scale(kube, run, 0)
        units = 0
    suspended = run.spec.suspend
    conditions = set_condition(conditions, "Suspended", suspended, "SpecSuspend" if suspended else "Running")
    write_status(patch, phase, generation.counts, units, outputs, conditions, body)
    costs = cost_status(run, generation.counts, status, phase, time.time())
    if costs.get("estimate"):
        kopf.info(body, reason="Estimate", message=estimate_text(costs["estimate"]))
    patch.status.update(costs)
    # While training and evaluation run, and once more as the run ends, for the final figures.
    finishing = phase == Phase.succeeded and phase_of(status) != Phase.succeeded
    if phase in (Phase.training, Phase.evaluating) or finishing:
        trained = await training_status(run, platform, logger)
        if trained:
            patch.status["training"] = trained
    export_costs(run_key(run), generation.counts, costs)
    if phase != phase_of(status):
        kopf.info(body, reason="Phase", message=f"{phase_of(status)} -> {phase}")


async def _accept(
    body: kopf.Body, patch: kopf.Patch, status: Mapping[str, Any], platform: Platform, logger: Logger
) -> tuple[GenerationRun, Phase, Conditions] | None:
    """The run, its phase and conditions if its spec is usable here; else rejected, and None."""
    conditions = list(status.get("conditions") or [])
    phase = phase_of(status)
    try:
        source = f"{body.metadata.namespace}/{body.metadata.name}"
        # Off the event loop: checking template overrides may take seconds.
        run = await validate_document_async(document_of(body), source, platform.storage_policy())
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
    if phase == Phase.failed and conflict_resolved(conditions, body.metadata.get("generation"), status):
        phase = Phase.pending
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
    replicas: int | None = None,
) -> int:
    """Server, Service, generators and scaler as decided for this pass (or with `replicas`
    servers); the server replicas."""
    namespace = namespace_of(body)
    if replicas is None:
        server = await kube.get(DEPLOYMENT, namespace, child_name(run.name, "inference"))
        saturated = await observe_saturation(memo.queue, run)
        units = decide_replicas(run, server, generation.queue, generation.done, memo, saturated)
    else:
        units = 0 if run.spec.suspend else replicas
    keda = run.spec.generation.autoscaling.mode == "keda"
    for manifest in workloads(run, platform, units):
        if manifest["metadata"]["labels"][COMPONENT_LABEL] == "generator" and not generation.registered:
            continue  # workers read the spec the dispatcher writes: start them after registration
        await adopt_and_apply(kube, body, manifest, keep_replicas=keda)
    if keda:
        await pause_keda(kube, run, namespace, paused=units == 0)
    return units


def conflict_resolved(conditions: Conditions, generation: int | None, status: Mapping[str, Any]) -> bool:
    """A run failed on a spec conflict is registered once more after its spec changes, never
    on a timer: the dispatcher would refuse the same spec again and again."""
    registered = condition(conditions, "Registered")
    if registered is None or registered.get("reason") != CONFLICT:
        return False
    return generation is not None and generation != status.get("observedGeneration")


def conflict(
    body: kopf.Body, patch: kopf.Patch, conditions: Conditions, message: str, logger: Logger
) -> None:
    """The dispatcher keeps another spec under this run's key: phase Failed, a condition and an
    event that say what to do; the operator does not ask again until the spec changes."""
    logger.warning(message)
    patch.status["phase"] = Phase.failed.value
    patch.status["conditions"] = set_condition(conditions, "Registered", False, CONFLICT, message)
    generation = body.metadata.get("generation")
    if generation is not None:
        patch.status["observedGeneration"] = generation
    kopf.warn(body, reason=CONFLICT, message=message)


def reject(
    body: kopf.Body,
    patch: kopf.Patch,
    conditions: Conditions,
    problems: Sequence[tuple[str, str]],
    logger: Logger,
) -> None:
    """An unusable spec: phase Failed, a condition and an event naming field and reason; no children."""
    message = summary(problems)  # short, and no data rows or secrets: many people read Events
    logger.warning(f"invalid spec: {message}")
    patch.status["phase"] = Phase.failed.value
    patch.status["conditions"] = set_condition(conditions, "Valid", False, "InvalidSpec", message)
    kopf.warn(body, reason="InvalidSpec", message=message)


async def observe_queue(
    probe: QueueProbe, run: GenerationRun, owns_queue: bool, logger: Logger
) -> QueueState | None:
    """The run's queue; without a dispatcher the operator owns its stream and consumer."""
    key = run_key(run)
    try:
        if owns_queue:
            await probe.ensure_topology(run)
        return await probe.state(key)
    except Exception as error:  # NATS down or restarting: keep replicas, try again next tick
        logger.warning(f"queue of {run.name} unreachable: {error!r}")
        await probe.close()
        return None


async def register(
    run: GenerationRun, platform: Platform, conditions: Conditions, logger: Logger
) -> tuple[bool, dict[str, Any] | None, Conditions]:
    """Register the run with the dispatcher once, then read its status on every pass.

    A dispatcher that no longer knows the run gets it again: starting a known run resumes it,
    and nothing already generated is queued twice. A spec the dispatcher refuses fails the run,
    and so does another spec already active under the key (SpecConflict): asking again would
    not change the answer. Only an unreachable dispatcher is asked again on the next pass.
    """
    if not platform.dispatcher:
        conditions = set_condition(conditions, "Registered", True, "NoDispatcher", "queue fed externally")
        return True, None, conditions
    status: dict[str, Any] | None = None
    key = run_key(run)
    if is_true(conditions, "Registered"):
        try:
            status = await dispatcher_status(platform.dispatcher, key)
        except Exception as error:
            if error_code(error) != "NOT_FOUND":
                logger.warning(f"dispatcher status for {run.name} failed: {error!r}")
                return True, None, conditions
    if status is None:
        runnable = with_topics_from(run, platform).model_copy(deep=True)
        runnable.spec.output.uri = output_uri(run, platform)
        try:
            status = await register_run(platform.dispatcher, dump_run(runnable))
        except Exception as error:
            if error_code(error) == "INVALID_ARGUMENT":
                problems = getattr(error, "problems", None) or [("spec", str(error))]
                raise SpecError("dispatcher", list(problems)) from error
            if error_code(error) == "FAILED_PRECONDITION":
                raise SpecConflict(conflict_message(key, getattr(error, "details", str(error)))) from error
            logger.warning(f"registering {run.name} with the dispatcher failed: {error!r}")
            reason = "DispatcherUnavailable"
            conditions = set_condition(conditions, "Registered", False, reason, str(error)[:500])
            return False, None, conditions
        conditions = set_condition(conditions, "Registered", True, "Dispatched", platform.dispatcher)
    return True, status, conditions


def conflict_message(key: str, details: str) -> str:
    """One line for the condition and the event: what the dispatcher said, and the way out."""
    first = (details.splitlines() or [""])[0][:300]
    return (
        f"the dispatcher refused {key}: {first}. Cancel it there (`cosmo cancel {key}`) or wait "
        "for it to end, then change this spec or create the GenerationRun again"
    )


def error_code(error: Exception) -> str:
    """The gRPC status name of a dispatcher error ("NOT_FOUND", ...), or "" for anything else."""
    code = getattr(error, "code", "")
    if callable(code):
        code = code()
    return str(getattr(code, "name", code) or "")


async def observe_saturation(probe: QueueProbe, run: GenerationRun) -> float | None:
    """Share of the run's workers that find their server full, when the run scales on it; None
    when it does not, or when no worker answers (the autoscaler then falls back to depth)."""
    scaling = run.spec.generation.autoscaling
    if scaling.mode != "builtin" or scaling.signal != "saturation" or not deploys_server(run):
        return None
    try:
        return saturated_share(await probe.loads(run_key(run)))
    except Exception as error:  # NATS away: the queue probe reports it; scale on depth meanwhile
        logging.getLogger(__name__).warning(f"load of {run.name}'s workers unknown: {error!r}")
        return None


def decide_replicas(
    run: GenerationRun,
    server: Mapping[str, Any] | None,
    queue_state: QueueState | None,
    generation_done: bool,
    memo: kopf.Memo,
    saturation: float | None = None,
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
        saturation=saturation,
        waiting=queue_state.waiting if queue_state is not None else 0,
        ready=int((server or {}).get("status", {}).get("readyReplicas") or 0) if server else None,
    )
    memo["history"] = decision.history
    return decision.replicas


def cost_status(
    run: GenerationRun, counts: Counts, status: Mapping[str, Any], phase: Phase, now: float
) -> dict[str, Any]:
    """Status fields for people who pay: the estimate once the prompts are counted (before any
    completion, so before the GPUs have cost much), tokens so far, the ETA and the spend so far.

    The spend counts the inference GPUs the last reconcile saw (status `replicas`); an external
    endpoint's GPUs are not this run's to count.
    """
    assumptions = assumptions_of(run)
    fields: dict[str, Any] = {"tokens": counts.tokens}
    previous = status.get("estimate") or {}
    if counts.prompts > 0 and previous.get("prompts") != counts.prompts:
        planned = estimate(run, counts.prompts, assumptions)
        fields["estimate"] = {
            "prompts": planned.prompts,
            "completionTokens": planned.completion_tokens,
            "gpuHours": _rounded(planned.gpu_hours),
            "wallHours": _rounded(planned.wall_hours),
            "cost": _rounded(planned.cost),
            "source": planned.throughput_source[:200],
        }
    over = phase in TERMINAL
    fields["eta"] = "" if over else duration_text(eta_seconds(counts))
    # A run that ends now adds its last interval and counts no GPU after it (the servers go to
    # zero, and a finished run is not reconciled for cost again).
    gpus = 0 if over or not deploys_server(run) else int(status.get("replicas") or 0)
    gpus *= max(1, run.spec.generation.gpus_per_replica)
    fields["spend"] = spend(status.get("spend"), gpus, now, assumptions.gpu_hour_price)
    return fields


async def training_status(run: GenerationRun, platform: Platform, logger: Logger) -> dict[str, Any]:
    """Step, loss, tokens/s, MFU and the evaluation table, from the files the trainers write in
    the run's folder; {} when there are none yet or storage does not answer in time."""
    if run.spec.training is None:
        return {}

    def read() -> dict[str, Any]:
        from cosmoforge.storage import RunStore
        from cosmoforge.training.metrics import training_summary

        store = RunStore.open(output_uri(run, platform), run_key(run))
        texts = [store.read_text(path) for path in ("checkpoints/progress.json", "eval/results.json")]
        progress, results = (json.loads(text) if text else None for text in texts)
        return training_summary(progress, results)

    try:
        return await asyncio.wait_for(asyncio.to_thread(read), timeout=10)
    except Exception as error:  # storage down or a file half written: the next pass reads again
        logger.warning(f"training progress of {run.name} unreadable: {error!r}")
        return {}


def export_costs(run: str, counts: Counts, costs: Mapping[str, Any]) -> None:
    """The status's cost fields as gauges, for dashboards across runs (an unknown stays unset)."""
    metrics.RUN_TOKENS.labels(run).set(counts.tokens)
    eta = eta_seconds(counts) if costs.get("eta") else None
    if eta is not None:
        metrics.RUN_ETA_SECONDS.labels(run).set(eta)
    spent = costs.get("spend") or {}
    if spent:
        metrics.RUN_GPU_HOURS.labels(run).set(spent["gpuHours"])
        if spent.get("cost") is not None:
            metrics.RUN_COST.labels(run).set(spent["cost"])
    planned = costs.get("estimate") or {}
    if planned.get("cost") is not None:
        metrics.RUN_ESTIMATED_COST.labels(run).set(planned["cost"])


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def estimate_text(planned: Mapping[str, Any]) -> str:
    hours, cost = planned.get("gpuHours"), planned.get("cost")
    text = f"{planned['prompts']} prompts, about {planned['completionTokens']} completion tokens"
    if hours is not None:
        text += f", {hours} GPU-hours ({planned.get('wallHours')} h at replicas.max)"
    if cost is not None:
        text += f", cost {cost}"
    return text


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
