"""The one JetStream pull-worker loop: generator workers and decontamination workers fill in `handle`.

The loop owns what every worker of a durable pull consumer must get right:

- connect, retrying until NATS answers (a pod may start first), unless stopped meanwhile;
- bind to the consumer, waiting for whoever owns the topology to create it: a worker never
  creates it, because JetStream keeps the first creator's limits;
- fetch batches into free slots (`concurrency` at once, `prefetch` more held ahead so a freed
  slot is refilled at once), short polls while messages wait ahead;
- heartbeats (`in_progress`) every ack_wait / 3 for every message held, handled or waiting to
  be settled by a later durable write (`held`), so only a dead worker's messages time out;
- on stop (SIGTERM): no more fetches, messages fetched ahead handed back (`nak`), those in hand
  finished, `finish()` (a last write), then the connection drained;
- a consumer that disappears (its stage is over) is waited for again; `idle_exit` ends a worker
  that found no work for that long.

Settling is the handler's: `ack` after the effect is durable, `nak(delay)` to retry, `term` for
poison. `settle` does it without failing when the server is away (the message comes back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import Awaitable, Iterable, Iterator
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cosmoforge.queue.auth import PASSWORD_ENV, TOKEN_ENV, USER_ENV, connect_options, redact
from cosmoforge.queue.topology import ACK_WAIT_SECONDS

log = logging.getLogger("cosmoforge.queue.pull")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NatsAuthError(ConnectionError):
    """The server refused this client's credentials: retrying with the same ones cannot help."""


# What nats-server answers (as -ERR) to missing, wrong or expired credentials.
_AUTH_REFUSALS = ("authorization violation", "authentication", "user authentication expired")


def _refused(error: BaseException) -> bool:
    return any(words in str(error).lower() for words in _AUTH_REFUSALS)


async def connect_unless_stopped(url: str, stopping: asyncio.Event, **options: Any) -> NATS | None:
    """Connect, retrying for as long as it takes (a pod may start before NATS answers), unless
    `stopping` is set first (a SIGTERM during a rollout): then None. Credentials come from the
    environment (`auth.connect_options`); a server that refuses them raises NatsAuthError at
    once instead of being dialled forever."""
    log.info("connecting to NATS at %s", redact(url))
    refused, connected = asyncio.Event(), asyncio.Event()
    their_error_cb = options.pop("error_cb", None) or _log_error

    async def error_cb(error: Exception) -> None:
        if _refused(error) and not connected.is_set():
            refused.set()  # later refusals (after a reconnect) are the caller's to handle
        else:
            await their_error_cb(error)

    options = {**connect_options(), **options, "error_cb": error_cb}
    connecting = asyncio.ensure_future(nats.connect(url, max_reconnect_attempts=-1, **options))
    waiters = {asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(refused.wait())}
    await asyncio.wait({connecting, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
        connected.set()
        nc: NATS = connecting.result()
        return nc
    # nats.py swallows a cancellation that lands while it closes a failed attempt: cancel again
    # until the attempt really ends, or it would keep dialling (and this call waiting) forever.
    while not connecting.done():
        connecting.cancel()
        await asyncio.wait({connecting}, timeout=0.1)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        connecting.result()
    if refused.is_set():
        raise NatsAuthError(
            f"NATS at {redact(url)} refused the credentials: set {USER_ENV} and {PASSWORD_ENV} (or "
            f"{TOKEN_ENV}) from the NATS Secret"
        )
    return None


async def _log_error(error: Exception) -> None:
    log.warning("NATS: %s", error)


async def settle(reply: Awaitable[Any]) -> None:
    """Ack, nak or term; when the server is away the message comes back after ack_wait anyway."""
    try:
        await reply
    except Exception as error:
        log.warning("could not settle a message (%s); it will be redelivered", error)


class PullWorker:
    """A worker of one durable pull consumer; subclasses say what a message means (`handle`)."""

    def __init__(
        self,
        nats_url: str,
        stream: str,
        consumer: str,
        name: str,
        *,
        concurrency: int = 1,
        prefetch: int = 0,
        idle_exit: float = 0.0,
        ack_wait: float = ACK_WAIT_SECONDS,
    ) -> None:
        self.nats_url, self.stream, self.consumer, self.name = nats_url, stream, consumer, name
        self.concurrency, self.prefetch, self.idle_exit = concurrency, prefetch, idle_exit
        self.ack_wait = ack_wait  # replaced by the consumer's own once bound; paces heartbeats
        self.max_deliver = 0  # likewise (0: unlimited)
        self.stopping = asyncio.Event()
        self.closing = False
        self.in_flight: set[asyncio.Task[None]] = set()
        self.working: dict[int, Msg] = {}
        self.ahead: deque[Msg] = deque()
        self._nc: NATS | None = None
        self._signals = False
        self._idle_since: float | None = None  # since the last message; None until first bound

    # --- what a worker fills in ----------------------------------------------------------------

    async def handle(self, msg: Msg) -> None:
        """Do the message's work and settle it (or leave it to a later durable write)."""
        raise NotImplementedError

    def held(self) -> Iterable[Msg]:
        """Messages handled but not yet settled: heartbeats keep them until they are."""
        return ()

    async def background(self) -> None:
        """Runs while connected (e.g. a periodic writer); cancelled at the end."""

    async def finish(self) -> None:
        """After the last message in hand is handled, before the connection is drained."""

    # --- the loop ------------------------------------------------------------------------------

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "not connected"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    def stop(self) -> None:
        self.stopping.set()

    def handle_signals(self) -> None:
        """SIGTERM/SIGINT: finish the messages in hand, then exit."""
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self.stop)
        self._signals = True

    @contextlib.contextmanager
    def default_signals(self) -> Iterator[None]:
        """Fork child processes without our handlers, so that SIGTERM ends them.

        A child that inherits the event loop's handlers takes SIGTERM as a wake-up of the
        parent's loop and keeps running: waiting for it would then last forever.
        """
        if not self._signals:
            yield
            return
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
        try:
            yield
        finally:
            for signum in SIGNALS:
                loop.add_signal_handler(signum, self.stop)

    async def run(self) -> None:
        """Work until stopped or idle too long; messages in hand are finished first."""
        self._nc = await connect_unless_stopped(
            self.nats_url,
            self.stopping,
            reconnect_time_wait=0.5,
            name=self.name,
            error_cb=self._connection_error,
            disconnected_cb=self._disconnected,
            reconnected_cb=_reconnected,
        )
        if self._nc is None:  # stopped before NATS ever answered
            self.closing = True
            return
        helpers = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self.background())]
        try:
            while not self.stopping.is_set():
                sub = await self._bind()
                if sub is None:
                    break
                gone = await self._pull(sub)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                if not gone:
                    break
            await self._wind_down()
        finally:
            for helper in helpers:
                helper.cancel()
            self.closing = True
            await self._disconnect()

    async def _wind_down(self) -> None:
        for msg in self.ahead:  # never started: give them back now rather than after ack_wait
            await settle(msg.nak())
        self.ahead.clear()
        if self.in_flight:
            await asyncio.wait(self.in_flight)
        await self.finish()

    async def _disconnect(self) -> None:
        try:
            await asyncio.wait_for(self.nc.drain(), 10.0)
        except Exception:  # the server is away: nothing is left to flush
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def _connection_error(self, error: Exception) -> None:
        if not self.closing:
            log.warning("nats: %s (%s)", error or "connection error", type(error).__name__)

    async def _disconnected(self) -> None:
        if not self.closing:
            log.warning("nats: disconnected; reconnecting")

    def _idle_too_long(self) -> bool:
        if not self.idle_exit or self._idle_since is None or self.in_flight or self.ahead:
            return False
        if time.monotonic() - self._idle_since <= self.idle_exit:
            return False
        log.info("idle for %.0fs: exiting", self.idle_exit)
        return True

    async def _bind(self) -> Any:
        """Bind to the consumer, waiting for its owner to create it.

        None when stopped, or when `idle_exit` passed without a message since the worker last
        held one (a stage's stream is removed once it is over: its workers leave in their time).
        """
        waiting = False
        while not self.stopping.is_set() and not self._idle_too_long():
            try:
                consumer = await self.js.consumer_info(self.stream, self.consumer)
                sub = await self.js.pull_subscribe_bind(durable=self.consumer, stream=self.stream)
            except Exception as error:  # not created yet, removed, or the server is restarting
                if not waiting:
                    log.info(
                        "waiting for the %s consumer of %s (%s)",
                        self.consumer,
                        self.stream,
                        type(error).__name__,
                    )
                    waiting = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)
                continue
            self.ack_wait = float(consumer.config.ack_wait or self.ack_wait)
            self.max_deliver = consumer.config.max_deliver or 0
            if self._idle_since is None:
                self._idle_since = time.monotonic()
            log.info(
                "bound to the %s consumer of %s (ack wait %.0fs, %d deliveries at most)",
                self.consumer, self.stream, self.ack_wait, self.max_deliver,
            )  # fmt: skip
            return sub
        return None

    async def _consumer_gone(self) -> bool:
        try:
            await self.js.consumer_info(self.stream, self.consumer)
        except NotFoundError:
            return True
        except Exception:  # the server is away: not a sign the consumer is
            return False
        return False

    def _start_ahead(self) -> None:
        while self.ahead and len(self.in_flight) < self.concurrency:
            task = asyncio.create_task(self._handle(self.ahead.popleft()))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)

    async def _pull(self, sub: Any) -> bool:
        """Fetch until stopped or idle too long (False), or until the consumer is gone (True)."""
        while not self.stopping.is_set():
            self._start_ahead()
            # Read each time: a worker may change its concurrency while it runs (adaptive limits).
            room = self.concurrency + self.prefetch - len(self.in_flight) - len(self.ahead)
            if room <= 0:
                await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                # Short polls while messages wait ahead: a freed slot must not wait out a long poll.
                messages = await sub.fetch(batch=room, timeout=0.05 if self.ahead else 1.0)
            except (TimeoutError, NatsTimeout):
                if self._idle_too_long():
                    return False
                continue
            except Exception as error:  # the consumer removed, or the server away: find out which
                if await self._consumer_gone():
                    log.info(
                        "the %s consumer of %s is gone (its stage is over, or it was removed)",
                        self.consumer, self.stream,
                    )  # fmt: skip
                    return True
                log.warning("fetch failed (%s); retrying", error)
                await asyncio.sleep(0.5)
                continue
            self.ahead.extend(messages)
        return False

    async def _handle(self, msg: Msg) -> None:
        self.working[id(msg)] = msg
        try:
            await self.handle(msg)
        except Exception:  # a bug in a handler: the message comes back after ack_wait
            log.exception("handling a message failed")
        finally:
            self.working.pop(id(msg), None)
            self._idle_since = time.monotonic()

    async def _heartbeat(self) -> None:
        """Tell JetStream that the messages this worker holds are still being worked on."""
        beaten = time.monotonic()
        while True:
            # Short ticks: the consumer's ack_wait is only known once bound, and may change on a rebind.
            await asyncio.sleep(0.2)
            if time.monotonic() - beaten < max(0.2, self.ack_wait / 3):
                continue
            beaten = time.monotonic()
            for msg in [*self.working.values(), *self.held(), *self.ahead]:
                with contextlib.suppress(Exception):
                    await msg.in_progress()


async def _reconnected() -> None:
    log.info("nats: reconnected")
