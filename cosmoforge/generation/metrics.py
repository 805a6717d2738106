"""Prometheus metrics of the generation path, defined once for every process that exports them.

The dispatcher and the generator workers are separate processes on a cluster, but tests and
the embedded run may hold both in one interpreter; one module owning every metric keeps names
unique in the registry and the dashboard's vocabulary in a single place. Everything here is
cheap (an increment, an observation), so the hot path can call it per request.

wandb is optional: when the package is installed and asked for, throughput goes there too,
offline unless WANDB_MODE says otherwise, like llm-swarm's plots for Cosmopedia.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from cosmoforge.generation.inference import Backend, Completion, classify

log = logging.getLogger("cosmoforge.generation.metrics")

# Generator workers: what each process did.
PROMPTS_GENERATED = Counter(
    "cosmoforge_prompts_generated", "Prompts whose completion is durable in storage", ["run"]
)
PROMPTS_FAILED = Counter(
    "cosmoforge_prompts_failed", "Prompts whose failure is recorded in the failure table", ["run", "kind"]
)
GENERATED_TOKENS = Counter("cosmoforge_generated_tokens", "Completion tokens in durable shards", ["run"])
TOKENS_PER_SECOND = Gauge(
    "cosmoforge_tokens_per_second", "Durable completion tokens per second, last minute", ["run"]
)
REQUESTS_IN_FLIGHT = Gauge("cosmoforge_requests_in_flight", "Inference requests awaiting an answer", ["run"])
REQUEST_SECONDS = Histogram(
    "cosmoforge_request_seconds",
    "Latency of one inference request",
    ["run", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
REQUEST_ERRORS = Counter(
    "cosmoforge_request_errors", "Failed inference requests by kind, retried or not", ["run", "kind"]
)
# Generator workers: the in-flight controller of each worker's endpoint (generation/inflight.py).
INFLIGHT_LIMIT = Gauge(
    "cosmoforge_inflight_limit",
    "Requests a worker may keep in flight at its endpoint now",
    ["run", "endpoint"],
)
INFLIGHT_LATENCY = Gauge(
    "cosmoforge_inflight_latency_seconds",
    "Smoothed latency of successful requests, as the in-flight controller sees it",
    ["run", "endpoint"],
)
ENDPOINT_SATURATED = Gauge(
    "cosmoforge_endpoint_saturated",
    "1 while the worker finds its endpoint without spare capacity (queueing, KV cache full, overloaded)",
    ["run", "endpoint"],
)
ENGINE_REQUESTS = Gauge(
    "cosmoforge_engine_requests",
    "Requests the engine reports in its batch (running) and in its queue (waiting)",
    ["run", "endpoint", "state"],
)

# Dispatcher: the run as a whole.
QUEUE_DEPTH = Gauge("cosmoforge_queue_depth", "Prompts in the run's stream, waiting or in flight", ["run"])
PROMPTS_QUEUED = Gauge("cosmoforge_prompts_queued", "Prompts waiting for a worker", ["run"])
PROMPTS_IN_FLIGHT = Gauge(
    "cosmoforge_prompts_in_flight", "Prompts delivered to a worker and not yet acknowledged", ["run"]
)
PROMPTS_PUBLISHED = Counter("cosmoforge_prompts_published", "Prompts put on the queue", ["run"])
RUN_PROMPTS = Gauge("cosmoforge_run_prompts", "Prompts in the run's manifest", ["run"])
RUN_DONE = Gauge("cosmoforge_run_prompts_done", "Prompts of the run with a completion", ["run"])
RUN_FAILED = Gauge("cosmoforge_run_prompts_failed", "Prompts of the run with a recorded failure", ["run"])
RUN_TOKENS_PER_SECOND = Gauge(
    "cosmoforge_run_tokens_per_second", "Tokens per second reported by the run's workers", ["run"]
)
RUN_PHASE = Gauge("cosmoforge_run_phase", "1 for the run's current phase, 0 for the others", ["run", "phase"])

# Operator: what a run costs, from the CR status it writes.
RUN_TOKENS = Gauge("cosmoforge_run_tokens", "Completion tokens of the run so far", ["run"])
RUN_ETA_SECONDS = Gauge(
    "cosmoforge_run_eta_seconds", "Seconds until every prompt has an answer, at the current pace", ["run"]
)
RUN_GPU_HOURS = Gauge("cosmoforge_run_gpu_hours", "Inference GPU-hours the run has used so far", ["run"])
RUN_COST = Gauge("cosmoforge_run_cost", "Cost of the GPU-hours so far, at the spec's price", ["run"])
RUN_ESTIMATED_COST = Gauge(
    "cosmoforge_run_estimated_cost", "The estimate of the whole generation's cost, before it ran", ["run"]
)


def serve(port: int, host: str = "0.0.0.0") -> int:
    """Expose /metrics on `port` (0: not at all); returns the port or 0."""
    if port <= 0:
        return 0
    server, _ = start_http_server(port, addr=host)
    return int(server.server_port)


class RateMeter:
    """Events per second over a sliding window, for gauges that people read without PromQL."""

    def __init__(self, window: float = 60.0):
        self.window = window
        self.points: deque[tuple[float, float]] = deque()

    def add(self, amount: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self.points.append((now, amount))
        return self.rate(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.points and self.points[0][0] < now - self.window:
            self.points.popleft()
        if not self.points:
            return 0.0
        span = max(now - self.points[0][0], 1.0)
        return sum(amount for _, amount in self.points) / span


class InstrumentedBackend:
    """A Backend that times every request and counts its errors by kind, then defers to `inner`."""

    def __init__(self, inner: Backend, run: str):
        self.inner, self.run = inner, run
        self.in_flight = REQUESTS_IN_FLIGHT.labels(run)

    async def complete(self, prompt: str) -> Completion:
        started = time.perf_counter()
        self.in_flight.inc()
        try:
            completion = await self.inner.complete(prompt)
        except Exception as error:
            REQUEST_ERRORS.labels(self.run, classify(error).kind).inc()
            REQUEST_SECONDS.labels(self.run, "error").observe(time.perf_counter() - started)
            raise
        finally:
            self.in_flight.dec()
        REQUEST_SECONDS.labels(self.run, "ok").observe(time.perf_counter() - started)
        return completion

    async def close(self) -> None:
        await self.inner.close()


class WorkerMeter:
    """What a generator worker records after each durable shard."""

    def __init__(self, run: str):
        self.run = run
        self.tokens = RateMeter()

    def flushed(self, done: int, failures: Mapping[str, int], tokens: int) -> None:
        PROMPTS_GENERATED.labels(self.run).inc(done)
        for kind, count in failures.items():
            PROMPTS_FAILED.labels(self.run, kind).inc(count)
        GENERATED_TOKENS.labels(self.run).inc(tokens)
        TOKENS_PER_SECOND.labels(self.run).set(self.tokens.add(tokens))


def set_phase(run: str, phase: str, phases: list[str]) -> None:
    for name in phases:
        RUN_PHASE.labels(run, name).set(1 if name == phase else 0)


class WandbLog:
    """Run progress to wandb, when installed; offline by default so it never needs the network."""

    def __init__(self, module: Any, run: Any):
        self.module, self.run = module, run

    @classmethod
    def start(cls, name: str, config: Mapping[str, Any]) -> WandbLog | None:
        try:
            import wandb  # optional: never a dependency
        except ImportError:
            log.warning("wandb logging asked for but the wandb package is not installed; skipping it")
            return None
        try:
            run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "cosmoforge"),
                name=name,
                mode=os.environ.get("WANDB_MODE", "offline"),
                config=dict(config),
                reinit=True,
            )
        except Exception as error:  # a logging side channel must never stop a run
            log.warning("wandb logging disabled: %s", error)
            return None
        return cls(wandb, run)

    def log(self, values: Mapping[str, float]) -> None:
        self.run.log(dict(values))

    def finish(self) -> None:
        self.run.finish()
