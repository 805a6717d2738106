"""Publishing prompts to a run's stream: pipelined, each one confirmed, idempotent on retry.

Each message's id is its prompt id, so a republish after a restart is dropped by the stream's
duplicate window; a dispatcher can therefore publish again whenever it is unsure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from cosmoforge.queue.topology import prompts_subject


def encode(record: dict[str, object]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


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
