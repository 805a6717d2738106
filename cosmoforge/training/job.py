"""The pieces of the Kubernetes Job that trains a run's model with nanotron on GPU nodes.

Pure functions: the spec's training section and a few cluster choices in, a shell script and
manifest parts (dicts) out. The operator's stage rendering (`cosmoforge.operator.render.jobs`)
wraps them in its own names, labels, image and locked-down container, and adopts and applies
them like every other stage Job; tests validate them offline with kubernetes-validate.

Why a plain `batch/v1` Job (Indexed completion mode) plus a headless Service, rather than a
JobSet or a Kubeflow PyTorchJob:

- it needs nothing installed in the cluster: JobSet and PyTorchJob are CRDs with their own
  controllers, which many GPU clusters (and every kind/minikube test cluster) do not have;
- an Indexed Job already gives what torchrun needs: a stable rank per pod (the completion
  index, passed as `--node_rank`) and a stable hostname per pod through the Service
  (`<job>-0.<service>` is the rendezvous address), so multi-node training works;
- its schema ships with Kubernetes, so the manifest is checked offline in strict mode.

What it lacks is gang restart, and object storage stands in for it. Every pod starts by
`prepare`: it renders the nanotron config from the run's `spec.yaml` and token metrics, and
when the run's folder already holds a nanotron checkpoint (`checkpoints/nanotron/latest.txt`)
it downloads that one and points `resume_checkpoint_path` at it. When one pod dies, the others'
collectives fail, their pods fail too, and the Job (a few failures per node allowed) starts
replacements with the same indexes, hostnames and ranks, which all resume from the same
checkpoint. The launcher uploads each checkpoint as nanotron saves it (every
`checkpointEvery` steps) and then moves `latest.txt`, so a replacement never resumes from
half a checkpoint. After the last step the first node converts the final checkpoint to the
transformers format (`cosmo convert-checkpoint`) beside it, where the evaluation stage reads.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from cosmoforge.spec.model import TrainingSpec
from cosmoforge.training import TrainingError
from cosmoforge.training.metrics import PROGRESS_FILE
from cosmoforge.training.nanotron_config import CONFIG_FILE

SCRATCH = "/checkpoints"  # the pod's local disk: nanotron writes here, the launcher uploads
MASTER_PORT = 29500
NANOTRON = "nanotron"  # nanotron's own checkpoints, under the train stage's output folder
# The trainer image names the interpreter that has nanotron (it cannot share cosmo's).
NANOTRON_PYTHON = "${COSMO_NANOTRON_PYTHON:-python}"


@dataclass(frozen=True)
class GpuNodes:
    """Cluster-side sizing of a training pod that the spec does not carry (per GPU, so a node of
    8 GPUs asks for 32 CPUs and 256Gi)."""

    gpu_resource: str = "nvidia.com/gpu"
    cpu_per_gpu: int = 4
    memory_per_gpu_gi: int = 32
    shm_size: str = "64Gi"
    scratch_size: str = "500Gi"
    # Pod failures allowed per node before the Job (and the stage) fails.
    restarts_per_node: int = 3


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class TrainingPaths:
    """Where the Job reads and writes, as fsspec URIs (see cosmoforge.storage)."""

    root: str  # <output.uri>/<run>
    tokens: str
    output: str  # the train stage's output folder: what evaluation reads
    nanotron: str
    metrics: str  # the progress file, the same the CPU trainer writes


def training_paths(root: str, tokens: str = "tokens", output: str = "checkpoints") -> TrainingPaths:
    """The layout under the run's root; `tokens` and `output` are the stage chain's folders."""
    root = root.rstrip("/")
    out = f"{root}/{output}"
    return TrainingPaths(root, f"{root}/{tokens}", out, f"{out}/{NANOTRON}", f"{out}/{PROGRESS_FILE}")


def uses_nanotron(training: TrainingSpec) -> bool:
    """`tiny` trains on the CPU trainer inside a plain stage Job; every other preset on GPUs."""
    return training.preset != "tiny"


def node_layout(gpus: int, gpus_per_node: int) -> Layout:
    """Nodes and processes per node for a world of `gpus` ranks."""
    if gpus_per_node < 1:
        raise TrainingError(f"gpus per node must be at least 1, got {gpus_per_node}")
    if gpus <= gpus_per_node:
        return Layout(1, gpus)
    if gpus % gpus_per_node:
        raise TrainingError(
            f"dp*tp*pp = {gpus} GPUs do not fill whole nodes of {gpus_per_node}: change parallelism"
        )
    return Layout(gpus // gpus_per_node, gpus_per_node)


def layout(training: TrainingSpec) -> Layout:
    par = training.parallelism
    return node_layout(par.dp * par.tp * par.pp, par.gpus_per_node)


def torchrun_args(nodes: Layout, master: str) -> list[str]:
    """torchrun's options: standalone on one node, else a static rendezvous at index 0's pod."""
    if nodes.nodes == 1:
        return ["--standalone", "--nnodes=1", f"--nproc_per_node={nodes.gpus_per_node}"]
    return [
        f"--nnodes={nodes.nodes}",
        f"--nproc_per_node={nodes.gpus_per_node}",
        '--node_rank="$NODE_RANK"',
        f"--master_addr={master}",
        f"--master_port={MASTER_PORT}",
    ]


def launch_script(paths: TrainingPaths, nodes: Layout, master: str) -> str:
    """What each training pod runs: prepare (config, resume), torchrun + nanotron, then, on the
    first node only, the conversion for evaluation."""
    quote = shlex.quote
    config = f"{SCRATCH}/{CONFIG_FILE}"
    prepare = ["python", "-m", "cosmoforge.training.nanotron_launch", "prepare"]
    prepare += [
        "--root",
        quote(paths.root),
        "--tokens",
        quote(paths.tokens),
        "--checkpoints",
        quote(paths.nanotron),
    ]
    prepare += ["--metrics", quote(paths.metrics), "--scratch", SCRATCH]
    train = [NANOTRON_PYTHON, "-m", "torch.distributed.run", *torchrun_args(nodes, master)]
    train += ["-m", "cosmoforge.training.nanotron_launch", "train", "--config-file", config]
    convert = ["cosmo", "convert-checkpoint", quote(paths.nanotron), "--out", quote(paths.output)]
    convert += ["--tokens", quote(paths.tokens)]
    return "\n".join(
        [
            "set -eu",
            " ".join(prepare),
            " ".join(train),
            # Every node's torchrun returns only after the last checkpoint is uploaded.
            f'if [ "$NODE_RANK" = 0 ]; then {" ".join(convert)}; fi',
        ]
    )


def gpu_resources(nodes: Layout, sizing: GpuNodes) -> dict[str, Any]:
    gpus = {sizing.gpu_resource: str(nodes.gpus_per_node)}
    cpu = str(sizing.cpu_per_gpu * nodes.gpus_per_node)
    memory = f"{sizing.memory_per_gpu_gi * nodes.gpus_per_node}Gi"
    return {"requests": {"cpu": cpu, "memory": memory, **gpus}, "limits": {"memory": memory, **gpus}}


def node_rank_env() -> list[dict[str, Any]]:
    return [
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
        # nanotron overlaps tensor-parallel communication with compute only with one queue.
        {"name": "CUDA_DEVICE_MAX_CONNECTIONS", "value": "1"},
        {"name": "OMP_NUM_THREADS", "value": "1"},
        # A collective whose peer died fails instead of hanging, so the pod fails and is replaced.
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
    ]


def training_volumes(sizing: GpuNodes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container mounts) beyond the common ones."""
    volumes = [
        # NCCL and the dataloader workers exchange tensors through shared memory.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": sizing.shm_size}},
        {"name": "scratch", "emptyDir": {"sizeLimit": sizing.scratch_size}},
    ]
    mounts = [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "scratch", "mountPath": SCRATCH}]
    return volumes, mounts


def job_spec(nodes: Layout, template: dict[str, Any], container: str, sizing: GpuNodes) -> dict[str, Any]:
    """The Indexed Job around a training pod template: one pod per node, ranks by index."""
    return {
        "completionMode": "Indexed",
        "completions": nodes.nodes,
        "parallelism": nodes.nodes,
        "backoffLimit": sizing.restarts_per_node * nodes.nodes,
        # A replacement starts once the pod it replaces is gone, so its hostname is free.
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                # Bad settings (exit 2 from prepare) fail the same way on every node and try.
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": container, "operator": "In", "values": [2]},
                },
                # A preempted or evicted node is not the training's fault: not counted.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": template,
    }


def headless_service(metadata: dict[str, Any], selector: dict[str, str]) -> dict[str, Any]:
    """Gives each trainer pod a DNS name (`<job>-<index>.<service>`) for torchrun's rendezvous."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "clusterIP": "None",
            # Ranks must find each other before any of them is Ready.
            "publishNotReadyAddresses": True,
            "selector": dict(selector),
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }
