"""How many inference servers a run needs: pure, so it is tested exactly.

Two signals. Queue depth: enough servers for the prompts left, `targetQueuePerReplica` each.
Saturation: the generator workers say whether they find their server full (requests queueing
in the engine, its KV cache used up, overload errors; `generation/inflight.py`); a replica is
added while most of them do and prompts wait, and one is taken away while none does. Depth
says how much work is left, saturation whether the servers there are already doing all they
can: the second does not need a per-model guess of what one replica can take.

GPU servers take minutes to start, so flapping is expensive twice: capacity lost while a
server shuts down and again while its replacement loads weights. Scaling up follows the signal
at once (on saturation: one replica at a time, and only once the ones asked for are ready, or
a full engine would keep adding replicas while the first new one still loads); scaling down
takes the highest recommendation seen during the stabilization window (as the Kubernetes HPA
does). A run whose queue is empty and whose generation is done drops to zero at once: nothing
will arrive any more.
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


SATURATED_SHARE = 0.5  # workers that find their server full, out of those that answered


def saturation_replicas(
    current: int,
    ready: int,
    saturation: float,
    waiting: int,
    depth: int,
    minimum: int,
    maximum: int,
) -> int:
    """One more server while most workers find theirs full and prompts wait, one fewer while
    none does; any work at all keeps at least one server."""
    floor = max(minimum, 1) if depth > 0 else minimum
    if saturation >= SATURATED_SHARE and waiting > 0:
        wanted = current + 1 if ready >= current else current
    elif saturation == 0:
        wanted = current - 1
    else:
        wanted = current
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
    saturation: float | None = None,
    waiting: int = 0,
    ready: int | None = None,
) -> Decision:
    """The replica count to set now, and the recommendation history to keep for the next call.

    `depth` is pending + in-flight messages of the run's consumer, or None when unknown (the
    queue is unreachable): then nothing changes. An empty history (e.g. after an operator
    restart) is seeded with the current count, so a restart never causes an early scale-down.

    `saturation` (the share of answering workers whose server is full) scales on saturation
    instead, with `waiting` (prompts not yet delivered) and `ready` (servers ready, default:
    all of `current`); None, when no worker answered (none started yet), falls back to depth.
    """
    if suspended:
        return Decision(0, (), "suspended")
    if done and (depth or 0) == 0:
        return Decision(0, (), "done")
    if depth is None:
        return Decision(current, tuple(history), "queue depth unknown")
    recent = [(t, r) for t, r in history if now - t < window] if history else [(now, current)]
    if saturation is None:
        wanted, signal = desired_replicas(depth, target_per_replica, minimum, maximum), "queue"
    else:
        ready = current if ready is None else ready
        wanted = saturation_replicas(current, ready, saturation, waiting, depth, minimum, maximum)
        signal = "saturation"
    recent.append((now, wanted))
    if wanted >= current:
        return Decision(wanted, tuple(recent), signal if wanted > current else "steady")
    # Down: never below any recommendation of the window, and never below the bounds.
    stable = max(r for _, r in recent)
    replicas = max(minimum, min(maximum, min(current, stable)))
    return Decision(replicas, tuple(recent), "stabilizing" if replicas > wanted else signal)
