"""Generator worker: pull prompts from JetStream, call the inference server, write shards, ack.

Delivery is at-least-once; the effect is exactly-once because a message is acked only after
the shard holding its completion is durable, and compaction keeps one row per prompt id. A
worker killed at any point loses nothing: unacked prompts come back after `ack_wait`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats
import pyarrow as pa
from nats.aio.msg import Msg

from cosmoforge import queue
from cosmoforge.generation import load
from cosmoforge.generation.inference import Backend, InferenceError, backend_for, complete_with_retries
from cosmoforge.generation.inflight import InflightController
from cosmoforge.generation.metrics import InstrumentedBackend, WorkerMeter
from cosmoforge.generation.pacing import Pacer
from cosmoforge.queue.topology import prefetch
from cosmoforge.spec import records
from cosmoforge.spec.model import GenerationSpec
from cosmoforge.storage import FAILURES, GENERATIONS, RunStore

log = logging.getLogger("cosmoforge.generation.worker")

STORAGE_RETRY_SECONDS = 5.0


@dataclass
class WorkerConfig:
    nats_url: str
    run: str
    output_uri: str
    endpoint: str
    generation: GenerationSpec
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    flush_seconds: float = 2.0


def sampling_json(spec: GenerationSpec) -> str:
    data = spec.sampling.model_dump(mode="json", exclude_none=True)
    data["max_new_tokens"] = spec.max_new_tokens
    return json.dumps(data, sort_keys=True)


def _now() -> datetime:
    return datetime.now(UTC)


class ShardWriter:
    """Buffers results; a flush writes the shard(s) first and only then acks their messages."""

    def __init__(self, store: RunStore, worker_id: str, shard_size: int):
        self.store, self.worker_id, self.shard_size = store, worker_id, shard_size
        self.done: list[tuple[dict[str, Any], Msg]] = []
        self.failed: list[tuple[dict[str, Any], Msg]] = []
        self.first_at: float | None = None
        self.seq = 0
        self.lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self.done) + len(self.failed)

    def add(self, row: dict[str, Any], msg: Msg, failed: bool = False) -> None:
        (self.failed if failed else self.done).append((row, msg))
        self.first_at = self.first_at or time.monotonic()

    def due(self, flush_seconds: float) -> bool:
        if not self:
            return False
        assert self.first_at is not None
        return len(self) >= self.shard_size or time.monotonic() - self.first_at >= flush_seconds

    def messages(self) -> list[Msg]:
        return [msg for _, msg in self.done + self.failed]

    async def flush(self, nc: nats.NATS) -> tuple[int, int, int, dict[str, int]]:
        """Returns completions, failures, completion tokens and failures by error kind."""
        async with self.lock:
            done, failed = self.done, self.failed
            self.done, self.failed, self.first_at = [], [], None
            if not done and not failed:
                return 0, 0, 0, {}
            name = f"{self.worker_id}-{self.seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
            self.seq += 1
            try:
                if done:
                    table = pa.Table.from_pylist([row for row, _ in done], schema=records.GENERATIONS)
                    await asyncio.to_thread(self.store.write_table, f"{GENERATIONS}/{name}", table)
                if failed:
                    table = pa.Table.from_pylist([row for row, _ in failed], schema=records.FAILURES)
                    await asyncio.to_thread(self.store.write_table, f"{FAILURES}/{name}", table)
            except Exception:
                # Nothing is durable: hand every prompt back for another delivery, after a pause
                # (storage that just failed rarely recovers in milliseconds; a prompt redelivered
                # at once would burn its deliveries and its inference again for nothing).
                for _, msg in done + failed:
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=STORAGE_RETRY_SECONDS)
                raise
            # Durable now: acknowledge. A lost ack only causes a redelivery that compaction absorbs.
            for _, msg in done:
                await msg.ack()
            for _, msg in failed:
                await msg.term()
            await nc.flush()
            tokens = sum(row["completion_tokens"] or 0 for row, _ in done)
            kinds = Counter(str(row["error_kind"]) for row, _ in failed)
            return len(done), len(failed), tokens, dict(kinds)


def controller_for(spec: GenerationSpec) -> InflightController:
    """Adaptive: between the spec's bounds, from `concurrency`. Fixed: pinned at `concurrency`,
    still judging whether the server is full, so the worker can answer the autoscaler either way."""
    adaptive = spec.adaptive_concurrency
    low, high = (adaptive.min, adaptive.max) if adaptive.enabled else (spec.concurrency, spec.concurrency)
    return InflightController(low, high, spec.concurrency, spec.timeout_seconds)


class Worker(queue.PullWorker):
    """Generates prompts as many at a time as its pacer allows (`concurrency`, fixed or adaptive);
    `ShardWriter` acks them once their shard is durable."""

    def __init__(self, config: WorkerConfig, backend: Backend | None = None):
        self.config = config
        self.spec = config.generation
        # Before the base class sets `concurrency`: from then on it is the pacer's limit.
        self.pacer = Pacer(controller_for(self.spec), config.run, config.endpoint)
        super().__init__(
            config.nats_url,
            queue.stream_name(config.run),
            queue.CONSUMER,
            f"generator-{config.worker_id}",
        )
        inner = backend or backend_for(self.spec, config.endpoint)
        self.backend = InstrumentedBackend(self.pacer.wrap(inner), config.run)
        self.meter = WorkerMeter(config.run)
        self.store = RunStore.open(config.output_uri, config.run)
        self.writer = ShardWriter(self.store, config.worker_id, self.spec.shard_size)
        self.sampling = sampling_json(self.spec)

    @property
    def concurrency(self) -> int:
        return self.pacer.limit

    @concurrency.setter
    def concurrency(self, _: int) -> None:
        """The pacer owns the limit; what the base class sets is ignored."""

    @property
    def prefetch(self) -> int:
        # Prompts fetched ahead of a free slot: a finished request is replaced at once, not
        # after a round trip to the server, so `concurrency` requests stay really in flight.
        return prefetch(self.pacer.limit)

    @prefetch.setter
    def prefetch(self, _: int) -> None:
        """Follows the limit."""

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            await self.backend.close()

    def held(self) -> list[Msg]:
        return self.writer.messages()

    async def finish(self) -> None:
        await self._flush()

    async def handle(self, msg: Msg) -> None:
        try:
            prompt = json.loads(msg.data)
            base = {name: prompt.get(name) for name in records.PROMPTS.names}
        except (ValueError, AttributeError):
            log.error("dropping a message that is not a prompt record: %r", msg.data[:200])
            await msg.term()
            return
        delivered = msg.metadata.num_delivered or 1
        started = _now()
        try:
            completion = await complete_with_retries(self.backend, prompt["prompt"])
        except InferenceError as error:
            if error.transient and delivered < self.spec.max_attempts:
                await msg.nak(delay=min(2.0**delivered, 60.0))
                return
            self.writer.add(
                {
                    **base,
                    "error_kind": error.kind,
                    "error": str(error)[:2000],
                    "attempts": delivered,
                    "failed_at": _now(),
                    "worker": self.config.worker_id,
                },
                msg,
                failed=True,
            )
            return
        self.writer.add(
            {
                **base,
                "text": completion.text,
                "model": completion.model,
                "engine": str(self.spec.engine),
                "sampling": self.sampling,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "finish_reason": completion.finish_reason,
                "started_at": started,
                "finished_at": _now(),
                "worker": self.config.worker_id,
                "attempt": delivered,
            },
            msg,
        )

    async def _flush(self) -> None:
        done, failed, tokens, kinds = await self.writer.flush(self.nc)
        if done or failed:
            self.meter.flushed(done, kinds, tokens)
            event = {
                "worker": self.config.worker_id,
                "generated": done,
                "failed": failed,
                "tokens": tokens,
                "errors": kinds,
            }
            with contextlib.suppress(Exception):
                await self.nc.publish(queue.events_subject(self.config.run), queue.encode(event))

    async def background(self) -> None:
        """Writes a shard when it is full or old enough; paces requests by the engine's load and
        answers the autoscaler's load requests."""
        # The engine's /metrics are read only when something uses them: an adaptive limit, or
        # an autoscaler that asks the workers whether their servers are full.
        uses = self.spec.adaptive_concurrency.enabled or self.spec.autoscaling.signal == "saturation"
        watch = asyncio.create_task(self.pacer.watch_engine() if uses else asyncio.Event().wait())
        try:
            await load.answer(self.nc, self.config.run, lambda: self.pacer.report(self.config.worker_id))
            await self._write_shards()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch

    async def _write_shards(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            # An idle worker writes right away: the end of a run should not wait out flush_seconds.
            idle = bool(self.writer) and not self.in_flight
            if idle or self.writer.due(self.config.flush_seconds):
                try:
                    await self._flush()
                except Exception as error:  # storage hiccup: messages stay unacked and come back
                    log.error("writing a shard failed: %s", error)


async def run_worker(config: WorkerConfig) -> None:
    """A worker until SIGTERM/SIGINT: it finishes the prompts in hand and writes them first."""
    worker = Worker(config)
    worker.handle_signals()
    await worker.run()
