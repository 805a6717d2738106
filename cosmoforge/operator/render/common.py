"""What every child of a run shares: names, labels, where the data is, locked-down containers.

The rest of the render package builds on these, so a label, the object-storage environment or
the restricted security context is written once and every child kind gets the same.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from cosmoforge.queue import topology
from cosmoforge.queue.auth import has_credentials
from cosmoforge.redaction import redact_urls
from cosmoforge.spec.confinement import StoragePolicy
from cosmoforge.spec.model import Engine, GenerationRun, SecretKeyRef

Manifest = dict[str, Any]

RUN_LABEL = "cosmoforge.io/run"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY = "cosmoforge-operator"
SERVER_PORT = 8080
UID = 10001
# Where the TGI and vLLM projects publish their images (TGI is not on Docker Hub).
DEFAULT_TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.4"
DEFAULT_VLLM_IMAGE = "docker.io/vllm/vllm-openai:v0.11.0"
DEFAULT_IMAGE = "cosmoforge:0.1.0"
DEFAULT_POSTPROCESS_IMAGE = "cosmoforge-postprocess:0.1.0"
DEFAULT_TRAINER_IMAGE = "cosmoforge-trainer:0.1.0"


class Role(StrEnum):
    """Which cosmoforge image a child runs: each role's image holds only what its commands need.

    `runtime`: generator workers and the embedded model server (as well as the operator and the
    dispatcher, which the chart runs); `postprocess`: dedup, decontamination, clustering and
    tokenization (datatrove, spaCy, a CPU torch); `trainer`: training and evaluation (CUDA
    PyTorch, nanotron, lighteval), gigabytes that no other pod should pull.
    """

    runtime = "runtime"
    postprocess = "postprocess"
    trainer = "trainer"


class RenderError(ValueError):
    """The spec cannot run on this cluster as configured; `field` names the spec field to change."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class Platform:
    """Cluster-side settings the chart passes to the operator as environment variables.

    `image` is the runtime image; `image_for` picks the image of a child's role. `nats_secret`
    names the Secret (in each run namespace) whose keys are the NATS credentials' environment
    variables (`cosmoforge.queue.auth`): `nats_url` itself never carries any, because it is
    written into every child's spec."""

    image: str = DEFAULT_IMAGE
    postprocess_image: str = DEFAULT_POSTPROCESS_IMAGE
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    pull_policy: str = "IfNotPresent"
    tgi_image: str = DEFAULT_TGI_IMAGE
    vllm_image: str = DEFAULT_VLLM_IMAGE
    nats_url: str = "nats://nats:4222"
    nats_monitoring: str = "nats:8222"
    dispatcher: str | None = None
    output_base: str | None = None
    output_allow: tuple[str, ...] = ()  # prefixes outside output_base that outputs may use
    storage_endpoint: str | None = None
    storage_region: str | None = None
    storage_secret: str | None = None
    nats_secret: str | None = None
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
            postprocess_image=pick("COSMO_POSTPROCESS_IMAGE", None) or base.postprocess_image,
            trainer_image=pick("COSMO_TRAINER_IMAGE", None) or base.trainer_image,
            pull_policy=pick("COSMO_IMAGE_PULL_POLICY", base.pull_policy) or base.pull_policy,
            tgi_image=pick("COSMO_TGI_IMAGE", base.tgi_image) or base.tgi_image,
            vllm_image=pick("COSMO_VLLM_IMAGE", base.vllm_image) or base.vllm_image,
            nats_url=pick("COSMO_NATS_URL", base.nats_url) or base.nats_url,
            nats_monitoring=pick("COSMO_NATS_MONITORING", base.nats_monitoring) or base.nats_monitoring,
            dispatcher=pick("COSMO_DISPATCHER", None),
            output_base=pick("COSMO_OUTPUT_BASE", None),
            output_allow=tuple(
                p.strip() for p in (pick("COSMO_OUTPUT_ALLOW", "") or "").split(",") if p.strip()
            ),
            storage_endpoint=pick("COSMO_STORAGE_ENDPOINT", None),
            storage_region=pick("COSMO_STORAGE_REGION", None),
            storage_secret=pick("COSMO_STORAGE_SECRET", None),
            nats_secret=pick("COSMO_NATS_SECRET", None),
            service_account=pick("COSMO_CHILD_SERVICE_ACCOUNT", None),
        )

    def storage_policy(self) -> StoragePolicy:
        """What specs may name in the cluster: outputs under the storage root (or the allowed
        prefixes), never a pod's own files."""
        return StoragePolicy(root=self.output_base, allowed=self.output_allow, local_paths=False)

    def __post_init__(self) -> None:
        if has_credentials(self.nats_url):
            # The message holds no part of the URL: the part that would help is the secret.
            raise ValueError(
                "the NATS URL carries credentials; give them as a Secret (the chart's nats.auth) instead"
            )

    def image_for(self, role: Role) -> str:
        images = {
            Role.runtime: self.image,
            Role.postprocess: self.postprocess_image,
            Role.trainer: self.trainer_image,
        }
        return images[role]


