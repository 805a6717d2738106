"""Acting on a run's children: create or converge, scale, pause KEDA, delete.

The edge where the operator's decisions meet the API server. Every call is idempotent (names
are deterministic, a second create is a conflict that turns into a converge), so a replayed
event or a restarted operator repeats them harmlessly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import kopf

from cosmoforge.operator.kube import CHILD_KINDS, DEPLOYMENT, JOB, SCALED_OBJECT, Kube, KubeError, kind_of
from cosmoforge.operator.render import RUN_LABEL, child_name, generator_replicas
from cosmoforge.spec.model import GenerationRun

KEDA_PAUSE = "autoscaling.keda.sh/paused-replicas"


def contains(actual: Any, desired: Any) -> bool:
    """True when `actual` already holds everything `desired` says (servers add defaults)."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(contains(actual.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired or str(actual) == str(desired))


async def apply(kube: Kube, manifest: dict[str, Any], keep_replicas: bool = False) -> dict[str, Any]:
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
    if contains(existing, desired):
        return existing
    return await kube.patch(kind, namespace, name, desired)


async def adopt_and_apply(
    kube: Kube, owner: kopf.Body, manifest: dict[str, Any], keep_replicas: bool = False
) -> dict[str, Any]:
    """The child owned by the run (deleted with it), then applied."""
    kopf.adopt(manifest, owner=owner, nested=["spec.template"])
    return await apply(kube, manifest, keep_replicas=keep_replicas)


async def scale(kube: Kube, run: GenerationRun, replicas: int) -> None:
    """Servers to `replicas`, generators to follow them; in keda mode, KEDA paused at zero."""
    namespace = run.metadata.namespace or ""
    server = await kube.get(DEPLOYMENT, namespace, child_name(run.name, "inference"))
    if server is not None and server.get("spec", {}).get("replicas") != replicas:
        await kube.patch(DEPLOYMENT, namespace, server["metadata"]["name"], {"spec": {"replicas": replicas}})
    generator = await kube.get(DEPLOYMENT, namespace, child_name(run.name, "generator"))
    wanted = generator_replicas(run, replicas)
    if generator is not None and generator.get("spec", {}).get("replicas") != wanted:
        await kube.patch(
            DEPLOYMENT, namespace, child_name(run.name, "generator"), {"spec": {"replicas": wanted}}
        )
    if run.spec.generation.autoscaling.mode == "keda":
        await pause_keda(kube, run, namespace, paused=replicas == 0)


async def pause_keda(kube: Kube, run: GenerationRun, namespace: str, paused: bool) -> None:
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


def owned_by(item: Mapping[str, Any], owner: kopf.Body) -> bool:
    uid = owner.metadata.uid
    references = item.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in references) or not references


async def delete_all(kube: Kube, owner: kopf.Body, namespace: str) -> int:
    """Every child of the run (by label, and owned by it): how many were deleted."""
    removed = 0
    for kind in CHILD_KINDS:
        for item in await kube.list(kind, namespace, {RUN_LABEL: owner.metadata.name}):
            if owned_by(item, owner):
                removed += await kube.delete(kind, namespace, item["metadata"]["name"])
    return removed
