"""Real service processes for tests: the dispatcher and generator workers, started as `cosmo` would.

Each is a child process running the real command line, so kill -9, SIGTERM and restarts do
to them what they do on a cluster; helpers wait for readiness through the services' own
interfaces (gRPC health, /metrics) rather than sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import COSMO
from cosmoforge.queue import free_port


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    log: Path
    port: int = 0
    metrics_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """kill -9: no drain, no goodbye."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Services:
    """Every process a test started, stopped at the end whatever happened."""

    folder: Path
    started: list[Service] = field(default_factory=list)

    def _spawn(self, name: str, command: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.folder / f"{name}-{len(self.started)}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        return process, log

    def dispatcher(self, nats_url: str, port: int = 0, *extra: str, metrics: bool = False) -> Service:
        port = port or free_port()
        metrics_port = free_port() if metrics else 0
        command = [*COSMO, "dispatcher", "--nats", nats_url, "--host", "127.0.0.1", "--port", str(port),
                   "--metrics-port", str(metrics_port), "--ack-wait", "3", *extra]  # fmt: skip
        process, log = self._spawn("dispatcher", command)
        service = Service(process, log, port, metrics_port)
        self.started.append(service)
        wait_serving(service)
        return service

    def worker(
        self, nats_url: str, out: Path, run: str, endpoint: str, worker_id: str, *extra: str
    ) -> Service:
        command = [*COSMO, "worker", "--nats", nats_url, "--out", str(out), "--run", run,
                   "--endpoint", endpoint, "--worker-id", worker_id, *extra]  # fmt: skip
        process, log = self._spawn(f"worker-{worker_id}", command)
        service = Service(process, log)
        self.started.append(service)
        return service

    def stop_all(self) -> None:
        for service in self.started:
            with contextlib.suppress(Exception):
                service.terminate(timeout=15)


@contextlib.contextmanager
def services(folder: Path) -> Iterator[Services]:
    group = Services(folder)
    try:
        yield group
    finally:
        group.stop_all()


def wait_serving(service: Service, timeout: float = 60.0) -> None:
    """Until the gRPC health service answers SERVING (the process is up and ready)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(service.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if service.process.poll() is not None:
                raise RuntimeError(
                    f"dispatcher exited with {service.process.returncode}:\n{service.output()}"
                )
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="cosmoforge.v1.Dispatcher"), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"dispatcher not serving after {timeout}s:\n{service.output()}")
            time.sleep(0.1)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A /metrics page as {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(value for (key, have), value in samples.items() if key == name and wanted <= have)


async def until(predicate: Any, timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll an async predicate until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)


async def final_status(client: Any, run: str, timeout: float) -> dict[str, Any]:
    """Watch a run until its final event; fails the test instead of hanging."""

    async def follow() -> dict[str, Any]:
        last: dict[str, Any] = {}
        async for event in client.watch(run):
            last = event
        return last

    return await asyncio.wait_for(follow(), timeout)
