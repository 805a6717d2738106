"""Scaling on saturation: what the workers say about their servers, with the queue's stabilization.

The decision is pure (`autoscale.decide` with a `saturation`); the last test asks real workers'
load answers over a real nats-server, the way the operator's queue probe does.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import nats
import pytest

from cosmoforge.generation.load import WorkerLoad, answer, gather, saturation
from cosmoforge.operator.autoscale import decide, saturation_replicas
from cosmoforge.operator.dispatch import QueueProbe
from cosmoforge.spec.model import Autoscaling


def _decide(current: int, now: float, history: Any = (), **kw: Any) -> Any:
    options: dict[str, Any] = {
        "depth": 1000,
        "waiting": 500,
        "done": False,
        "suspended": False,
        "target_per_replica": 100,
        "minimum": 1,
        "maximum": 8,
        "window": 60.0,
    }
    return decide(current=current, now=now, history=history, **{**options, **kw})


@pytest.mark.parametrize(
    ("current", "ready", "share", "waiting", "depth", "expected"),
    [
        (2, 2, 1.0, 10, 50, 3),  # saturated, prompts wait: one more
        (2, 2, 0.5, 10, 50, 3),  # half of the workers is enough
        (2, 1, 1.0, 10, 50, 2),  # the replica asked for is still starting: wait for it
        (2, 2, 1.0, 0, 50, 2),  # saturated, but nothing waits: the tail of the run
        (3, 3, 0.25, 10, 50, 3),  # a few saturated: hold
        (3, 3, 0.0, 10, 50, 2),  # nobody saturated: one fewer
        (1, 1, 0.0, 10, 50, 1),  # work left keeps one server
        (1, 1, 0.0, 0, 0, 0),  # no work at all: none (minimum 0)
        (8, 8, 1.0, 10, 50, 8),  # the upper bound holds
    ],
)
def test_saturation_replicas(current: int, ready: int, share: float, waiting: int, depth: int, expected: int):
    assert saturation_replicas(current, ready, share, waiting, depth, minimum=0, maximum=8) == expected


def test_saturated_servers_gain_one_replica_at_a_time_as_each_becomes_ready():
    first = _decide(2, now=0.0, saturation=1.0, ready=2)
    assert first.replicas == 3 and first.reason == "saturation"
    starting = _decide(3, now=10.0, history=first.history, saturation=1.0, ready=2)
    assert starting.replicas == 3
    ready = _decide(3, now=20.0, history=starting.history, saturation=1.0, ready=3)
    assert ready.replicas == 4


def test_unsaturated_servers_lose_a_replica_only_after_the_stabilization_window():
    history: Any = ()
    current, changes = 4, []
    for second in range(0, 200, 10):
        decision = _decide(current, now=float(second), history=history, saturation=0.0, ready=current)
        if decision.replicas != current:
            changes.append((second, decision.replicas))
        current, history = decision.replicas, decision.history
    # One replica per window of 60 s, never two at once, and never below the one that work needs.
    assert changes == [(60, 3), (120, 2), (180, 1)]


def test_alternating_saturation_does_not_flap_down():
    history: Any = ()
    current = 3
    for second in range(0, 300, 10):
        share = 1.0 if (second // 10) % 2 == 0 else 0.0
        decision = _decide(current, now=float(second), history=history, saturation=share, ready=current)
        assert decision.replicas >= current  # a saturated reading in every window keeps them
        current, history = decision.replicas, decision.history


def test_unknown_saturation_falls_back_to_queue_depth_and_done_still_ends_at_zero():
    assert _decide(1, now=0.0, depth=750, saturation=None).replicas == 8
    assert _decide(4, now=0.0, depth=0, done=True, saturation=1.0).replicas == 0
    assert _decide(4, now=0.0, suspended=True, saturation=1.0).replicas == 0
    assert _decide(4, now=0.0, depth=None, saturation=1.0).replicas == 4


def test_keda_mode_cannot_scale_on_saturation():
    with pytest.raises(ValueError, match="saturation"):
        Autoscaling(mode="keda", signal="saturation")
    assert Autoscaling(signal="saturation").mode == "builtin"


async def test_the_operator_gathers_the_workers_answers_over_nats(nats_server):
    workers = []
    for name, saturated in (("w1", True), ("w2", False), ("w3", True)):
        nc = await nats.connect(nats_server.url)
        reason = "engine queue" if saturated else ""
        await answer(
            nc, "run-a", functools.partial(WorkerLoad, name, "http://tgi", 16, 16, saturated, reason)
        )
        workers.append(nc)
    other = await nats.connect(nats_server.url)
    await answer(other, "run-b", lambda: WorkerLoad("x", "http://tgi", 1, 1, False))
    probe = QueueProbe(nats_server.url)
    try:
        loads = await probe.loads("run-a")
        assert sorted(load.worker for load in loads) == ["w1", "w2", "w3"]
        assert saturation(loads) == pytest.approx(2 / 3)
        assert await probe.loads("run-none") == []
        for nc in workers:
            await nc.close()
        await asyncio.sleep(0.1)
        assert await gather(other, "run-a", wait=0.2) == []  # gone workers no longer count
    finally:
        await probe.close()
        await other.close()
