"""kopf handlers for GenerationRun: one level-based reconcile, run on change and on a timer.

Every handler calls the same `reconcile`, which recomputes the run's state from what it
observes (the spec, the children, the queue, the dispatcher, finished stages in status) and
converges the children towards it. That makes the operator idempotent by construction: an
operator restart, a replayed watch event or a child deleted by hand lead to the same result,
and children are named deterministically so a second create is a conflict, never a duplicate.
Data in object storage is never deleted here.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from cosmoforge.crd import PLURAL
from cosmoforge.operator import autoscale
from cosmoforge.operator.dispatch import QueueProbe, dispatcher_status, register_run
from cosmoforge.operator.kube import CHILD_KINDS, DEPLOYMENT, JOB, SCALED_OBJECT, Kube, KubeError, kind_of
from cosmoforge.operator.progress import (
    TERMINAL,
    Counts,
    JobState,
    QueueState,
    condition,
    counts_from,
    job_state,
    next_step,
    progress_text,
    set_condition,
)
from cosmoforge.operator.render import (
    COMPONENT_LABEL,
    MANAGED_BY,
    RUN_LABEL,
    Platform,
    RenderError,
    child_name,
    deploys_server,
    generator_replicas,
    initial_replicas,
    output_uri,
    pool_job,
    run_root,
    stage_jobs,
    stages,
    workloads,
)
from cosmoforge.spec import API_GROUP, API_VERSION, GenerationRun, Phase, SpecError, dump_run
from cosmoforge.validation import validate_document

Logger = logging.Logger | logging.LoggerAdapter[Any]
INTERVAL = float(os.environ.get("COSMO_OPERATOR_INTERVAL", "10"))
FINALIZER = f"{API_GROUP}/finalizer"
KEDA_PAUSE = "autoscaling.keda.sh/paused-replicas"

_connection: dict[str, kopf.ConnectionInfo] = {}


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's own login, remembered so the children client uses the same credentials."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        _connection["info"] = info
    return info


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    # The chart installs the CRD, and one replica runs: no cluster-wide discovery, no peering.
    settings.scanning.disabled = True
    settings.peering.standalone = True
    settings.posting.enabled = os.environ.get("COSMO_OPERATOR_EVENTS", "1") != "0"
    platform = Platform.from_env()
    memo.platform = platform
    memo.queue = QueueProbe(platform.nats_url)
    memo.kube = Kube(lambda: _connection.get("info"))


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    await memo.queue.close()
    await memo.kube.close()


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
async def apply_run(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    await reconcile(body, patch, memo, logger)


@kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=INTERVAL, initial_delay=INTERVAL)
async def follow_run(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    """Autoscaling, status roll-up and the next stage, every INTERVAL seconds."""
    await reconcile(body, patch, memo, logger)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL)
async def remove_children(body: kopf.Body, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    """Stop the work: delete every child. Prompts, shards and datasets in storage stay."""
    namespace, name = _namespace(body), body.metadata.name
    removed = 0
    for kind in CHILD_KINDS:
        for item in await memo.kube.list(kind, namespace, {RUN_LABEL: name}):
            if _owned_by(item, body):
                removed += await memo.kube.delete(kind, namespace, item["metadata"]["name"])
    logger.info(f"removed {removed} children of {name}; its data stays in storage")


# --- reconcile ----------------------------------------------------------------------------


async def reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Logger) -> None:
    lock = memo.get("lock")
    if lock is None:
        lock = memo["lock"] = asyncio.Lock()
    async with lock:
        await _reconcile(body, patch, memo, logger)


def _document(body: kopf.Body) -> dict[str, Any]:
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": body.metadata.name, "namespace": body.metadata.namespace},
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
    }


def _namespace(body: kopf.Body) -> str:
    return body.metadata.namespace or "default"


def _phase(status: Mapping[str, Any]) -> Phase:
    try:
        return Phase(status.get("phase") or Phase.pending)
    except ValueError:
        return Phase.pending


async def _reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Logger) -> None:
    status = dict(body.get("status") or {})
    conditions = list(status.get("conditions") or [])
    phase = _phase(status)
    platform: Platform = memo.platform
    try:
        run = validate_document(_document(body), source=f"{body.metadata.namespace}/{body.metadata.name}")
        run_root(run, platform)
    except SpecError as error:
        _reject(body, patch, conditions, error.problems, logger)
        return
    except RenderError as error:
        _reject(body, patch, conditions, [(error.field, error.reason)], logger)
        return
    valid = condition(conditions, "Valid")
    if phase == Phase.failed and valid is not None and valid.get("status") == "False":
        phase = Phase.pending  # the spec was fixed: start over
    conditions = set_condition(conditions, "Valid", True, "SpecAccepted", "the spec is valid")

    kube: Kube = memo.kube
    namespace = _namespace(body)
    server = await kube.get(DEPLOYMENT, namespace, child_name(run.name, "inference"))
    if phase in TERMINAL:
        await _scale(kube, run, server, 0, platform)
        patch.status["replicas"] = 0
        patch.status["conditions"] = conditions
        return

    queue_state = await _queue_state(memo.queue, run, owns_queue=not platform.dispatcher, logger=logger)
    conditions = set_condition(
        conditions,
        "QueueReachable",
        queue_state is not None,
        "StreamReady" if queue_state is not None else "QueueUnavailable",
        platform.nats_url,
    )
    try:
        registered, dispatched, conditions = await _register(run, platform, conditions, logger)
    except SpecError as error:
        _reject(body, patch, conditions, error.problems, logger)
        return
    counts = counts_from(queue_state, dispatched)
    generated_before = _true(conditions, "Generated")
    generation_done = generated_before or counts.done
    if counts.done and not generated_before:
        conditions = set_condition(conditions, "Generated", True, "QueueDrained", progress_text(counts))
        kopf.info(body, reason="Generated", message=f"generation finished: {progress_text(counts)}")

    units = _decide_replicas(run, server, queue_state, generation_done, memo)
    for manifest in workloads(run, platform, units):
        if manifest["metadata"]["labels"][COMPONENT_LABEL] == "generator" and not registered:
            continue  # workers read the spec the dispatcher writes: start them after registration
        kopf.adopt(manifest, owner=body, nested=["spec.template"])
        await _apply(kube, manifest, keep_replicas=run.spec.generation.autoscaling.mode == "keda")
    if run.spec.generation.autoscaling.mode == "keda":
        await _pause_keda(kube, run, namespace, paused=units == 0)

    outputs = dict(status.get("outputs") or {})
    outputs.setdefault("dataset", f"{run_root(run, platform)}/dataset")
    if counts.error:
        phase = Phase.failed
        conditions = set_condition(conditions, "Failed", True, "GenerationFailed", counts.error)
        kopf.warn(body, reason="GenerationFailed", message=counts.error)
    else:
        phase, conditions = await _advance(
            body, kube, run, platform, generation_done, outputs, conditions, logger
        )
    if phase in TERMINAL:
        await _scale(
            kube, run, await kube.get(DEPLOYMENT, namespace, child_name(run.name, "inference")), 0, platform
        )
        units = 0
    conditions = set_condition(
        conditions, "Suspended", run.spec.suspend, "SpecSuspend" if run.spec.suspend else "Running"
    )
    _write_status(patch, phase, counts, units, outputs, conditions, body)
    if phase != _phase(status):
        kopf.info(body, reason="Phase", message=f"{_phase(status)} -> {phase}")


def _true(conditions: Sequence[Mapping[str, Any]], kind: str) -> bool:
    found = condition(conditions, kind)
    return found is not None and found.get("status") == "True"


def _reject(
    body: kopf.Body,
    patch: kopf.Patch,
    conditions: list[dict[str, Any]],
    problems: Sequence[tuple[str, str]],
    logger: Logger,
) -> None:
    """An unusable spec: phase Failed, a condition and an event naming field and reason; no children."""
    message = "; ".join(f"{field}: {reason}" for field, reason in problems)
    logger.warning(f"invalid spec: {message}")
    patch.status["phase"] = Phase.failed.value
    patch.status["conditions"] = set_condition(conditions, "Valid", False, "InvalidSpec", message)
    kopf.warn(body, reason="InvalidSpec", message=message)


async def _queue_state(
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


async def _register(
    run: GenerationRun, platform: Platform, conditions: list[dict[str, Any]], logger: Logger
) -> tuple[bool, dict[str, Any] | None, list[dict[str, Any]]]:
    """Register the run with the dispatcher once, then read its status on every pass.

    A dispatcher that no longer knows the run gets it again: starting a known run resumes it,
    and nothing already generated is queued twice. A spec the dispatcher refuses fails the run.
    """
    if not platform.dispatcher:
        conditions = set_condition(conditions, "Registered", True, "NoDispatcher", "queue fed externally")
        return True, None, conditions
    status: dict[str, Any] | None = None
    if _true(conditions, "Registered"):
        try:
            status = await dispatcher_status(platform.dispatcher, run.name)
        except Exception as error:
            if _error_code(error) != "NOT_FOUND":
                logger.warning(f"dispatcher status for {run.name} failed: {error!r}")
                return True, None, conditions
    if status is None:
        runnable = run.model_copy(deep=True)
        runnable.spec.output.uri = output_uri(run, platform)
        try:
            status = await register_run(platform.dispatcher, dump_run(runnable))
        except Exception as error:
            if _error_code(error) == "INVALID_ARGUMENT":
                problems = getattr(error, "problems", None) or [("spec", str(error))]
                raise SpecError("dispatcher", list(problems)) from error
            logger.warning(f"registering {run.name} with the dispatcher failed: {error!r}")
            reason = "DispatcherUnavailable"
            conditions = set_condition(conditions, "Registered", False, reason, str(error)[:500])
            return False, None, conditions
        conditions = set_condition(conditions, "Registered", True, "Dispatched", platform.dispatcher)
    return True, status, conditions


def _error_code(error: Exception) -> str:
    """The gRPC status name of a dispatcher error ("NOT_FOUND", ...), or "" for anything else."""
    code = getattr(error, "code", "")
    if callable(code):
        code = code()
    return str(getattr(code, "name", code) or "")


def _decide_replicas(
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


def _contains(actual: Any, desired: Any) -> bool:
    """True when `actual` already holds everything `desired` says (servers add defaults)."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(_contains(actual.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(_contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired or str(actual) == str(desired))


