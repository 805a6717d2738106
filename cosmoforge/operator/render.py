"""A GenerationRun's children as plain dicts: the one place that knows what the cluster runs.

Everything here is a pure function of the run and the `Platform` (what the operator knows
beyond the spec: images, NATS, the dispatcher, object storage), so `cosmo render`, the tests
and the operator see exactly the same manifests, and a change to a manifest is reviewed as a
change to a function. Nothing here talks to Kubernetes; the handlers adopt and apply.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cosmoforge import queue
from cosmoforge.spec import Engine, GenerationRun, Phase, SecretKeyRef

Manifest = dict[str, Any]

RUN_LABEL = "cosmoforge.io/run"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY = "cosmoforge-operator"
SERVER_PORT = 8080
UID = 10001
DEFAULT_TGI_IMAGE = "huggingface/text-generation-inference:3.3.4"
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
DEFAULT_IMAGE = "cosmoforge:0.1.0"


class RenderError(ValueError):
    """The spec cannot run on this cluster as configured; `field` names the spec field to change."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class Platform:
    """Cluster-side settings the chart passes to the operator as environment variables."""

    image: str = DEFAULT_IMAGE
    pull_policy: str = "IfNotPresent"
    tgi_image: str = DEFAULT_TGI_IMAGE
    vllm_image: str = DEFAULT_VLLM_IMAGE
    nats_url: str = "nats://nats:4222"
    nats_monitoring: str = "nats:8222"
    dispatcher: str | None = None
    output_base: str | None = None
    storage_endpoint: str | None = None
    storage_region: str | None = None
    storage_secret: str | None = None
    service_account: str | None = None
    extra_labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Platform:
        env = os.environ if environ is None else environ
        base = cls()

        def pick(name: str, default: str | None) -> str | None:
            value = env.get(name, "").strip()
            return value or default

        return replace(
            base,
            image=pick("COSMO_IMAGE", base.image) or base.image,
            pull_policy=pick("COSMO_IMAGE_PULL_POLICY", base.pull_policy) or base.pull_policy,
            tgi_image=pick("COSMO_TGI_IMAGE", base.tgi_image) or base.tgi_image,
            vllm_image=pick("COSMO_VLLM_IMAGE", base.vllm_image) or base.vllm_image,
            nats_url=pick("COSMO_NATS_URL", base.nats_url) or base.nats_url,
            nats_monitoring=pick("COSMO_NATS_MONITORING", base.nats_monitoring) or base.nats_monitoring,
            dispatcher=pick("COSMO_DISPATCHER", None),
            output_base=pick("COSMO_OUTPUT_BASE", None),
            storage_endpoint=pick("COSMO_STORAGE_ENDPOINT", None),
            storage_region=pick("COSMO_STORAGE_REGION", None),
            storage_secret=pick("COSMO_STORAGE_SECRET", None),
            service_account=pick("COSMO_CHILD_SERVICE_ACCOUNT", None),
        )


# --- names and labels ---------------------------------------------------------------------


def child_name(run: str, part: str) -> str:
    """`<run>-<part>`, a valid DNS-1035 label (services need one) of at most 63 characters."""
    base = run if run[0].isalpha() else f"gr-{run}"
    name = f"{base}-{part}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(run.encode()).hexdigest()[:8]
    keep = 63 - len(part) - len(digest) - 2
    return f"{base[:keep].rstrip('-')}-{digest}-{part}"


def selector_labels(run: str, component: str) -> dict[str, str]:
    return {RUN_LABEL: run, COMPONENT_LABEL: component}


def labels(run: str, component: str, platform: Platform) -> dict[str, str]:
    return {
        **platform.extra_labels,
        "app.kubernetes.io/name": "cosmoforge",
        "app.kubernetes.io/instance": run,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **selector_labels(run, component),
    }


def _metadata(run: GenerationRun, component: str, part: str, platform: Platform) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": child_name(run.name, part),
        "labels": labels(run.name, component, platform),
    }
    if run.metadata.namespace:
        meta["namespace"] = run.metadata.namespace
    return meta


# --- where things are ---------------------------------------------------------------------


def output_uri(run: GenerationRun, platform: Platform) -> str:
    """The run's `output.uri` as pods can reach it: object storage, never a pod's own disk."""
    uri = run.spec.output.uri
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    if platform.output_base and "://" not in uri and not uri.startswith("/"):
        return f"{platform.output_base.rstrip('/')}/{uri.strip('/')}"
    raise RenderError(
        "spec.output.uri",
        f"{uri!r} is on a pod's own disk: use an object-storage URI (s3://, gs://, ...) "
        "or set the chart's storage.uri so relative paths land there",
    )


