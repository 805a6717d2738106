"""The one pull-worker loop, on a real nats-server: bind, fetch, heartbeats, settle, stop.

Both worker kinds (generation, decontamination) run this loop with their own `handle`; here a
small handler that records what it was given stands in for their work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from cosmoforge import queue
from cosmoforge.queue import EmbeddedNats, PullWorker, settle

STREAM, SUBJECT, CONSUMER = "PULL_TEST", "pull.test", "workers"


class Recorder(PullWorker):
    """Acks each message after `seconds` of work; terms the one that says it is poison."""

    def __init__(self, url: str, seconds: float = 0.0, **options: Any) -> None:
        super().__init__(url, STREAM, CONSUMER, "recorder", **options)
        self.seconds = seconds
        self.seen: list[tuple[bytes, int]] = []
        self.started = asyncio.Event()

    async def handle(self, msg: Msg) -> None:
        self.seen.append((msg.data, msg.metadata.num_delivered or 1))
        self.started.set()
        if msg.data == b"poison":
            await settle(msg.term())
            return
        await asyncio.sleep(self.seconds)
        await msg.ack_sync()


async def _topology(js: JetStreamContext, ack_wait: float) -> None:
    await queue.ensure_work_queue(js, STREAM, [SUBJECT])
    config = ConsumerConfig(
        durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait, max_deliver=5
    )
    await js.add_consumer(STREAM, config)


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _stored(js: JetStreamContext) -> int:
    return int((await js.stream_info(STREAM)).state.messages)


async def test_a_worker_waits_for_its_consumer_and_never_creates_it(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    worker = Recorder(nats_server.url)
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(1.5)
        await queue.ensure_work_queue(js, STREAM, [SUBJECT])
        await asyncio.sleep(1.5)
        with pytest.raises(NotFoundError):  # the topology's owner creates it, with its limits
            await js.consumer_info(STREAM, CONSUMER)
        await js.add_consumer(STREAM, ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT))
        for number in range(3):
            await js.publish(SUBJECT, str(number).encode())

        async def all_acked() -> bool:
            return await _stored(js) == 0

        await _until(all_acked)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)
        await nc.close()
    assert sorted(worker.seen) == [(b"0", 1), (b"1", 1), (b"2", 1)]


async def test_heartbeats_keep_long_work_with_its_worker(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await _topology(js, ack_wait=1.0)
    workers = [Recorder(nats_server.url, seconds=3.0) for _ in range(2)]  # three times ack_wait
    running = [asyncio.create_task(worker.run()) for worker in workers]
    try:
        await js.publish(SUBJECT, b"long")

        async def acked() -> bool:
            return await _stored(js) == 0

        await _until(acked)
    finally:
        for worker in workers:
            worker.stop()
        await asyncio.gather(*running)
        await nc.close()
    assert sorted(len(worker.seen) for worker in workers) == [0, 1]  # one delivery, one worker


async def test_a_stop_finishes_work_in_hand_and_hands_back_what_was_fetched_ahead(
    nats_server: EmbeddedNats,
) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await _topology(js, ack_wait=30.0)  # long: only a nak brings the others back soon
    worker = Recorder(nats_server.url, seconds=1.0, concurrency=1, prefetch=3)
    running = asyncio.create_task(worker.run())
    try:
        for number in range(4):
            await js.publish(SUBJECT, str(number).encode())
        await asyncio.wait_for(worker.started.wait(), 30)

        async def fetched_ahead() -> bool:
            return len(worker.ahead) == 3

        await _until(fetched_ahead)
        worker.stop()
        await asyncio.wait_for(running, 30)
        stored = await _stored(js)
        # Handed back, not left to wait out ack_wait: the next worker gets them at once.
        sub = await js.pull_subscribe_bind(durable=CONSUMER, stream=STREAM)
        again = await sub.fetch(batch=3, timeout=5)
    finally:
        worker.stop()
        await nc.close()
    assert len(worker.seen) == 1 and stored == 3  # the one in hand was finished and acked
    assert sorted(msg.data for msg in again) == sorted({b"0", b"1", b"2", b"3"} - {worker.seen[0][0]})


async def test_poison_is_terminated_not_redelivered(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await _topology(js, ack_wait=1.0)
    worker = Recorder(nats_server.url)
    running = asyncio.create_task(worker.run())
    try:
        await js.publish(SUBJECT, b"poison")
        await js.publish(SUBJECT, b"fine")

        async def settled() -> bool:
            return await _stored(js) == 0

        await _until(settled)
        await asyncio.sleep(1.5)  # past ack_wait: a message left unsettled would come back
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)
        await nc.close()
    assert sorted(worker.seen) == [(b"fine", 1), (b"poison", 1)]


async def test_an_idle_worker_leaves_after_idle_exit(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    await _topology(nc.jetstream(), ack_wait=1.0)
    await nc.close()
    worker = Recorder(nats_server.url, idle_exit=1.0)
    started = time.monotonic()
    await asyncio.wait_for(worker.run(), 30)
    assert 1.0 <= time.monotonic() - started < 10 and worker.seen == []


async def test_a_stop_before_nats_answers_ends_the_worker() -> None:
    worker = Recorder(f"nats://127.0.0.1:{queue.free_port()}")
    running = asyncio.create_task(worker.run())
    await asyncio.sleep(0.5)
    worker.stop()
    await asyncio.wait_for(running, 30)
    assert worker.seen == []
