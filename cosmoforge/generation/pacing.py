"""The I/O around a worker's in-flight controller: timing requests, reading the engine's
`/metrics`, exporting the controller's state as metrics, logs and load reports.

`generation/inflight.py` decides; this module only observes and reports, so the decisions stay
testable without a server and the worker only asks `Pacer.limit`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx

from cosmoforge.generation.inference import Backend, Completion, classify
from cosmoforge.generation.inflight import EngineLoad, InflightController, parse_engine_metrics
from cosmoforge.generation.load import WorkerLoad
from cosmoforge.generation.metrics import (
    ENDPOINT_SATURATED,
    ENGINE_REQUESTS,
    INFLIGHT_LATENCY,
    INFLIGHT_LIMIT,
)

log = logging.getLogger("cosmoforge.generation.pacing")

NO_METRICS_RETRY = 60.0  # an engine without /metrics is asked again this rarely


def metrics_url(endpoint: str) -> str:
    """TGI and vLLM serve /metrics beside their APIs, on the same port."""
    base = endpoint.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base
    return base + "/metrics"


class Pacer:
    """One endpoint's controller, fed by the requests sent to it and by its engine's metrics."""

    def __init__(
        self,
        controller: InflightController,
        run: str,
        endpoint: str,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.controller, self.run, self.endpoint, self.clock = controller, run, endpoint, clock
        self.in_flight = 0
        self.engine_metrics: bool | None = None  # None until the first reading is tried
        self._gauges = (
            INFLIGHT_LIMIT.labels(run, endpoint),
            INFLIGHT_LATENCY.labels(run, endpoint),
            ENDPOINT_SATURATED.labels(run, endpoint),
        )
        self._logged: tuple[int, str, bool] | None = None
        self._logged_at = -1e9
        self.publish()

    @property
    def limit(self) -> int:
        return self.controller.limit

    def wrap(self, backend: Backend) -> PacedBackend:
        return PacedBackend(backend, self)

    def report(self, worker: str) -> WorkerLoad:
        state = self.controller.state(self.clock())
        return WorkerLoad(worker, self.endpoint, state.limit, self.in_flight, state.saturated, state.reason)

    def publish(self) -> None:
        """Controller state to the gauges, and to the log when it changed enough to matter."""
        now = self.clock()
        state = self.controller.state(now)
        limit, latency, saturated = self._gauges
        limit.set(state.limit)
        latency.set(state.latency)
        saturated.set(1 if state.saturated else 0)
        current = (state.limit, state.reason, state.saturated)
        if current == self._logged:
            return
        reason_changed = self._logged is None or self._logged[1:] != current[1:]
        if reason_changed or now - self._logged_at >= 10.0:
            log.info(
                "in flight at %s: limit %d (%s), latency %.2fs, %s%s",
                self.endpoint, state.limit, state.reason, state.latency,
                "saturated" if state.saturated else "has room",
                ", from engine metrics" if state.engine_signals else "",
            )  # fmt: skip
            self._logged, self._logged_at = current, now

    async def watch_engine(self, client: httpx.AsyncClient | None = None) -> None:
        """Read the engine's load every `sample_interval` until cancelled."""
        own = client is None
        http = client or httpx.AsyncClient(timeout=5.0)
        url = metrics_url(self.endpoint)
        try:
            while True:
                load = await self._read(http, url)
                if load is not None:
                    self.controller.engine(self.clock(), load)
                    ENGINE_REQUESTS.labels(self.run, self.endpoint, "running").set(load.running)
                    ENGINE_REQUESTS.labels(self.run, self.endpoint, "waiting").set(load.waiting)
                    self.publish()
                pause = self.controller.sample_interval if self.engine_metrics else NO_METRICS_RETRY
                await asyncio.sleep(pause)
        finally:
            if own:
                await http.aclose()

    async def _read(self, http: httpx.AsyncClient, url: str) -> EngineLoad | None:
        try:
            reply = await http.get(url)
            load = parse_engine_metrics(reply.text) if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as error:
            # Unreachable now (restarting?) is not "no metrics": keep asking at the usual pace.
            if self.engine_metrics is None:
                log.debug("engine metrics at %s unreadable: %s", url, error)
            return None
        if (load is not None) != self.engine_metrics:
            log.info("engine metrics at %s: %s", url, "in use" if load is not None else "none (latency only)")
        self.engine_metrics = load is not None
        return load


class PacedBackend:
    """A Backend that tells the pacer when each request starts and how it ended."""

    def __init__(self, inner: Backend, pacer: Pacer):
        self.inner, self.pacer = inner, pacer

    async def complete(self, prompt: str) -> Completion:
        pacer, controller = self.pacer, self.pacer.controller
        pacer.in_flight += 1
        controller.started(pacer.in_flight)
        started = pacer.clock()
        try:
            completion = await self.inner.complete(prompt)
        except BaseException as error:
            pacer.in_flight -= 1
            if isinstance(error, Exception):  # not a cancellation: the server answered badly
                controller.failed(pacer.clock(), classify(error).kind, pacer.in_flight)
                pacer.publish()
            raise
        pacer.in_flight -= 1
        now = pacer.clock()
        controller.completed(now, now - started, completion.completion_tokens, pacer.in_flight)
        pacer.publish()
        return completion

    async def close(self) -> None:
        await self.inner.close()
