"""One `QueueState`, read one way, for the dispatcher's end of a run and the operator's scaling."""

from __future__ import annotations

import nats

from conftest import small_run
from cosmoforge import queue
from cosmoforge.operator import progress
from cosmoforge.operator.dispatch import QueueProbe
from cosmoforge.queue import EmbeddedNats, QueueState, drained
from cosmoforge.spec.model import parse_run


def test_drained_waits_for_stuck_messages_before_giving_up_on_them() -> None:
    assert drained(QueueState(waiting=0, in_flight=0, stored=0), idle_polls=0)
    assert not drained(QueueState(waiting=1, in_flight=2, stored=3), idle_polls=9)
    assert not drained(QueueState(waiting=0, in_flight=0, stored=2), idle_polls=2, patience=3)
    assert drained(QueueState(waiting=0, in_flight=0, stored=2), idle_polls=3, patience=3)
    assert queue.stuck(QueueState(waiting=0, in_flight=0, stored=2))
    assert not queue.stuck(QueueState(waiting=0, in_flight=1, stored=2))


def test_depth_is_the_work_left_for_workers() -> None:
    state = QueueState(waiting=4, in_flight=2, stored=7, published=10)  # one message stuck
    assert state.depth == 6
    counts = progress.counts_from(state, None)
    assert (counts.prompts, counts.generated, counts.done) == (10, 4, False)


async def test_the_operator_reads_the_state_the_dispatcher_decides_on(nats_server: EmbeddedNats) -> None:
    run = parse_run(small_run("state", workers=1))
    probe = QueueProbe(nats_server.url)
    nc = await nats.connect(nats_server.url)
    try:
        assert await probe.state("state") is None  # nothing yet: no stream, no consumer
        await probe.ensure_topology(run)
        await queue.publish_all(nc, "state", ((f"p{i}", queue.encode({"i": i})) for i in range(5)))
        js = nc.jetstream()
        sub = await js.pull_subscribe_bind(durable=queue.CONSUMER, stream=queue.stream_name("state"))
        taken = await sub.fetch(batch=2, timeout=5)
        await taken[0].ack_sync()
        seen = await probe.state("state")
        direct = await queue.read_state(js, "state")
    finally:
        await nc.close()
        await probe.close()
    assert seen == direct == QueueState(waiting=3, in_flight=1, stored=4, published=5)
    assert seen.depth == 4 and not drained(seen, idle_polls=99)
