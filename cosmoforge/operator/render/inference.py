"""The inference server a run deploys: TGI or vLLM on GPUs, or the embedded model on CPU.

A Deployment and its Service; the generators reach the server by the Service's name
(`common.endpoint_url`) unless the spec names an external endpoint, and then nothing here is
rendered.
"""

from __future__ import annotations

from typing import Any

from cosmoforge.operator.render import serverargs
from cosmoforge.operator.render.common import (
    SERVER_PORT,
    UID,
    Manifest,
    Platform,
    RenderError,
    Role,
    child_metadata,
    cosmo_container,
    cosmo_pod,
    deployment,
    deploys_server,
    env_var,
    secret_env,
    selector_labels,
)
from cosmoforge.spec.model import Engine, GenerationRun, ServingSpec


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


# Defaults for a GPU server whose spec names no size: a node's share a 7B-70B model server needs,
# and a ceiling so one run cannot take a whole node's memory or fill its disk.
DEFAULT_SERVER_CPU = "4"
DEFAULT_SERVER_MEMORY = "64Gi"
DEFAULT_CACHE_SIZE = "200Gi"


def _extra_args(run: GenerationRun) -> list[str]:
    """The spec's extra flags once the allow-list passed them, and remote code only on request."""
    serving = run.spec.generation.serving
    refused = serverargs.problems(run.spec.generation.engine, serving.extra_args)
    if refused:
        raise RenderError(serverargs.FIELD, "; ".join(refused))
    return ([serverargs.REMOTE_CODE_FLAG] if serving.trust_remote_code else []) + serving.extra_args


def server_args(run: GenerationRun) -> list[str]:
    """The inference server's command line: TGI shards, vLLM tensor-parallel size, allowed extras.

    Raises RenderError for an extra argument outside the engine's allow-list."""
    generation = run.spec.generation
    serving = generation.serving
    extra = _extra_args(run)
    shards = str(max(1, generation.gpus_per_replica))
    if generation.engine == Engine.vllm:
        args = ["--model", generation.model, "--served-model-name", generation.model]
        args += ["--host", "0.0.0.0", "--port", str(SERVER_PORT), "--tensor-parallel-size", shards]
        if generation.revision:
            args += ["--revision", generation.revision]
        if serving.max_total_tokens:
            args += ["--max-model-len", str(serving.max_total_tokens)]
        return args + extra
    args = ["--model-id", generation.model, "--hostname", "0.0.0.0", "--port", str(SERVER_PORT)]
    args += ["--num-shard", shards]
    if generation.revision:
        args += ["--revision", generation.revision]
    if serving.max_input_tokens:
        args += ["--max-input-tokens", str(serving.max_input_tokens)]
    if serving.max_total_tokens:
        args += ["--max-total-tokens", str(serving.max_total_tokens)]
    return args + extra


def _gpu_server_container(run: GenerationRun, platform: Platform) -> dict[str, Any]:
    generation = run.spec.generation
    serving = generation.serving
    vllm = generation.engine == Engine.vllm
    default = platform.vllm_image if vllm else platform.tgi_image
    # The servers run as a non-root user: every cache they write points at a mounted volume.
    env = [
        env_var("HOME", "/tmp"),
        env_var("HF_HOME", "/data"),
        env_var("HUGGINGFACE_HUB_CACHE", "/data/hub"),
        env_var("XDG_CACHE_HOME", "/data/cache"),
    ]
    if serving.hf_token_secret:
        env.append(secret_env("HF_TOKEN", serving.hf_token_secret))
    memory = serving.memory or DEFAULT_SERVER_MEMORY
    limits: dict[str, str] = {"memory": memory}
    requests: dict[str, str] = {"memory": memory, "cpu": serving.cpu or DEFAULT_SERVER_CPU}
    if generation.gpus_per_replica:
        limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = str(generation.gpus_per_replica)
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
        # Not readOnlyRootFilesystem: TGI and vLLM write compiled kernels in places of their own.
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            cache_mount,
        ],
    }


def _placed(pod: dict[str, Any], serving: ServingSpec) -> dict[str, Any]:
    """The pod on the nodes the spec picks for serving (GPU pools are often tainted)."""
    if serving.node_selector:
        pod["nodeSelector"] = dict(serving.node_selector)
    if serving.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in serving.tolerations]
    return pod


def _gpu_server_pod(run: GenerationRun, platform: Platform) -> dict[str, Any]:
    serving = run.spec.generation.serving
    cache: dict[str, Any] = {"name": "model-cache"}
    if serving.model_cache:
        cache["persistentVolumeClaim"] = {"claimName": serving.model_cache.claim_name}
    else:
        # Weights fill the node's disk otherwise: past the limit the kubelet evicts the pod.
        cache["emptyDir"] = {"sizeLimit": DEFAULT_CACHE_SIZE}
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        # Both images run as any user whose caches are writable (HOME, HF_HOME on the volumes).
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_gpu_server_container(run, platform)],
        "volumes": [
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": serving.shm_size}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}},
            cache,
        ],
        "terminationGracePeriodSeconds": 60,
    }
    return _placed(pod, serving)


def _embedded_server_pod(run: GenerationRun, platform: Platform) -> dict[str, Any]:
    """The small model shipped with cosmoforge (llama.cpp on CPU): quickstarts run on any cluster."""
    args = ["serve-model", "--host", "0.0.0.0", "--port", str(SERVER_PORT)]
    resources = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    container = cosmo_container("server", args, platform, [], resources, role=Role.runtime)
    container["ports"] = [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}]
    container["readinessProbe"] = _http_probe(period=5, failures=3)
    container["livenessProbe"] = _http_probe(period=30, failures=3, timeout=10)
    return _placed(cosmo_pod([container], platform), run.spec.generation.serving)


def inference_deployment(run: GenerationRun, platform: Platform, replicas: int) -> Manifest | None:
    if not deploys_server(run):
        return None
    embedded = run.spec.generation.engine == Engine.embedded
    pod = _embedded_server_pod(run, platform) if embedded else _gpu_server_pod(run, platform)
    # An old server goes before its replacement is created. A surge pod would need a spare GPU,
    # which a full node does not have: it would stay Pending and stall the rollout. Meanwhile the
    # queue holds the prompts and the generators retry, so nothing is lost.
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return deployment(run, "inference", platform, replicas, pod, strategy)


def inference_service(run: GenerationRun, platform: Platform) -> Manifest | None:
    if not deploys_server(run):
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(run, "inference", "inference", platform),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(run.name, "inference"),
            "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