# --- names and labels ---------------------------------------------------------------------


# An Indexed Job's pods get the hostname `<job>-<index>`, a DNS label too (nanotron's nodes
# meet at `<job>-0`): every child's name leaves room for an index of up to five digits.
MAX_CHILD_NAME = 63 - len("-99999")


def child_name(run: str, part: str) -> str:
    """`<run>-<part>`, a valid DNS-1035 label (services need one) that an index still fits after."""
    base = run if run[0].isalpha() else f"gr-{run}"
    name = f"{base}-{part}"
    if len(name) <= MAX_CHILD_NAME:
        return name
    digest = hashlib.sha256(run.encode()).hexdigest()[:8]
    keep = MAX_CHILD_NAME - len(part) - len(digest) - 2
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


def child_metadata(run: GenerationRun, component: str, part: str, platform: Platform) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": child_name(run.name, part),
        "labels": labels(run.name, component, platform),
    }
    if run.metadata.namespace:
        meta["namespace"] = run.metadata.namespace
    return meta


def deployment(
    run: GenerationRun,
    component: str,
    platform: Platform,
    replicas: int,
    pod: dict[str, Any],
    strategy: dict[str, Any] | None = None,
) -> Manifest:
    """`replicas` copies of `pod` as the run's `component`, selected by the run and component."""
    meta = child_metadata(run, component, component, platform)
    spec: dict[str, Any] = {
        "replicas": replicas,
        "selector": {"matchLabels": selector_labels(run.name, component)},
        **({"strategy": strategy} if strategy else {}),
        "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod},
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


# --- where things are ---------------------------------------------------------------------


def _no_credentials(field: str, uri: str) -> str:
    """Rendered URIs go into pod specs for anyone who can read them: credentials come from Secrets."""
    if redact_urls(uri) != uri:
        raise RenderError(field, "carries credentials in the URI; give them as a Secret instead")
    return uri


def run_key(run: GenerationRun) -> str:
    """The run's identity outside Kubernetes: `<namespace>/<name>` (the bare name for a spec
    rendered without a namespace). The dispatcher's registry and the run's stream are named by
    it, and it is the run's folder below `output_uri`: give it to every `--run` next to an
    `--out output_uri(...)`, so that commands find `run_root`."""
    return topology.run_key(run.metadata.namespace, run.name)


def output_uri(run: GenerationRun, platform: Platform) -> str:
    """The run's `output.uri` as pods can reach it: object storage, never a pod's own disk.

    Shared by every run that names it: each run's data lives in its own `run_root` below."""
    uri = _no_credentials("spec.output.uri", run.spec.output.uri)
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
    """`<output.uri>/<namespace>/<name>`: the same name in two namespaces never shares a folder.
    The dispatcher's `RunStore` for the run and the generators' `--out`/`--run` land here too."""
    return f"{output_uri(run, platform)}/{run_key(run)}"


def deploys_server(run: GenerationRun) -> bool:
    """True when the operator runs the inference server itself (no external endpoint)."""
    generation = run.spec.generation
    return generation.endpoint is None and generation.engine != Engine.openai


def endpoint_url(run: GenerationRun) -> str:
    if run.spec.generation.endpoint:
        return _no_credentials("spec.generation.endpoint", run.spec.generation.endpoint)
    return f"http://{child_name(run.name, 'inference')}:{SERVER_PORT}"


# --- shared container parts ---------------------------------------------------------------


def env_var(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
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
    env = [env_var("HOME", "/tmp"), env_var("HF_HOME", "/tmp/hf"), env_var("XDG_CACHE_HOME", "/tmp/cache")]
    if platform.storage_endpoint:
        env.append(env_var("AWS_ENDPOINT_URL", platform.storage_endpoint))
    if platform.storage_region:
        env.append(env_var("AWS_DEFAULT_REGION", platform.storage_region))
    return env


def cosmo_container(
    name: str,
    args: list[str],
    platform: Platform,
    env: list[dict[str, Any]],
    resources: dict[str, Any],
    *,
    role: Role,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": platform.image_for(role),
        "imagePullPolicy": platform.pull_policy,
        "command": ["cosmo"],
        "args": args,
        "env": cosmo_env(platform) + env,
        "resources": resources,
        "securityContext": restricted_container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    secrets = [platform.storage_secret]
    if _talks_to_nats(args, env):
        secrets.append(platform.nats_secret)
    if any(secrets):
        container["envFrom"] = [{"secretRef": {"name": name}} for name in secrets if name]
    return container


def _talks_to_nats(args: list[str], env: list[dict[str, Any]]) -> bool:
    """Only the containers that open a NATS connection get its credentials."""
    return "--nats" in args or any(entry.get("name") == "COSMO_NATS_URL" for entry in env)


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
