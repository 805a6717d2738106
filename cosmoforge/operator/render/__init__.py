"""A GenerationRun's children as plain dicts: the one place that knows what the cluster runs.

Everything here is a pure function of the run and the `Platform` (what the operator knows
beyond the spec: images, NATS, the dispatcher, object storage), so `cosmo render`, the tests
and the operator see exactly the same manifests, and a change to a manifest is reviewed as a
change to a function. Nothing here talks to Kubernetes; the handlers adopt and apply.

One module per child kind: `inference` (server Deployment and Service), `generator`, `keda`,
`jobs` (post-generation stages and their worker pools), `clustering` (Jobs before generation),
all on `common`. `render_all` is the
entry point; the names below are the package's interface.
"""

from __future__ import annotations

from cosmoforge.operator.render.clustering import clustering_sources, clustering_stages, with_topics_from
from cosmoforge.operator.render.common import (
    COMPONENT_LABEL,
    MANAGED_BY,
    RUN_LABEL,
    SERVER_PORT,
    UID,
    Manifest,
    Platform,
    RenderError,
    Role,
    child_name,
    deploys_server,
    endpoint_url,
    labels,
    output_uri,
    run_root,
    selector_labels,
)
from cosmoforge.operator.render.generator import generator_deployment, generator_replicas
from cosmoforge.operator.render.inference import inference_deployment, inference_service, server_args
from cosmoforge.operator.render.jobs import STAGE_ROLES, Pool, Stage, pool_job, stage_job, stage_jobs, stages
from cosmoforge.operator.render.keda import scaled_object
from cosmoforge.spec.model import GenerationRun

__all__ = [
    "COMPONENT_LABEL",
    "MANAGED_BY",
    "RUN_LABEL",
    "SERVER_PORT",
    "STAGE_ROLES",
    "UID",
    "Manifest",
    "Platform",
    "Pool",
    "RenderError",
    "Role",
    "Stage",
    "child_name",
    "clustering_sources",
    "clustering_stages",
    "deploys_server",
    "endpoint_url",
    "generator_deployment",
    "generator_replicas",
    "inference_deployment",
    "inference_service",
    "initial_replicas",
    "labels",
    "output_uri",
    "pool_job",
    "render_all",
    "run_root",
    "scaled_object",
    "selector_labels",
    "server_args",
    "stage_job",
    "stage_jobs",
    "stages",
    "with_topics_from",
    "workloads",
]


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
    planned = clustering_stages(run, platform) + stages(run, platform)
    return docs + [job for stage in planned for job in stage_jobs(run, platform, stage)]