def run_root(run: GenerationRun, platform: Platform) -> str:
    return f"{output_uri(run, platform)}/{run.name}"


def deploys_server(run: GenerationRun) -> bool:
    """True when the operator runs the inference server itself (no external endpoint)."""
    generation = run.spec.generation
    return generation.endpoint is None and generation.engine != Engine.openai


def endpoint_url(run: GenerationRun) -> str:
    if run.spec.generation.endpoint:
        return run.spec.generation.endpoint
    return f"http://{child_name(run.name, 'inference')}:{SERVER_PORT}"


# --- shared container parts ---------------------------------------------------------------


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def restricted_container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def cosmo_env(platform: Platform) -> list[dict[str, Any]]:
    """Environment every cosmoforge container shares: writable caches and object storage."""
    env = [_env("HOME", "/tmp"), _env("HF_HOME", "/tmp/hf"), _env("XDG_CACHE_HOME", "/tmp/cache")]
    if platform.storage_endpoint:
        env.append(_env("AWS_ENDPOINT_URL", platform.storage_endpoint))
    if platform.storage_region:
        env.append(_env("AWS_DEFAULT_REGION", platform.storage_region))
    return env


def cosmo_container(
    name: str, args: list[str], platform: Platform, env: list[dict[str, Any]], resources: dict[str, Any]
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": platform.image,
        "imagePullPolicy": platform.pull_policy,
        "command": ["cosmo"],
        "args": args,
        "env": cosmo_env(platform) + env,
        "resources": resources,
        "securityContext": restricted_container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if platform.storage_secret:
        container["envFrom"] = [{"secretRef": {"name": platform.storage_secret}}]
    return container


def cosmo_pod(containers: list[dict[str, Any]], platform: Platform, **extra: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "securityContext": restricted_pod_security(),
        "automountServiceAccountToken": False,
        "containers": containers,
        "volumes": [{"name": "tmp", "emptyDir": {}}],
        **extra,
    }
    if platform.service_account:
        pod["serviceAccountName"] = platform.service_account
    return pod


# --- inference server ---------------------------------------------------------------------


def _image(repository: str | None, tag: str | None, default: str) -> str:
    default_repository, _, default_tag = default.rpartition(":")
    return f"{repository or default_repository}:{tag or default_tag}"


def _http_probe(period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def server_args(run: GenerationRun) -> list[str]:
    """The inference server's command line: TGI shards, vLLM tensor-parallel size."""
    generation = run.spec.generation
    serving = generation.serving
    shards = str(max(1, generation.gpus_per_replica))
    if generation.engine == Engine.vllm:
        args = ["--model", generation.model, "--served-model-name", generation.model]
        args += ["--host", "0.0.0.0", "--port", str(SERVER_PORT), "--tensor-parallel-size", shards]
        if generation.revision:
            args += ["--revision", generation.revision]
        if serving.max_total_tokens:
            args += ["--max-model-len", str(serving.max_total_tokens)]
        return args + serving.extra_args
    args = ["--model-id", generation.model, "--hostname", "0.0.0.0", "--port", str(SERVER_PORT)]
    args += ["--num-shard", shards]
    if generation.revision:
        args += ["--revision", generation.revision]
    if serving.max_input_tokens:
        args += ["--max-input-tokens", str(serving.max_input_tokens)]
    if serving.max_total_tokens:
        args += ["--max-total-tokens", str(serving.max_total_tokens)]
    return args + serving.extra_args


def _gpu_server_container(run: GenerationRun, platform: Platform) -> dict[str, Any]:
    generation = run.spec.generation
    serving = generation.serving
    vllm = generation.engine == Engine.vllm
    default = platform.vllm_image if vllm else platform.tgi_image
    env = [_env("HF_HOME", "/data"), _env("HUGGINGFACE_HUB_CACHE", "/data/hub")]
    if serving.hf_token_secret:
        env.append(_secret_env("HF_TOKEN", serving.hf_token_secret))
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if generation.gpus_per_replica:
        limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = str(generation.gpus_per_replica)
    if serving.memory:
        limits["memory"] = requests["memory"] = serving.memory
    if serving.cpu:
        requests["cpu"] = serving.cpu
    cache_mount: dict[str, Any] = {"name": "model-cache", "mountPath": "/data"}
    if serving.model_cache and serving.model_cache.sub_path:
        cache_mount["subPath"] = serving.model_cache.sub_path
    return {
        "name": "server",
        "image": _image(serving.image, serving.tag, default),
        "imagePullPolicy": "IfNotPresent",
        "args": server_args(run),
        "env": env,
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "resources": {"limits": limits, "requests": requests},
        # Weights download and shard loading can take many minutes; only then do the others apply.
        "startupProbe": _http_probe(period=10, failures=180),
        "readinessProbe": _http_probe(period=10, failures=3),
        "livenessProbe": _http_probe(period=30, failures=3, timeout=10),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, cache_mount],
    }


def _gpu_server_pod(run: GenerationRun, platform: Platform) -> dict[str, Any]:
    serving = run.spec.generation.serving
    cache: dict[str, Any] = {"name": "model-cache"}
    if serving.model_cache:
        cache["persistentVolumeClaim"] = {"claimName": serving.model_cache.claim_name}
    else:
        cache["emptyDir"] = {}
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "containers": [_gpu_server_container(run, platform)],
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": serving.shm_size}}, cache],
        "terminationGracePeriodSeconds": 60,
    }
    if serving.node_selector:
        pod["nodeSelector"] = dict(serving.node_selector)
    if serving.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in serving.tolerations]
    return pod


