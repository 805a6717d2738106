"""The generator workers' Deployment, and how many of them follow the inference servers."""

from __future__ import annotations

import math

from cosmoforge.operator.render.common import (
    Manifest,
    Platform,
    Role,
    cosmo_container,
    cosmo_pod,
    deployment,
    deploys_server,
    endpoint_url,
    env_var,
    output_uri,
    run_key,
    secret_env,
)
from cosmoforge.spec.model import GenerationRun

# Where each generator serves its Prometheus metrics; the chart's PodMonitor scrapes this port.
METRICS_PORT = 9100


def generator_args(run: GenerationRun) -> list[str]:
    # The key, not the name: it names the run's stream and, below `--out`, its folder.
    return [
        "worker", "--nats", "$(COSMO_NATS_URL)", "--out", "$(COSMO_OUTPUT)", "--run", run_key(run),
        "--endpoint", "$(COSMO_ENDPOINT)", "--worker-id", "$(POD_NAME)",
        "--metrics-port", str(METRICS_PORT), "--log-format", "json",
    ]  # fmt: skip


def generator_deployment(run: GenerationRun, platform: Platform, replicas: int) -> Manifest:
    generation = run.spec.generation
    env = [
        env_var("COSMO_NATS_URL", platform.nats_url),
        env_var("COSMO_OUTPUT", output_uri(run, platform)),
        env_var("COSMO_ENDPOINT", endpoint_url(run)),
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    if generation.api_key_secret:
        env += [secret_env("OPENAI_API_KEY", generation.api_key_secret)]
        env += [secret_env("HF_TOKEN", generation.api_key_secret)]
    resources = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    container = cosmo_container("generator", generator_args(run), platform, env, resources, role=Role.runtime)
    container["ports"] = [{"name": "metrics", "containerPort": METRICS_PORT}]
    # A worker drains on SIGTERM: in-flight prompts finish or go back to the queue unacked.
    pod = cosmo_pod([container], platform, terminationGracePeriodSeconds=90)
    return deployment(run, "generator", platform, replicas, pod)


def generator_replicas(run: GenerationRun, server_replicas: int) -> int:
    """Generators follow the servers: `workers` pods at full scale, proportionally fewer below."""
    generation = run.spec.generation
    if server_replicas <= 0:
        return 0
    if not deploys_server(run):
        return generation.workers
    return max(1, math.ceil(generation.workers * server_replicas / max(1, generation.replicas.max)))
