"""The post-generation stages as Jobs: one per stage, and a worker pool beside some.

Which stages run and what each reads is `cosmoforge.runs.stages.post_stages`, the chain the
embedded runner and the decontamination submitter follow too; here each planned stage only
becomes a command line, resources and a Job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cosmoforge.operator.render.common import (
    Manifest,
    Platform,
    RenderError,
    Role,
    child_metadata,
    cosmo_container,
    cosmo_pod,
    output_uri,
    run_key,
    run_root,
    secret_env,
    selector_labels,
)
from cosmoforge.postprocess.dedup_ranks import STEPS as DEDUP_STEPS
from cosmoforge.postprocess.dedup_ranks import step_world_size
from cosmoforge.runs.stages import PlannedStage, post_stages
from cosmoforge.spec.model import GenerationRun, Phase, TrainingSpec
from cosmoforge.training import job as nanotron
from cosmoforge.training import tokenize_ranks


@dataclass(frozen=True)
class Pool:
    """Worker pods beside a stage's Job: one Job of `size` pods, each running `args`.

    The stage's own Job says when the stage is over (it waits for the workers' outputs); the
    pool only does the work. Its pods are never expected to end the stage: the operator
    replaces a pool whose workers all left while the stage still runs, fails the stage when
    the pool fails, and deletes the pool once the stage is over.
    """

    part: str
    size: int
    args: tuple[str, ...]
    cpu: str = "2"
    memory: str = "8Gi"


@dataclass(frozen=True)
class Stage:
    """One Job of the run (and maybe its worker pool): started when the previous stage succeeded."""

    name: str
    phase: Phase
    args: tuple[str, ...]
    output: str
    cpu: str = "1"
    memory: str = "4Gi"
    pool: Pool | None = None
    env: tuple[dict[str, Any], ...] = ()
    kind: str = ""  # what the stage does, when several Jobs do it (cluster-0, cluster-1): its name
    gpus: int = 0
    # Pods of an Indexed Job, each a datatrove rank (its completion index) of `ranks`; the
    # command reads its rank from JOB_COMPLETION_INDEX and is given the world size.
    ranks: int = 1

    @property
    def role(self) -> Role:
        """The image the stage's Jobs (its pool's too) run."""
        return STAGE_ROLES[self.kind or self.name]

    @property
    def deadline_seconds(self) -> int:
        return STAGE_DEADLINES[self.kind or self.name]

    @property
    def parts(self) -> tuple[str, ...]:
        """The components of the stage's Jobs: its own, then its pool's."""
        return (self.name,) if self.pool is None else (self.name, self.pool.part)


# Data stages run the post-processing image; training and evaluation need the trainer's CUDA
# PyTorch, nanotron and lighteval.
STAGE_ROLES: dict[str, Role] = {
    "cluster": Role.postprocess,
    "compact": Role.postprocess,
    "dedup": Role.postprocess,
    "decontaminate": Role.postprocess,
    "tokenize": Role.postprocess,
    "train": Role.trainer,
    "evaluate": Role.trainer,
    "publish": Role.runtime,  # huggingface_hub and pyarrow are in every image
}

# How long a stage's Jobs may run before Kubernetes stops them (their pool's too): past it the
# stage fails instead of holding nodes (and GPUs, for training) forever on a hung step. Generous
# for the largest runs each stage is written for; training is measured in days.
HOUR = 3600
STAGE_DEADLINES: dict[str, int] = {
    "cluster": 24 * HOUR,
    "compact": 12 * HOUR,
    "dedup": 24 * HOUR,
    "decontaminate": 24 * HOUR,
    "tokenize": 24 * HOUR,
    "train": 14 * 24 * HOUR,
    "evaluate": 48 * HOUR,
    "publish": 6 * HOUR,
}

# Checking processes per decontamination worker pod: its CPU request, not the node's cores.
DECONTAM_WORKER_CPU = 2
# A decontamination worker leaves after this long without a task. Longer than a task's ack wait
# (60 s), so a range whose worker died is redelivered while the others are still there; the
# operator replaces the pool if they all left while work remains.
DECONTAM_IDLE_EXIT = 600


def _step_name(stage: str, step: str, last: bool) -> str:
    # The last step carries the stage's name: its Job ending is the stage ending.
    if last:
        return stage
    return f"{stage}-ranks" if step == stage else f"{stage}-{step}"


def _compact_stage(run: GenerationRun, platform: Platform, planned: PlannedStage) -> Stage:
    # Streams the shards bucket by bucket: memory stays at one bucket whatever the run's size.
    root = run_root(run, platform)
    return Stage(planned.name, planned.phase, ("compact", root), f"{root}/{planned.output}", "1", "2Gi")


def _dedup_stage(run: GenerationRun, platform: Platform, planned: PlannedStage) -> Stage | list[Stage]:
    """One `cosmo dedup` Job, or with `postprocess.ranks` > 1 datatrove's MinHash steps as a chain
    of Indexed Jobs (signatures and filter over the ranks, one Job per step: each step needs
    every rank of the one before)."""
    root = run_root(run, platform)
    dedup, ranks = run.spec.postprocess.dedup, run.spec.postprocess.ranks
    out = f"{root}/{planned.output}"
    args: tuple[str, ...] = ("dedup", f"{root}/{planned.input}", "--out", out, "--ngram", str(dedup.ngram))
    args += ("--buckets", str(dedup.buckets), "--hashes-per-bucket", str(dedup.hashes_per_bucket))
    args += () if dedup.exact else ("--no-exact",)
    if ranks == 1:
        return Stage(planned.name, planned.phase, args, out, cpu="2", memory="8Gi")
    steps = []
    for step in DEDUP_STEPS:
        world = step_world_size(step, ranks, dedup.buckets)
        ranked = (*args, "--step", step, "--world-size", str(world))
        name = _step_name(planned.name, step, last=step == DEDUP_STEPS[-1])
        steps.append(Stage(name, planned.phase, ranked, out, "1", "4Gi", kind=planned.name, ranks=world))
    return steps


def _decontaminate_stage(run: GenerationRun, platform: Platform, planned: PlannedStage) -> Stage:
    """`cosmo decontaminate` as one Job, or, with `workers` > 1, a submitter beside a worker pool."""
    root = run_root(run, platform)
    source, out_folder = f"{root}/{planned.input}", f"{root}/{planned.output}"
    decontam = run.spec.postprocess.decontaminate
    if decontam.workers <= 1:
        args: tuple[str, ...] = ("decontaminate", source, "--out", out_folder)
        for benchmark in decontam.benchmarks:
            args += ("--benchmark", benchmark)
        args += ("--ngram", str(decontam.ngram), "--threshold", str(decontam.threshold))
        args += ("--min-block-chars", str(decontam.min_block_chars))
        return Stage(planned.name, planned.phase, args, out_folder, "2", "8Gi")
    # Both read the settings from <out>/<run>/spec.yaml, which the dispatcher writes for the run.
    out, nats = output_uri(run, platform), platform.nats_url
    submit: tuple[str, ...] = ("decontaminate-submit", "--nats", nats, "--run", run_key(run), "--out", out)
    submit += ("--input", source, "--wait")
    worker: tuple[str, ...] = ("decontaminate-worker", "--nats", nats, "--run", run_key(run), "--out", out)
    worker += ("--workers", str(DECONTAM_WORKER_CPU), "--worker-id", "$(POD_NAME)")
    worker += ("--idle-exit", str(DECONTAM_IDLE_EXIT))
    pool = Pool("decontaminate-workers", decontam.workers, worker, cpu=str(DECONTAM_WORKER_CPU))
    # The submitter plans (parquet footers only), queues the ranges and waits: little to do.
    return Stage(planned.name, planned.phase, submit, out_folder, "250m", "1Gi", pool)


def _training(run: GenerationRun) -> TrainingSpec:
    training = run.spec.training
    assert training is not None, "post_stages plans training stages only with spec.training"
    return training


def _tokenize_stage(run: GenerationRun, platform: Platform, planned: PlannedStage) -> Stage | list[Stage]:
    """One `cosmo tokenize` Job, or with `postprocess.ranks` > 1 an Indexed Job of datatrove
    tokenizer ranks, then one Job that merges their token files."""
    root = run_root(run, platform)
    out, ranks = f"{root}/{planned.output}", run.spec.postprocess.ranks
    args = ("tokenize", f"{root}/{planned.input}", "--out", out, "--tokenizer", _training(run).tokenizer)
    if ranks == 1:
        return Stage(planned.name, planned.phase, args, out, cpu="2")
    steps = []
    for step in tokenize_ranks.STEPS:
        # The merge is one pod that gathers all the ranks: its --world-size names how many.
        world = tokenize_ranks.step_world_size(step, ranks)
        ranked = (*args, "--step", step, "--world-size", str(ranks))
        name = _step_name(planned.name, step, last=step == tokenize_ranks.STEPS[-1])
        steps.append(Stage(name, planned.phase, ranked, out, "2", "4Gi", kind=planned.name, ranks=world))
    return steps


def _train_stage(run: GenerationRun, platform: Platform, planned: PlannedStage) -> Stage:
    root, training = run_root(run, platform), _training(run)
    out = f"{root}/{planned.output}"
    args: tuple[str, ...] = ("train", f"{root}/{planned.input}", "--out", out, "--preset", training.preset)
    args += ("--steps", str(training.steps), "--batch-size", str(training.batch_size))
    args += ("--seq-len", str(training.sequence_length), "--lr", str(training.learning_rate))
    args += ("--warmup", str(training.warmup_steps))
    if training.checkpoint_every is not None:  # a replaced pod resumes from the last one
        args += ("--checkpoint-every", str(training.checkpoint_every))
    return Stage(planned.name, planned.phase, args, out, cpu="4", memory="16Gi")


def _evaluate_stage(run: GenerationRun, platform: Platform, planned: PlannedStage) -> Stage:
    root, training = run_root(run, platform), _training(run)
    out = f"{root}/{planned.output}"
    args: tuple[str, ...] = ("evaluate", f"{root}/{planned.input}", "--out", out)
    args += ("--tasks", ",".join(training.eval_tasks))
    if training.eval_max_samples is not None:
        args += ("--max-samples", str(training.eval_max_samples))
    if training.eval_data is not None:
        args += ("--data-dir", training.eval_data)
    if nanotron.uses_nanotron(training):  # a GPU preset's model is scored on a GPU too
        return Stage(planned.name, planned.phase, (*args, "--device", "cuda"), out, "4", "32Gi", gpus=1)
    return Stage(planned.name, planned.phase, args, out, cpu="2", memory="8Gi")


def _publish_stage(run: GenerationRun, platform: Platform, planned: PlannedStage) -> Stage:
    hub = run.spec.output.hub
    assert hub is not None, "post_stages plans publishing only with spec.output.hub"
    root = run_root(run, platform)
    args: tuple[str, ...] = ("publish", root, "--repo", hub.repo) + (("--private",) if hub.private else ())
    # The token reaches the pod from its Secret only: never in the args, the spec or the Job.
    env = (secret_env("HF_TOKEN", hub.token_secret),)
    out = f"{root}/{planned.output}"
    return Stage(planned.name, planned.phase, args, out, cpu="1", memory="2Gi", env=env)


_STAGE_JOBS: dict[str, Callable[[GenerationRun, Platform, PlannedStage], Stage | list[Stage]]] = {
    "compact": _compact_stage,
    "dedup": _dedup_stage,
    "decontaminate": _decontaminate_stage,
    "tokenize": _tokenize_stage,
    "train": _train_stage,
    "evaluate": _evaluate_stage,
    "publish": _publish_stage,
}


def stages(run: GenerationRun, platform: Platform) -> list[Stage]:
    """Post-processing Jobs in the order `post_stages` plans them, reading what it says."""
    result: list[Stage] = []
    for planned in post_stages(run.spec):
        rendered = _STAGE_JOBS[planned.name](run, platform, planned)
        result.extend(rendered if isinstance(rendered, list) else [rendered])
    return result


def _resources(cpu: str, memory: str) -> dict[str, Any]:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}


USER_ERROR_EXIT = 2  # every cosmo command exits 2 for bad input or settings


def _pod_failure_policy(container: str) -> dict[str, Any]:
    # Bad input fails the same way on every try: fail at once, with the pod's one-line message,
    # instead of retrying. An evicted or preempted pod is not the command's fault: not counted.
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": container, "operator": "In", "values": [USER_ERROR_EXIT]},
            },
            # `status` defaults to "True", but Kubernetes 1.29 to 1.34 require it to be written.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def stage_job(run: GenerationRun, platform: Platform, stage: Stage) -> Manifest:
    resources = _resources(stage.cpu, stage.memory)
    if stage.gpus:
        resources["limits"]["nvidia.com/gpu"] = str(stage.gpus)
    env = list(stage.env)
    container = cosmo_container(stage.name, list(stage.args), platform, env, resources, role=stage.role)
    meta = child_metadata(run, stage.name, stage.name, platform)
    pod = cosmo_pod([container], platform, restartPolicy="Never")
    if stage.gpus:  # on the GPU nodes the spec names for its inference servers
        serving = run.spec.generation.serving
        if serving.node_selector:
            pod["nodeSelector"] = dict(serving.node_selector)
        if serving.tolerations:
            pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in serving.tolerations]
    spec: Manifest = {
        # A stage that fails twice more fails the run; no TTL: the operator reads the Job's end.
        "backoffLimit": 2,
        "activeDeadlineSeconds": stage.deadline_seconds,
        "podFailurePolicy": _pod_failure_policy(stage.name),
        "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod},
    }
    if stage.ranks > 1:
        # A pod that fails is replaced with the same index; each rank redoes only its own share.
        spec |= {"completionMode": "Indexed", "completions": stage.ranks, "parallelism": stage.ranks}
        spec["backoffLimit"] = 2 * stage.ranks
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def pool_job(run: GenerationRun, platform: Platform, stage: Stage) -> Manifest | None:
    """The stage's worker pool: a work-queue Job (`parallelism` pods, no completion count)."""
    pool = stage.pool
    if pool is None:
        return None
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    resources = _resources(pool.cpu, pool.memory)
    container = cosmo_container("worker", list(pool.args), platform, env, resources, role=stage.role)
    meta = child_metadata(run, pool.part, pool.part, platform)
    # A worker stops on SIGTERM after the range in hand; one cut short is redelivered anyway.
    pod = cosmo_pod([container], platform, restartPolicy="Never", terminationGracePeriodSeconds=90)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "parallelism": pool.size,
            "activeDeadlineSeconds": stage.deadline_seconds,
            # Failed pods are replaced; about two failures per worker fail the pool, and the stage.
            "backoffLimit": 2 * pool.size,
            "podFailurePolicy": _pod_failure_policy("worker"),
            "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod},
        },
    }


