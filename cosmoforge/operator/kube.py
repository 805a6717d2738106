"""A small async Kubernetes client for the few calls the operator makes on its children.

kopf brings aiohttp and logs in (service account or kubeconfig); this client reuses kopf's
connection info instead of a second, synchronous client library, and speaks only what the
operator needs: get, create, merge-patch, delete and list-by-label of namespaced objects.
Merge patches only, so the same calls work against any API server, kmock included.

Two things a long-lived in-cluster client must do that a one-shot one need not: the kubelet
rotates the service account's token file (bound tokens expire after about an hour), so the
token is read again every minute and at once after a 401; and kinds the cluster may lack or
the Role may not grant (KEDA's ScaledObject) read as empty rather than failing the caller,
so deleting a run never hangs on its finalizer.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf


class KubeError(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(f"HTTP {status}: {message}")


SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
TOKEN_REFRESH_SECONDS = 60.0


@dataclass(frozen=True)
class Kind:
    """`optional`: a kind from an add-on (KEDA) that the cluster or the Role may not have."""

    api_version: str
    kind: str
    plural: str
    optional: bool = False

    def path(self, namespace: str, name: str | None = None) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{prefix}/namespaces/{quote(namespace)}/{self.plural}"
        return f"{path}/{quote(name)}" if name else path


DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
SERVICE = Kind("v1", "Service", "services")
JOB = Kind("batch/v1", "Job", "jobs")
SCALED_OBJECT = Kind("keda.sh/v1alpha1", "ScaledObject", "scaledobjects", optional=True)
POD = Kind("v1", "Pod", "pods")  # read only: a failed stage's pods say why it failed
CHILD_KINDS = (DEPLOYMENT, SERVICE, JOB, SCALED_OBJECT)


def kind_of(manifest: Mapping[str, Any]) -> Kind:
    for kind in CHILD_KINDS:
        if kind.api_version == manifest["apiVersion"] and kind.kind == manifest["kind"]:
            return kind
    raise ValueError(f"the operator does not manage {manifest['apiVersion']} {manifest['kind']}")


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    if not info.server.startswith("https"):
        return True
    context = ssl.create_default_context(cafile=str(info.ca_path) if info.ca_path else None)
    if info.ca_data:
        data = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
        context.load_verify_locations(cadata=data)
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
    return context


def _absent(error: KubeError, kind: Kind) -> bool:
    """Not installed (404), or an optional kind this operator may not touch (403)."""
    return error.status == 404 or (error.status == 403 and kind.optional)


class TokenSource:
    """The bearer token: the service account's file, read again when a minute old or after a
    401 (the kubelet rewrites it before it expires), else what kopf logged in with."""

    def __init__(self, path: Path = SERVICE_ACCOUNT_TOKEN, max_age: float = TOKEN_REFRESH_SECONDS):
        self.path, self.max_age = path, max_age
        self._token: str | None = None
        self._read_at = float("-inf")

    def token(self, fallback: str | None, *, fresh: bool = False) -> str | None:
        if fresh or time.monotonic() - self._read_at >= self.max_age:
            self._read_at = time.monotonic()
            try:
                self._token = self.path.read_text(encoding="utf-8").strip() or None
            except OSError:  # not in a cluster: kubeconfig credentials, kopf's to refresh
                self._token = None
        return self._token or fallback


class Kube:
    """One aiohttp session per operator run, authenticated with kopf's connection info and the
    service account's current token."""

    def __init__(
        self, connection: Callable[[], kopf.ConnectionInfo | None], tokens: TokenSource | None = None
    ):
        # Resolved on first use: kopf logs in after the startup handlers have run.
        self.connection = connection
        self.tokens = tokens or TokenSource()
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            info = self.connection()
            if info is None:
                raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=5)
            headers = {"Accept": "application/json"}
            auth = None
            if info.username and info.password:
                auth = aiohttp.BasicAuth(info.username, info.password)
            self._session = aiohttp.ClientSession(
                base_url=info.server.rstrip("/") + "/",
                headers=headers,
                auth=auth,
                connector=aiohttp.TCPConnector(ssl=_ssl_context(info)),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _authorization(self, *, fresh: bool = False) -> dict[str, str]:
        info = self.connection()
        token = self.tokens.token(info.token if info else None, fresh=fresh)
        if not token:
            return {}
        scheme = (info.scheme if info else None) or "Bearer"
        return {"Authorization": f"{scheme} {token}"}

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        extra = kwargs.pop("headers", {})
        for attempt in (1, 2):
            headers = {**extra, **self._authorization(fresh=attempt == 2)}
            async with self.session.request(method, path.lstrip("/"), headers=headers, **kwargs) as response:
                if response.status == 401 and attempt == 1:
                    continue  # a rotated token: read it again and retry once
                if response.status >= 400:
                    text = await response.text()
                    raise KubeError(response.status, text[:500])
                return await response.json(content_type=None)

    async def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._call("GET", kind.path(namespace, name))
        except KubeError as error:
            if error.status == 404:
                return None
            raise
        return result

    async def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        kind = kind_of(manifest)
        namespace = manifest["metadata"]["namespace"]
        result: dict[str, Any] = await self._call("POST", kind.path(namespace), json=manifest)
        return result

    async def patch(self, kind: Kind, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        result: dict[str, Any] = await self._call(
            "PATCH", kind.path(namespace, name), json=patch, headers=headers
        )
        return result

    async def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        """Delete with background propagation (a Job's pods go too); False when already gone."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            await self._call("DELETE", kind.path(namespace, name), json=body)
        except KubeError as error:
            if _absent(error, kind):
                return False
            raise
        return True

    async def list(self, kind: Kind, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """Objects carrying all `labels`; filtered here too, for servers that ignore selectors."""
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        try:
            result = await self._call("GET", kind.path(namespace), params={"labelSelector": selector})
        except KubeError as error:
            if _absent(error, kind):  # KEDA not installed, or not granted: nothing of it to list
                return []
            raise
        items: list[dict[str, Any]] = result.get("items") or []
        return [
            item
            for item in items
            if all(item.get("metadata", {}).get("labels", {}).get(k) == v for k, v in labels.items())
        ]


def operator_rules(keda: bool = True, events: bool = True) -> list[dict[str, list[str]]]:
    """The RBAC rules the operator needs: exactly the calls above and kopf's, nothing more.

    The chart's Role and manifests/rbac.yaml are tested against this list.
    """
    children = ["get", "list", "create", "patch", "delete"]
    runs = ["get", "list", "watch", "patch"]
    rules = [
        {"apiGroups": ["cosmoforge.io"], "resources": ["generationruns"], "verbs": runs},
        {"apiGroups": ["cosmoforge.io"], "resources": ["generationruns/status"], "verbs": ["get", "patch"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": children},
        {"apiGroups": [""], "resources": ["services"], "verbs": children},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "create", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},  # why a stage failed
    ]
    if keda:
        rules.append({"apiGroups": ["keda.sh"], "resources": ["scaledobjects"], "verbs": children})
    if events:
        rules.append({"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]})
    return rules
