"""Render the Kubernetes objects that train a run's model with nanotron on GPUs.

Pure functions: a run and a few cluster choices in, manifests (dicts) out; the operator adopts
and applies them, tests validate them offline with kubernetes-validate.

Why a plain `batch/v1` Job (Indexed completion mode) plus a headless Service, rather than a
JobSet or a Kubeflow PyTorchJob:

- it needs nothing installed in the cluster: JobSet and PyTorchJob are CRDs with their own
  controllers, which many GPU clusters (and every kind/minikube test cluster) do not have;
- an Indexed Job already gives what torchrun needs: a stable rank per pod (the completion
  index, passed as `--node_rank`) and a stable hostname per pod through the Service
  (`<job>-0.<service>` is the rendezvous address), so multi-node training works;
- its schema ships with Kubernetes, so the manifest is checked offline in strict mode.

What it lacks is gang restart: when one node fails the Job fails (backoffLimit 0, on purpose,
as a lone restarted rank cannot rejoin a running torchrun group) and the operator decides
whether to start again. Where a cluster runs JobSet, the same pod template moves into a
`replicatedJobs` entry unchanged.

Data and results live in object storage; the pod only holds scratch space. The launcher reads
token windows from `<run>/tokens` through fsspec, writes progress to
`<run>/metrics/training.json` (step, loss, tokens/s; the operator's timer copies it into the
run's status), and uploads checkpoints from a local emptyDir to `<run>/checkpoints` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cosmoforge.spec.model import GenerationRun
from cosmoforge.training import TrainingError
from cosmoforge.training.nanotron_config import CONFIG_FILE, DataPaths, render_config, to_yaml, world_size

CONFIG_MOUNT = "/etc/cosmoforge"
CHECKPOINT_MOUNT = "/checkpoints"
MASTER_PORT = 29500
COMPONENT = "trainer"


@dataclass(frozen=True)
class ClusterOptions:
    """Cluster-side choices the spec does not carry."""

    image: str
    gpus_per_node: int = 8
    gpu_resource: str = "nvidia.com/gpu"
    cpu_per_node: str = "32"
    memory_per_node: str = "256Gi"
    shm_size: str = "64Gi"
    scratch_size: str = "500Gi"
    # Secret with object-storage credentials (AWS_ACCESS_KEY_ID, ...), loaded as environment.
    storage_secret: str | None = None
    # Secret with HF_TOKEN, for gated tokenizers on the Hub.
    hub_secret: str | None = None
    service_account: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    active_deadline_seconds: int | None = None


@dataclass(frozen=True)
class RunPaths:
    tokens: str
    checkpoints: str
    metrics: str


def run_paths(run: GenerationRun) -> RunPaths:
    """The storage layout's training folders for this run (see cosmoforge.storage)."""
    root = f"{run.spec.output.uri.rstrip('/')}/{run.name}"
    return RunPaths(f"{root}/tokens", f"{root}/checkpoints", f"{root}/metrics/training.json")


def _name(run_name: str, suffix: str) -> str:
    # Pod hostnames of an Indexed Job are "<job>-<index>" and must stay within 63 characters.
    return f"{run_name[: 63 - len(suffix) - 6].rstrip('-')}-{suffix}"


def job_name(run_name: str) -> str:
    return _name(run_name, "train")


def service_name(run_name: str) -> str:
    return _name(run_name, "train-nodes")


def config_map_name(run_name: str) -> str:
    return _name(run_name, "train-config")


def labels(run_name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "cosmoforge",
        "app.kubernetes.io/component": COMPONENT,
        "cosmoforge.io/run": run_name,
    }


