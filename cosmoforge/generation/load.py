"""How busy a run's inference servers are, as its generator workers see them, asked over NATS.

Each worker answers a request on the run's load subject with the state of its in-flight
controller; whoever asks (the operator's autoscaler) collects every answer that arrives within
a short wait. Asking rather than listening keeps the asker stateless: a worker that died simply
no longer answers, and nothing stale is averaged in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cosmoforge.queue import topology


def load_subject(run: str) -> str:
    return f"cosmo.{topology.subject_token(run)}.load"


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's view of its endpoint."""

    worker: str
    endpoint: str
    limit: int  # requests it may keep in flight now
    in_flight: int
    saturated: bool  # the endpoint has no spare capacity for it
    reason: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> WorkerLoad | None:
        try:
            fields = json.loads(data)
            return cls(
                worker=str(fields["worker"]),
                endpoint=str(fields["endpoint"]),
                limit=int(fields["limit"]),
                in_flight=int(fields["in_flight"]),
                saturated=bool(fields["saturated"]),
                reason=str(fields.get("reason", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None


async def answer(nc: NATS, run: str, report: Callable[[], WorkerLoad]) -> Subscription:
    """Answer every load request of `run` with `report()`, until the subscription ends."""

    async def reply(msg: Msg) -> None:
        if msg.reply:
            with contextlib.suppress(Exception):
                await nc.publish(msg.reply, report().encode())

    return await nc.subscribe(load_subject(run), cb=reply)


async def gather(nc: NATS, run: str, wait: float = 0.5) -> list[WorkerLoad]:
    """Every answer that arrives within `wait` seconds (no workers: an empty list)."""
    inbox = nc.new_inbox()
    answers: list[WorkerLoad] = []

    async def collect(msg: Msg) -> None:
        load = WorkerLoad.decode(msg.data)
        if load is not None:
            answers.append(load)

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(load_subject(run), b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return answers


def saturation(loads: list[WorkerLoad]) -> float | None:
    """Share of the answering workers whose endpoint is full; None when nobody answered."""
    if not loads:
        return None
    return sum(1 for load in loads if load.saturated) / len(loads)