def _embedded_server_pod(run: GenerationRun, platform: Platform) -> dict[str, Any]:
    """The small model shipped with cosmoforge (llama.cpp on CPU): quickstarts run on any cluster."""
    args = ["serve-model", "--host", "0.0.0.0", "--port", str(SERVER_PORT)]
    container = cosmo_container(
        "server", args, platform, [], {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    )
    container["ports"] = [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}]
    container["readinessProbe"] = _http_probe(period=5, failures=3)
    container["livenessProbe"] = _http_probe(period=30, failures=3, timeout=10)
    pod = cosmo_pod([container], platform)
    serving = run.spec.generation.serving
    if serving.node_selector:
        pod["nodeSelector"] = dict(serving.node_selector)
    if serving.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in serving.tolerations]
    return pod


def inference_deployment(run: GenerationRun, platform: Platform, replicas: int) -> Manifest | None:
    if not deploys_server(run):
        return None
    embedded = run.spec.generation.engine == Engine.embedded
    pod = _embedded_server_pod(run, platform) if embedded else _gpu_server_pod(run, platform)
    meta = _metadata(run, "inference", "inference", platform)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(run.name, "inference")},
            # A new server must be ready before an old one goes: GPUs are scarce, so no surge.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod},
        },
    }


def inference_service(run: GenerationRun, platform: Platform) -> Manifest | None:
    if not deploys_server(run):
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(run, "inference", "inference", platform),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(run.name, "inference"),
            "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


# --- generator ----------------------------------------------------------------------------


def generator_args(run: GenerationRun) -> list[str]:
    return [
        "worker", "--nats", "$(COSMO_NATS_URL)", "--out", "$(COSMO_OUTPUT)", "--run", run.name,
        "--endpoint", "$(COSMO_ENDPOINT)", "--worker-id", "$(POD_NAME)",
    ]  # fmt: skip


def generator_deployment(run: GenerationRun, platform: Platform, replicas: int) -> Manifest:
    generation = run.spec.generation
    env = [
        _env("COSMO_NATS_URL", platform.nats_url),
        _env("COSMO_OUTPUT", output_uri(run, platform)),
        _env("COSMO_ENDPOINT", endpoint_url(run)),
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    if generation.api_key_secret:
        env += [_secret_env("OPENAI_API_KEY", generation.api_key_secret)]
        env += [_secret_env("HF_TOKEN", generation.api_key_secret)]
    resources = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    container = cosmo_container("generator", generator_args(run), platform, env, resources)
    meta = _metadata(run, "generator", "generator", platform)
    # A worker drains on SIGTERM: in-flight prompts finish or go back to the queue unacked.
    pod = cosmo_pod([container], platform, terminationGracePeriodSeconds=90)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(run.name, "generator")},
            "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod},
        },
    }


def generator_replicas(run: GenerationRun, server_replicas: int) -> int:
    """Generators follow the servers: `workers` pods at full scale, proportionally fewer below."""
    generation = run.spec.generation
    if server_replicas <= 0:
        return 0
    if not deploys_server(run):
        return generation.workers
    return max(1, math.ceil(generation.workers * server_replicas / max(1, generation.replicas.max)))