def nanotron_jobs(run: GenerationRun, platform: Platform, stage: Stage) -> list[Manifest]:
    """A GPU preset's train stage: the headless Service (several nodes only), then the Indexed
    Job running torchrun + nanotron on every node (see cosmoforge.training.job)."""
    training, sizing = _training(run), nanotron.GpuNodes()
    nodes = nanotron.layout(training)
    planned = next(s for s in post_stages(run.spec) if s.name == "train")
    paths = nanotron.training_paths(run_root(run, platform), planned.input, planned.output)
    meta = child_metadata(run, stage.name, stage.name, platform)
    service = child_metadata(run, stage.name, f"{stage.name}-nodes", platform)
    if len(hostname := f"{meta['name']}-{nodes.nodes - 1}") > 63:  # pods are named <job>-<index>
        raise RenderError("metadata.name", f"too long for the training pods' hostnames ({hostname})")
    volumes, mounts = nanotron.training_volumes(sizing)
    resources = nanotron.gpu_resources(nodes, sizing)
    env = nanotron.node_rank_env()
    container = cosmo_container(stage.name, [], platform, env, resources, role=stage.role)
    script = nanotron.launch_script(paths, nodes, master=f"{meta['name']}-0.{service['name']}")
    container |= {"command": ["/bin/sh", "-c"], "args": [script]}
    container["volumeMounts"] = container["volumeMounts"] + mounts
    container["ports"] = [{"name": "rendezvous", "containerPort": nanotron.MASTER_PORT}]
    pod = cosmo_pod([container], platform, restartPolicy="Never", subdomain=service["name"])
    pod["volumes"] = pod["volumes"] + volumes
    pod["tolerations"] = [{"key": sizing.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    template = {"metadata": {"labels": dict(meta["labels"])}, "spec": pod}
    spec = nanotron.job_spec(nodes, template, stage.name, sizing)
    spec["activeDeadlineSeconds"] = stage.deadline_seconds
    job: Manifest = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}
    if nodes.nodes == 1:
        return [job]
    return [nanotron.headless_service(service, selector_labels(run.name, stage.name)), job]


def stage_jobs(run: GenerationRun, platform: Platform, stage: Stage) -> list[Manifest]:
    """The stage's Job, then its worker pool's if it has one: what starting the stage creates."""
    if stage.name == "train" and nanotron.uses_nanotron(_training(run)):
        return nanotron_jobs(run, platform, stage)
    pool = pool_job(run, platform, stage)
    return [stage_job(run, platform, stage)] + ([pool] if pool is not None else [])
