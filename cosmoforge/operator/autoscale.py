"""How many inference servers a run needs, from its queue depth: pure, so it is tested exactly.

GPU servers take minutes to start, so flapping is expensive twice: capacity lost while a
server shuts down and again while its replacement loads weights. Scaling up follows the queue
at once; scaling down takes the highest recommendation seen during the stabilization window
(as the Kubernetes HPA does). A run whose queue is empty and whose generation is done drops to
zero at once: nothing will arrive any more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Recommendation = tuple[float, int]  # (time in seconds, recommended replicas)


def desired_replicas(depth: int, target_per_replica: int, minimum: int, maximum: int) -> int:
    """clamp(ceil(depth / target), min, max); any work at all keeps at least one server."""
    wanted = math.ceil(max(0, depth) / max(1, target_per_replica))
    floor = max(minimum, 1) if depth > 0 else minimum
    return max(floor, min(maximum, wanted))


@dataclass(frozen=True)
class Decision:
    replicas: int
    history: tuple[Recommendation, ...]
    reason: str


def decide(
    *,
    current: int,
    depth: int | None,
    done: bool,
    suspended: bool,
    target_per_replica: int,
    minimum: int,
    maximum: int,
    window: float,
    now: float,
    history: Sequence[Recommendation] = (),
) -> Decision:
    """The replica count to set now, and the recommendation history to keep for the next call.

    `depth` is pending + in-flight messages of the run's consumer, or None when unknown (the
    queue is unreachable): then nothing changes. An empty history (e.g. after an operator
    restart) is seeded with the current count, so a restart never causes an early scale-down.
    """
    if suspended:
        return Decision(0, (), "suspended")
    if done and (depth or 0) == 0:
        return Decision(0, (), "done")
    if depth is None:
        return Decision(current, tuple(history), "queue depth unknown")
    recent = [(t, r) for t, r in history if now - t < window] if history else [(now, current)]
    wanted = desired_replicas(depth, target_per_replica, minimum, maximum)
    recent.append((now, wanted))
    if wanted >= current:
        return Decision(wanted, tuple(recent), "queue" if wanted > current else "steady")
    # Down: never below any recommendation of the window, and never below the bounds.
    stable = max(r for _, r in recent)
    replicas = max(minimum, min(maximum, min(current, stable)))
    return Decision(replicas, tuple(recent), "stabilizing" if replicas > wanted else "queue")