async def _apply(kube: Kube, manifest: dict[str, Any], keep_replicas: bool = False) -> dict[str, Any]:
    """Create the child, or converge a drifted one with a merge patch; Jobs are immutable."""
    kind = kind_of(manifest)
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    existing = await kube.get(kind, namespace, name)
    if existing is None:
        try:
            return await kube.create(manifest)
        except KubeError as error:
            if error.status != 409:
                raise
            existing = await kube.get(kind, namespace, name)
            if existing is None:
                raise kopf.TemporaryError(f"{kind.kind} {name} is being replaced", delay=2) from error
    if kind == JOB:
        return existing
    spec = copy.deepcopy(manifest["spec"])
    if keep_replicas and "replicas" in spec and kind == DEPLOYMENT:
        spec["replicas"] = existing.get("spec", {}).get("replicas", spec["replicas"])
    desired = {"metadata": {"labels": manifest["metadata"]["labels"]}, "spec": spec}
    if _contains(existing, desired):
        return existing
    return await kube.patch(kind, namespace, name, desired)


async def _scale(
    kube: Kube, run: GenerationRun, server: Mapping[str, Any] | None, replicas: int, platform: Platform
) -> None:
    namespace = run.metadata.namespace or ""
    if server is not None and server.get("spec", {}).get("replicas") != replicas:
        await kube.patch(DEPLOYMENT, namespace, server["metadata"]["name"], {"spec": {"replicas": replicas}})
    generator = await kube.get(DEPLOYMENT, namespace, child_name(run.name, "generator"))
    wanted = generator_replicas(run, replicas)
    if generator is not None and generator.get("spec", {}).get("replicas") != wanted:
        await kube.patch(
            DEPLOYMENT, namespace, child_name(run.name, "generator"), {"spec": {"replicas": wanted}}
        )
    if run.spec.generation.autoscaling.mode == "keda":
        await _pause_keda(kube, run, namespace, paused=replicas == 0)