def node_layout(gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, processes per node) for a world of `gpus` ranks."""
    if gpus_per_node < 1:
        raise TrainingError(f"gpus per node must be at least 1, got {gpus_per_node}")
    if gpus <= gpus_per_node:
        return 1, gpus
    if gpus % gpus_per_node:
        raise TrainingError(
            f"dp*tp*pp = {gpus} GPUs do not fill whole nodes of {gpus_per_node}: change parallelism"
        )
    return gpus // gpus_per_node, gpus_per_node


def nanotron_config(
    run: GenerationRun, vocab_size: int | None = None, eos_token_id: int = 0
) -> dict[str, Any]:
    if run.spec.training is None:
        raise TrainingError(f"run {run.name} has no training section")
    paths = run_paths(run)
    return render_config(
        run.spec.training,
        run_name=run.name,
        paths=DataPaths(paths.tokens, paths.checkpoints, paths.metrics, local_checkpoints=CHECKPOINT_MOUNT),
        vocab_size=vocab_size,
        eos_token_id=eos_token_id,
    )


def training_config_map(
    run: GenerationRun, config: dict[str, Any], namespace: str | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": config_map_name(run.name), "labels": labels(run.name)}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {CONFIG_FILE: to_yaml(config)},
    }


def training_service(run: GenerationRun, namespace: str | None = None) -> dict[str, Any]:
    """Headless Service giving each trainer pod a DNS name, for torchrun's rendezvous."""
    metadata: dict[str, Any] = {"name": service_name(run.name), "labels": labels(run.name)}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "clusterIP": "None",
            # Ranks must find each other before any of them is Ready.
            "publishNotReadyAddresses": True,
            "selector": {"job-name": job_name(run.name)},
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def _torchrun_args(run: GenerationRun, nodes: int, per_node: int) -> list[str]:
    launch = ["-m", "cosmoforge.training.nanotron_launch", "--config-file", f"{CONFIG_MOUNT}/{CONFIG_FILE}"]
    if nodes == 1:
        return ["--standalone", "--nnodes=1", f"--nproc_per_node={per_node}", *launch]
    return [
        f"--nnodes={nodes}",
        f"--nproc_per_node={per_node}",
        "--node_rank=$(NODE_RANK)",
        f"--master_addr={job_name(run.name)}-0.{service_name(run.name)}",
        f"--master_port={MASTER_PORT}",
        *launch,
    ]


def training_job(
    run: GenerationRun, options: ClusterOptions, config: dict[str, Any], namespace: str | None = None
) -> dict[str, Any]:
    """The Job running torchrun + nanotron over `dp*tp*pp` GPUs, one pod per node."""
    nodes, per_node = node_layout(world_size(config), options.gpus_per_node)
    env: list[dict[str, Any]] = [
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
        # nanotron overlaps tensor-parallel communication with compute only with one queue.
        {"name": "CUDA_DEVICE_MAX_CONNECTIONS", "value": "1"},
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": "HF_HOME", "value": f"{CHECKPOINT_MOUNT}/.hf"},
    ]
    env_from = [
        {"secretRef": {"name": secret, "optional": False}}
        for secret in (options.storage_secret, options.hub_secret)
        if secret
    ]
    gpus = {options.gpu_resource: str(per_node)}
    container: dict[str, Any] = {
        "name": COMPONENT,
        "image": options.image,
        "command": ["torchrun"],
        "args": _torchrun_args(run, nodes, per_node),
        "env": env,
        "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT}],
        "resources": {
            "requests": {"cpu": options.cpu_per_node, "memory": options.memory_per_node, **gpus},
            "limits": {"memory": options.memory_per_node, **gpus},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "scratch", "mountPath": CHECKPOINT_MOUNT},
        ],
    }
    if env_from:
        container["envFrom"] = env_from
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(run.name),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(run.name)}},
            # NCCL and the dataloader workers exchange tensors through shared memory.
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}},
            {"name": "scratch", "emptyDir": {"sizeLimit": options.scratch_size}},
        ],
        "tolerations": [{"key": options.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}],
    }
    if options.service_account:
        pod_spec["serviceAccountName"] = options.service_account
    if options.node_selector:
        pod_spec["nodeSelector"] = dict(options.node_selector)
    metadata: dict[str, Any] = {"name": job_name(run.name), "labels": labels(run.name)}
    if namespace:
        metadata["namespace"] = namespace
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "template": {"metadata": {"labels": labels(run.name)}, "spec": pod_spec},
    }
    if options.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = options.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def training_manifests(
    run: GenerationRun,
    options: ClusterOptions,
    namespace: str | None = None,
    vocab_size: int | None = None,
    eos_token_id: int = 0,
) -> list[dict[str, Any]]:
    """ConfigMap (nanotron YAML), headless Service (multi-node only) and Job, in apply order."""
    config = nanotron_config(run, vocab_size=vocab_size, eos_token_id=eos_token_id)
    nodes, _ = node_layout(world_size(config), options.gpus_per_node)
    manifests = [training_config_map(run, config, namespace)]
    if nodes > 1:
        manifests.append(training_service(run, namespace))
    manifests.append(training_job(run, options, config, namespace))
    return manifests
