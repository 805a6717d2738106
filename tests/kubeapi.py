"""A Kubernetes API for operator tests: kmock's emulator on a loopback port, in its own thread.

kmock (from kopf's author) keeps objects in memory and serves list, watch, create, merge
patch and delete like an API server, without admission, defaulting or controllers. It runs
on a private event loop so that the operator (another thread) and the test's blocking HTTP
calls never wait on each other.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import kmock
import yaml

from cosmoforge.spec.crd import PLURAL, SHORT_NAMES
from cosmoforge.spec.model import API_GROUP, API_VERSION, KIND

RUNS = f"/apis/{API_GROUP}/{API_VERSION}"


class KubeApi:
    def __init__(self, keda: bool = False) -> None:
        self.keda = keda
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="kmock", daemon=True)
        self._error: BaseException | None = None
        self._emulator: kmock.KubernetesEmulator | None = None
        self.url = ""
        self.http = httpx.Client(timeout=10.0)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # surfaced by start()
            self._error = error
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            emulator.resources.load_bundled()
            emulator.resources[f"{API_GROUP}/{API_VERSION}/{PLURAL}"] = kmock.ResourceInfo(
                kind=KIND,
                singular=KIND.lower(),
                namespaced=True,
                subresources={"status"},
                shortnames=set(SHORT_NAMES),
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            )
            if self.keda:
                emulator.resources["keda.sh/v1alpha1/scaledobjects"] = kmock.ResourceInfo(
                    kind="ScaledObject", singular="scaledobject", namespaced=True
                )
            self._emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> KubeApi:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError("kmock did not start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self.http.close()

    def creations(self, resource: str, namespace: str, name: str) -> int:
        """How many times an object was created (kmock keeps every version, deletions as None)."""

        async def count() -> int:
            assert self._emulator is not None
            try:
                history = list(self._emulator.objects[resource, namespace, name].history)
            except KeyError:
                return 0
            return sum(
                1 for i, v in enumerate(history) if v is not None and (i == 0 or history[i - 1] is None)
            )

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(count(), self._loop).result(10)

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}],
            "current-context": "kmock",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # --- plain HTTP, as kubectl would do it ---------------------------------------------------

    def get(self, path: str) -> dict[str, Any] | None:
        response = self.http.get(self.url + path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def items(self, path: str) -> list[dict[str, Any]]:
        found = self.get(path)
        return list((found or {}).get("items") or [])

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST like kubectl; the fields a real API server would set are set here (kmock does not)."""
        body = copy.deepcopy(body)
        meta = body.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("resourceVersion", "1")
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        response = self.http.post(self.url + path, json=body)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A merge patch; one that changes `spec` bumps `metadata.generation`, as the API server does."""
        current = self.get(path) if "spec" in body and not path.endswith("/status") else None
        if current is not None and current.get("spec") != body["spec"]:
            generation = int(current.get("metadata", {}).get("generation") or 1) + 1
            body = {**body, "metadata": {**body.get("metadata", {}), "generation": generation}}
        headers = {"Content-Type": "application/merge-patch+json"}
        response = self.http.patch(self.url + path, json=body, headers=headers)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def delete(self, path: str) -> None:
        response = self.http.delete(self.url + path)
        if response.status_code != 404:
            response.raise_for_status()


def runs_path(namespace: str, name: str | None = None) -> str:
    path = f"{RUNS}/namespaces/{namespace}/{PLURAL}"
    return f"{path}/{name}" if name else path


def deployments_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    return f"{path}/{name}" if name else path


def services_path(namespace: str, name: str | None = None) -> str:
    path = f"/api/v1/namespaces/{namespace}/services"
    return f"{path}/{name}" if name else path


def pods_path(namespace: str, name: str | None = None) -> str:
    path = f"/api/v1/namespaces/{namespace}/pods"
    return f"{path}/{name}" if name else path


def jobs_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    return f"{path}/{name}" if name else path
