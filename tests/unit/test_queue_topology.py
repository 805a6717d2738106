"""One topology for the generation queue: whoever creates the consumer, it gets the same limits.

JetStream keeps the settings of whichever process creates the consumer first (the dispatcher,
or the operator when there is none), so both must take them from `queue.consumer_limits`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import nats
import yaml

from conftest import small_run
from cosmoforge import queue
from cosmoforge.operator.dispatch import QueueProbe
from cosmoforge.queue import EmbeddedNats
from cosmoforge.runs.manager import RunManager
from cosmoforge.spec.model import GenerationSpec, parse_run


def test_consumer_leaves_room_for_requests_and_a_shard_per_worker() -> None:
    limits = queue.consumer_limits(GenerationSpec(concurrency=8, shard_size=100, workers=3, max_attempts=4))
    assert (limits.max_ack_pending, limits.max_deliver) == (3 * (8 + 2 + 100), 5)
    assert limits.ack_wait == queue.ACK_WAIT_SECONDS


def _limits(config: Any) -> tuple[float, int, int]:
    return float(config.ack_wait), int(config.max_deliver), int(config.max_ack_pending)


async def test_the_operator_creates_the_consumer_the_dispatcher_would(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    document = small_run("by-operator", concurrency=8, shardSize=100, workers=3, maxAttempts=4)
    document["spec"]["output"] = {"uri": str(tmp_path / "out")}
    dispatched = copy.deepcopy(document)
    dispatched["metadata"]["name"] = "by-dispatcher"
    run = parse_run(document)

    probe = QueueProbe(nats_server.url)
    manager = RunManager(nats_server.url, poll_seconds=0.2)
    nc = await nats.connect(nats_server.url)
    try:
        await probe.ensure_topology(run)
        await probe.ensure_topology(run)  # again (every reconcile): the consumer stays as it is
        await manager.start()
        await manager.start_run(yaml.safe_dump(dispatched))
        js = nc.jetstream()
        by_operator = await js.consumer_info(queue.stream_name("by-operator"), queue.CONSUMER)
        by_dispatcher = await js.consumer_info(queue.stream_name("by-dispatcher"), queue.CONSUMER)
    finally:
        await nc.close()
        await manager.close()
        await probe.close()
    expected = queue.consumer_limits(run.spec.generation)
    assert _limits(by_operator.config) == _limits(by_dispatcher.config)
    assert _limits(by_operator.config) == (expected.ack_wait, expected.max_deliver, expected.max_ack_pending)