# --- KEDA ---------------------------------------------------------------------------------


def scaled_object(run: GenerationRun, platform: Platform) -> Manifest | None:
    """keda mode: KEDA scales the server (or, with an endpoint, the generators) on consumer lag."""
    generation = run.spec.generation
    if generation.autoscaling.mode != "keda":
        return None
    server = deploys_server(run)
    target = child_name(run.name, "inference" if server else "generator")
    low, high = (generation.replicas.min, generation.replicas.max) if server else (0, generation.workers)
    window = generation.autoscaling.stabilization_seconds
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(run, "autoscaler", "scaler", platform),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicaCount": low,
            "maxReplicaCount": high,
            "pollingInterval": 15,
            "cooldownPeriod": max(30, window),
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": window}}
                }
            },
            "triggers": [
                {
                    "type": "nats-jetstream",
                    "metadata": {
                        "natsServerMonitoringEndpoint": platform.nats_monitoring,
                        "account": "$G",
                        "stream": queue.stream_name(run.name),
                        "consumer": queue.CONSUMER,
                        "lagThreshold": str(generation.autoscaling.target_queue_per_replica),
                        "activationLagThreshold": "0",
                    },
                }
            ],
        },
    }


# --- post-processing stages ---------------------------------------------------------------


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

    @property
    def parts(self) -> tuple[str, ...]:
        """The components of the stage's Jobs: its own, then its pool's."""
        return (self.name,) if self.pool is None else (self.name, self.pool.part)


# What each post-processing stage keeps, in its output folder (cosmoforge.postprocess.KEPT).
KEPT = "kept.parquet"
# Checking processes per decontamination worker pod: its CPU request, not the node's cores.
DECONTAM_WORKER_CPU = 2
# A decontamination worker leaves after this long without a task. Longer than a task's ack wait
# (60 s), so a range whose worker died is redelivered while the others are still there; the
# operator replaces the pool if they all left while work remains.
DECONTAM_IDLE_EXIT = 600


def _decontaminate_stage(run: GenerationRun, platform: Platform, current: str) -> Stage:
    """`cosmo decontaminate` as one Job, or, with `workers` > 1, a submitter beside a worker pool."""
    root = run_root(run, platform)
    decontam = run.spec.postprocess.decontaminate
    if decontam.workers <= 1:
        args: tuple[str, ...] = ("decontaminate", current, "--out", f"{root}/decontam")
        for benchmark in decontam.benchmarks:
            args += ("--benchmark", benchmark)
        args += ("--ngram", str(decontam.ngram), "--threshold", str(decontam.threshold))
        args += ("--min-block-chars", str(decontam.min_block_chars))
        return Stage("decontaminate", Phase.decontaminating, args, f"{root}/decontam", "2", "8Gi")
    # Both read the settings from <out>/<run>/spec.yaml, which the dispatcher writes for the run.
    out, nats = output_uri(run, platform), platform.nats_url
    submit: tuple[str, ...] = ("decontaminate-submit", "--nats", nats, "--run", run.name, "--out", out)
    submit += ("--input", current, "--wait")
    worker: tuple[str, ...] = ("decontaminate-worker", "--nats", nats, "--run", run.name, "--out", out)
    worker += ("--workers", str(DECONTAM_WORKER_CPU), "--worker-id", "$(POD_NAME)")
    worker += ("--idle-exit", str(DECONTAM_IDLE_EXIT))
    pool = Pool("decontaminate-workers", decontam.workers, worker, cpu=str(DECONTAM_WORKER_CPU))
    # The submitter plans (parquet footers only), queues the ranges and waits: little to do.
    return Stage("decontaminate", Phase.decontaminating, submit, f"{root}/decontam", "250m", "1Gi", pool)