async def _pause_keda(kube: Kube, run: GenerationRun, namespace: str, paused: bool) -> None:
    """KEDA owns replicas in keda mode; suspension and the end of generation pause it at zero."""
    name = child_name(run.name, "scaler")
    scaler = await kube.get(SCALED_OBJECT, namespace, name)
    if scaler is None:
        return
    annotations = scaler.get("metadata", {}).get("annotations") or {}
    if paused and annotations.get(KEDA_PAUSE) != "0":
        await kube.patch(SCALED_OBJECT, namespace, name, {"metadata": {"annotations": {KEDA_PAUSE: "0"}}})
    elif not paused and KEDA_PAUSE in annotations:
        await kube.patch(SCALED_OBJECT, namespace, name, {"metadata": {"annotations": {KEDA_PAUSE: None}}})


async def _advance(
    body: kopf.Body,
    kube: Kube,
    run: GenerationRun,
    platform: Platform,
    generation_done: bool,
    outputs: dict[str, str],
    conditions: list[dict[str, Any]],
    logger: Logger,
) -> tuple[Phase, list[dict[str, Any]]]:
    """Post-processing: record finished stages, start the next stage's Jobs, keep a running stage's
    worker pool up, delete what a finished or failed stage leaves running, or fail on a failed Job."""
    namespace = _namespace(body)
    planned = stages(run, platform)
    jobs: dict[str, JobState] = {}
    for job in await kube.list(
        JOB, namespace, {RUN_LABEL: run.name, "app.kubernetes.io/managed-by": MANAGED_BY}
    ):
        jobs[job["metadata"]["labels"].get(COMPONENT_LABEL, "")] = job_state(job)
    root = run_root(run, platform)
    for stage in planned:
        if jobs.get(stage.name) == JobState.succeeded:
            outputs[stage.name] = stage.output
    step = next_step(planned, jobs, generation_done, [name for name in outputs if name != "dataset"])
    for part in step.stop:  # a pool done or left idle, or what is left of a failed stage
        if await kube.delete(JOB, namespace, child_name(run.name, part)):
            logger.info(f"deleted Job {child_name(run.name, part)} ({part} of a stage that is over or idle)")
    if step.failed is not None:
        message = f"stage {step.failed.name} failed: see Job {child_name(run.name, step.failed_part)}"
        kopf.warn(body, reason="StageFailed", message=message)
        return Phase.failed, set_condition(conditions, "Failed", True, "StageFailed", message)
    if step.start is not None and not run.spec.suspend:
        for job in stage_jobs(run, platform, step.start):
            kopf.adopt(job, owner=body, nested=["spec.template"])
            await _apply(kube, job)
        kopf.info(body, reason="StageStarted", message=f"started {step.start.name}")
    if step.pool is not None and not run.spec.suspend:
        pool = pool_job(run, platform, step.pool)
        if pool is not None:  # its workers left (or it was deleted) while the stage still runs
            kopf.adopt(pool, owner=body, nested=["spec.template"])
            await _apply(kube, pool)
            kopf.info(body, reason="WorkersStarted", message=f"started workers of {step.pool.name}")
    if step.phase == Phase.succeeded:
        conditions = set_condition(conditions, "Complete", True, "AllStagesSucceeded", root)
    return step.phase, conditions


def _write_status(
    patch: kopf.Patch,
    phase: Phase,
    counts: Counts,
    replicas: int,
    outputs: Mapping[str, str],
    conditions: list[dict[str, Any]],
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


def _owned_by(item: Mapping[str, Any], owner: kopf.Body) -> bool:
    uid = owner.metadata.uid
    references = item.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in references) or not references
