"""The operator's two edges to the rest of the run: the dispatcher over gRPC, the queue over NATS.

Registration is one small function so that everything else in the operator can be tested
without a dispatcher; the queue probe reads the run's JetStream consumer (pending + in flight)
that drives autoscaling, and owns the stream topology so that workers never create it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cosmoforge import queue
from cosmoforge.operator.progress import QueueState
from cosmoforge.spec import GenerationRun

ACK_WAIT_SECONDS = 30.0


async def register_run(target: str, spec_yaml: str) -> dict[str, Any]:
    """Hand the run to the dispatcher: it builds and queues the prompts; a known run resumes."""
    from cosmoforge.dispatcher.client import DispatcherClient

    client = DispatcherClient(target)
    try:
        return dict(await client.start_run(spec_yaml))
    finally:
        await _close(client)


async def dispatcher_status(target: str, run: str) -> dict[str, Any]:
    from cosmoforge.dispatcher.client import DispatcherClient

    client = DispatcherClient(target)
    try:
        return dict(await client.get_status(run))
    finally:
        await _close(client)


async def _close(client: Any) -> None:
    close = getattr(client, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            result = close()
            if hasattr(result, "__await__"):
                await result


class QueueProbe:
    """One NATS connection per operator, opened on first use and reopened after a failure."""

    def __init__(self, url: str):
        self.url = url
        self._nc: nats.NATS | None = None

    async def _js(self) -> JetStreamContext:
        if self._nc is None or self._nc.is_closed:
            self._nc = await nats.connect(
                self.url, connect_timeout=3, max_reconnect_attempts=2, allow_reconnect=True, name="operator"
            )
        return self._nc.jetstream()

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None
            await asyncio.sleep(0.1)  # let the client's cancelled reader tasks finish on this loop

    async def ensure_topology(self, run: GenerationRun) -> None:
        """The run's work-queue stream and the generators' durable consumer, created once."""
        js = await self._js()
        generation = run.spec.generation
        await queue.ensure_stream(js, run.name)
        try:
            await js.consumer_info(queue.stream_name(run.name), queue.CONSUMER)
        except NotFoundError:
            await queue.ensure_consumer(
                js,
                run.name,
                ack_wait=ACK_WAIT_SECONDS,
                max_deliver=generation.max_attempts + 1,
                max_ack_pending=generation.concurrency * generation.workers,
            )

    async def state(self, run: str) -> QueueState | None:
        """Depth (pending + in flight), messages ever published, messages still stored."""
        js = await self._js()
        try:
            stream = await js.stream_info(queue.stream_name(run))
            consumer = await js.consumer_info(queue.stream_name(run), queue.CONSUMER)
        except NotFoundError:
            return None
        depth = int(consumer.num_pending or 0) + int(consumer.num_ack_pending or 0)
        return QueueState(
            depth=depth, published=int(stream.state.last_seq or 0), stored=int(stream.state.messages or 0)
        )