def stages(run: GenerationRun, platform: Platform) -> list[Stage]:
    """Post-processing in order; each stage reads what the previous one kept (its kept.parquet)."""
    root = run_root(run, platform)
    spec = run.spec
    result: list[Stage] = []
    current = f"{root}/dataset"
    dedup = spec.postprocess.dedup
    if dedup.enabled:
        args: tuple[str, ...] = ("dedup", current, "--out", f"{root}/dedup", "--ngram", str(dedup.ngram))
        args += ("--buckets", str(dedup.buckets), "--hashes-per-bucket", str(dedup.hashes_per_bucket))
        args += () if dedup.exact else ("--no-exact",)
        result.append(Stage("dedup", Phase.deduplicating, args, f"{root}/dedup", cpu="2", memory="8Gi"))
        current = f"{root}/dedup/{KEPT}"
    if spec.postprocess.decontaminate.enabled:
        result.append(_decontaminate_stage(run, platform, current))
        current = f"{root}/decontam/{KEPT}"
    training = spec.training
    if training is not None and training.enabled:
        tokens, checkpoints = f"{root}/tokens", f"{root}/checkpoints"
        args = ("tokenize", current, "--out", tokens, "--tokenizer", training.tokenizer)
        result.append(Stage("tokenize", Phase.training, args, tokens, cpu="2"))
        args = ("train", tokens, "--out", checkpoints, "--preset", training.preset)
        args += ("--steps", str(training.steps), "--batch-size", str(training.batch_size))
        args += ("--seq-len", str(training.sequence_length), "--lr", str(training.learning_rate))
        args += ("--warmup", str(training.warmup_steps))
        result.append(Stage("train", Phase.training, args, checkpoints, cpu="4", memory="16Gi"))
        if training.evaluate:
            args = (
                "evaluate",
                checkpoints,
                "--out",
                f"{root}/eval",
                "--tasks",
                ",".join(training.eval_tasks),
            )
            if training.eval_max_samples is not None:
                args += ("--max-samples", str(training.eval_max_samples))
            if training.eval_data is not None:
                args += ("--data-dir", training.eval_data)
            result.append(Stage("evaluate", Phase.evaluating, args, f"{root}/eval", cpu="2", memory="8Gi"))
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
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def stage_job(run: GenerationRun, platform: Platform, stage: Stage) -> Manifest:
    resources = _resources(stage.cpu, stage.memory)
    container = cosmo_container(stage.name, list(stage.args), platform, [], resources)
    meta = _metadata(run, stage.name, stage.name, platform)
    pod = cosmo_pod([container], platform, restartPolicy="Never")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            # A stage that fails twice more fails the run; no TTL: the operator reads the Job's end.
            "backoffLimit": 2,
            "podFailurePolicy": _pod_failure_policy(stage.name),
            "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod},
        },
    }


def pool_job(run: GenerationRun, platform: Platform, stage: Stage) -> Manifest | None:
    """The stage's worker pool: a work-queue Job (`parallelism` pods, no completion count)."""
    pool = stage.pool
    if pool is None:
        return None
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    container = cosmo_container("worker", list(pool.args), platform, env, _resources(pool.cpu, pool.memory))
    meta = _metadata(run, pool.part, pool.part, platform)
    # A worker stops on SIGTERM after the range in hand; one cut short is redelivered anyway.
    pod = cosmo_pod([container], platform, restartPolicy="Never", terminationGracePeriodSeconds=90)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "parallelism": pool.size,
            # Failed pods are replaced; about two failures per worker fail the pool, and the stage.
            "backoffLimit": 2 * pool.size,
            "podFailurePolicy": _pod_failure_policy("worker"),
            "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod},
        },
    }


def stage_jobs(run: GenerationRun, platform: Platform, stage: Stage) -> list[Manifest]:
    """The stage's Job, then its worker pool's if it has one: what starting the stage creates."""
    pool = pool_job(run, platform, stage)
    return [stage_job(run, platform, stage)] + ([pool] if pool is not None else [])


# --- everything ---------------------------------------------------------------------------


def initial_replicas(run: GenerationRun) -> int:
    """Servers at creation: the minimum (at least one, so the first prompts find a server)."""
    if run.spec.suspend:
        return 0
    return max(1, run.spec.generation.replicas.min)


def workloads(run: GenerationRun, platform: Platform, server_replicas: int) -> list[Manifest]:
    """The long-running children, in creation order: server, its Service, generators, scaler."""
    docs = [
        inference_deployment(run, platform, server_replicas),
        inference_service(run, platform),
        generator_deployment(run, platform, generator_replicas(run, server_replicas)),
        scaled_object(run, platform),
    ]
    return [doc for doc in docs if doc is not None]


def render_all(run: GenerationRun, platform: Platform) -> list[Manifest]:
    """Every manifest the operator would create for this run, Jobs included (`cosmo render`)."""
    docs = workloads(run, platform, initial_replicas(run))
    return docs + [job for stage in stages(run, platform) for job in stage_jobs(run, platform, stage)]
