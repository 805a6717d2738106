"""Post-processing on the cluster: observe the stage Jobs, decide the next step, act on it.

The decision is `progress.next_step`, pure and table-tested; this module only gathers what it
needs (the run's Jobs and the stages already recorded as done) and carries the step out:
delete what is over, start the next stage's Jobs, replace a worker pool that left early.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from cosmoforge.operator.children import adopt_and_apply
from cosmoforge.operator.kube import JOB, POD, Kube
from cosmoforge.operator.progress import JobState, failure_line, is_true, job_state, next_step, set_condition
from cosmoforge.operator.render import (
    COMPONENT_LABEL,
    MANAGED_BY,
    RUN_LABEL,
    Platform,
    child_name,
    clustering_sources,
    clustering_stages,
    pool_job,
    run_root,
    stage_jobs,
    stages,
)
from cosmoforge.spec.model import GenerationRun, Phase

Logger = logging.Logger | logging.LoggerAdapter[Any]


async def stage_jobs_by_component(kube: Kube, run: GenerationRun, namespace: str) -> dict[str, JobState]:
    """Where each of the run's Jobs stands, by component (a stage's name or its pool's)."""
    selector = {RUN_LABEL: run.name, "app.kubernetes.io/managed-by": MANAGED_BY}
    return {
        job["metadata"]["labels"].get(COMPONENT_LABEL, ""): job_state(job)
        for job in await kube.list(JOB, namespace, selector)
    }


async def why_failed(kube: Kube, namespace: str, job: str) -> str:
    """The failed command's own last line, from its pods (Kubernetes labels them `job-name`)."""
    return failure_line(await kube.list(POD, namespace, {"job-name": job})) or "see its pods' logs"


async def advance(
    body: kopf.Body,
    kube: Kube,
    run: GenerationRun,
    platform: Platform,
    generation_done: bool,
    outputs: dict[str, str],
    conditions: list[dict[str, Any]],
    logger: Logger,
) -> tuple[Phase, list[dict[str, Any]]]:
    """Record finished stages in `outputs`, then carry out `next_step`: delete what is over, fail
    on a failed Job, start the next stage, keep a running stage's worker pool up."""
    namespace = body.metadata.namespace or "default"
    planned = stages(run, platform)
    jobs = await stage_jobs_by_component(kube, run, namespace)
    for stage in planned:
        if jobs.get(stage.name) == JobState.succeeded:
            outputs[stage.name] = stage.output
    step = next_step(planned, jobs, generation_done, [name for name in outputs if name != "dataset"])
    for part in step.stop:  # a pool done or left idle, or what is left of a failed stage
        if await kube.delete(JOB, namespace, child_name(run.name, part)):
            logger.info(f"deleted Job {child_name(run.name, part)} ({part} of a stage that is over or idle)")
    if step.failed is not None:
        failed_job = child_name(run.name, step.failed_part)
        reason = await why_failed(kube, namespace, failed_job)
        message = f"stage {step.failed.name} failed (Job {failed_job}): {reason}"
        kopf.warn(body, reason="StageFailed", message=message)
        return Phase.failed, set_condition(conditions, "Failed", True, "StageFailed", message)
    if step.start is not None and not run.spec.suspend:
        for job in stage_jobs(run, platform, step.start):
            await adopt_and_apply(kube, body, job)
        kopf.info(body, reason="StageStarted", message=f"started {step.start.name}")
    if step.pool is not None and not run.spec.suspend:
        pool = pool_job(run, platform, step.pool)
        if pool is not None:  # its workers left (or it was deleted) while the stage still runs
            await adopt_and_apply(kube, body, pool)
            kopf.info(body, reason="WorkersStarted", message=f"started workers of {step.pool.name}")
    if step.phase == Phase.succeeded:
        root = run_root(run, platform)
        conditions = set_condition(conditions, "Complete", True, "AllStagesSucceeded", root)
    return step.phase, conditions


async def cluster_first(
    body: kopf.Body,
    kube: Kube,
    run: GenerationRun,
    platform: Platform,
    outputs: dict[str, str],
    conditions: list[dict[str, Any]],
) -> tuple[Phase | None, list[dict[str, Any]]]:
    """The clustering Jobs, all before generation: `Phase.clustering` while one runs, `failed`
    when one failed, None once every source has its topics (`Clustered`) or none needs them."""
    planned = clustering_stages(run, platform)
    if not planned or is_true(conditions, "Clustered"):
        return None, conditions
    namespace = body.metadata.namespace or "default"
    jobs = await stage_jobs_by_component(kube, run, namespace)
    for stage, source in zip(planned, clustering_sources(run), strict=True):
        state = jobs.get(stage.name, JobState.missing)
        if state == JobState.failed:
            failed_job = child_name(run.name, stage.name)
            reason = await why_failed(kube, namespace, failed_job)
            message = f"clustering {source.name} failed (Job {failed_job}): {reason}"
            kopf.warn(body, reason="StageFailed", message=message)
            return Phase.failed, set_condition(conditions, "Failed", True, "StageFailed", message)
        if state == JobState.succeeded:
            outputs[f"topics-{source.name}"] = stage.output
        if state == JobState.missing and not run.spec.suspend:
            for job in stage_jobs(run, platform, stage):
                await adopt_and_apply(kube, body, job)
            kopf.info(body, reason="StageStarted", message=f"started clustering {source.name}")
    if all(jobs.get(stage.name) == JobState.succeeded for stage in planned):
        message = f"topics of {len(planned)} web source(s) ready"
        return None, set_condition(conditions, "Clustered", True, "TopicsReady", message)
    return Phase.clustering, conditions
