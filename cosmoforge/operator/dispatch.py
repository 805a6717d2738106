"""The operator's two edges to the rest of the run: the dispatcher over gRPC, the queue over NATS.

Registration is one small function so that everything else in the operator can be tested
without a dispatcher; the queue probe reads the run's JetStream consumer (pending + in flight)
that drives autoscaling, and owns the stream topology so that workers never create it.
Every call names the run by its key (`render.run_key`: `<namespace>/<name>`), never by its name
alone: the same name in two namespaces is two runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cosmoforge import queue
from cosmoforge.generation.load import WorkerLoad, gather
from cosmoforge.queue import auth as queue_auth
from cosmoforge.queue.state import QueueState
from cosmoforge.spec.model import GenerationRun


async def _ask(target: str, call: Callable[[Any], Awaitable[Mapping[str, Any]]]) -> dict[str, Any]:
    """One call to the dispatcher on a client of its own, closed whatever the call did."""
    from cosmoforge.services.dispatcher.client import DispatcherClient

    client = DispatcherClient(target)
    try:
        return dict(await call(client))
    finally:
        await _close(client)


async def register_run(target: str, spec_yaml: str) -> dict[str, Any]:
    """Hand the run to the dispatcher: it builds and queues the prompts; a known run resumes."""
    return await _ask(target, lambda client: client.start_run(spec_yaml))


async def dispatcher_status(target: str, run: str) -> dict[str, Any]:
    return await _ask(target, lambda client: client.get_status(run))


async def cancel_run(target: str, run: str) -> dict[str, Any]:
    """Stop the run at the dispatcher (its queued prompts dropped, its data kept)."""
    return await _ask(target, lambda client: client.cancel(run))


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
                self.url,
                connect_timeout=3,
                max_reconnect_attempts=2,
                allow_reconnect=True,
                name="operator",
                **queue_auth.connect_options(),
            )
        return self._nc.jetstream()

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None
            await asyncio.sleep(0.1)  # let the client's cancelled reader tasks finish on this loop

    async def ensure_topology(self, run: GenerationRun) -> None:
        """The run's work-queue stream and the generators' durable consumer, created once, with
        the same limits the dispatcher gives it (`queue.consumer_limits`)."""
        key = queue.run_key(run.metadata.namespace, run.name)
        await queue.ensure_generation_queue(await self._js(), key, run.spec.generation)

    async def remove(self, run: str) -> bool:
        """Delete the run's stream (prompts still queued go with it); False if there was none.

        Deleting, not purging, also forgets the duplicate window, so a run created again under
        the same key may queue the same prompt ids."""
        try:
            return bool(await (await self._js()).delete_stream(queue.stream_name(run)))
        except NotFoundError:
            return False

    async def loads(self, run: str) -> list[WorkerLoad]:
        """What the run's generator workers say about their servers (`generation/load.py`)."""
        await self._js()
        assert self._nc is not None
        return await gather(self._nc, run)

    async def state(self, run: str) -> QueueState | None:
        """The run's queue (`depth` = pending + in flight); None before it exists."""
        try:
            return await queue.read_state(await self._js(), run)
        except NotFoundError:
            return None
