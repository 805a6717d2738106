"""How many requests a generator keeps in flight at one inference endpoint, found while it runs.

A continuous-batching engine (TGI, vLLM) gives more tokens per second the more sequences it
batches, until its batch or its KV cache is full. Requests beyond that point wait in the
engine's queue (latency grows, throughput does not) or, on vLLM, get preempted and computed
again (throughput falls). Where that point lies depends on the model, the GPU, prompt and
completion lengths and on how many workers share the engine, so it is measured, not configured:

- where the engine exports its load (`EngineLoad`, read from its `/metrics`), the limit grows
  while the engine admits everything sent to it, holds while its KV cache is full or it
  preempts, and shrinks towards "what it runs plus a small queue" when more requests wait; a
  small queue keeps every freed batch slot filled at the next step without making anyone wait
  long;
- otherwise from what any client sees: more requests in flight that bring no more tokens per
  second mean the server queues them (the limit goes back to where the gain stopped), and
  overload errors or timeouts cut the limit multiplicatively, as TCP does;
- in both cases a request slower than half the request timeout cuts the limit, so the tail
  stays clear of the timeout.

Multiplicative cuts happen at most once per latency window: a smaller limit takes effect only
as requests in flight finish, and cutting again before then would overshoot. The class is pure: time and
observations are passed in, so tests drive it step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# Failures that say the server is overloaded; others (a refused connection, a 4xx) say nothing
# about how much it can take.
OVERLOAD_ERRORS = frozenset({"timeout", "rate_limited", "server_error"})

# Engine metric names: vLLM (V0 and V1 names) and TGI. Values are summed over label sets, so a
# server hosting several models reads as one engine.
RUNNING = ("vllm:num_requests_running", "tgi_batch_current_size")
WAITING = ("vllm:num_requests_waiting", "tgi_queue_size")
KV_USAGE = ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc")
PREEMPTIONS = ("vllm:num_preemptions_total", "vllm:num_preemptions")


@dataclass(frozen=True)
class EngineLoad:
    """What an engine reports about itself: sequences batched, requests queued, KV cache in use."""

    running: float
    waiting: float
    kv_usage: float | None = None  # share of the KV cache in use, 0..1
    preemptions: float | None = None  # a counter: sequences evicted from the batch so far

    @property
    def full(self) -> bool:
        """No spare capacity: requests queue, or the KV cache is (nearly) used up."""
        return self.waiting > 0 or (self.kv_usage is not None and self.kv_usage >= KV_FULL)


KV_FULL = 0.95


def parse_engine_metrics(text: str) -> EngineLoad | None:
    """The engine's load from its Prometheus text exposition; None when it exports none of it."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_created", "_bucket", "_count", "_sum")):
                continue
            found[sample.name] = found.get(sample.name, 0.0) + float(sample.value)

    def first(names: tuple[str, ...]) -> float | None:
        return next((found[name] for name in names if name in found), None)

    running, waiting = first(RUNNING), first(WAITING)
    if running is None and waiting is None:
        return None
    return EngineLoad(
        running=running or 0.0,
        waiting=waiting or 0.0,
        kv_usage=first(KV_USAGE),
        preemptions=first(PREEMPTIONS),
    )


@dataclass(frozen=True)
class ControllerState:
    """A snapshot for metrics, logs and the autoscaler."""

    limit: int
    latency: float  # seconds, smoothed, of successful requests (0 before the first)
    saturated: bool  # the endpoint has no spare capacity for this worker
    reason: str  # what moved the limit last
    engine_signals: bool  # the decision rests on the engine's own metrics


class InflightController:
    """AIMD on engine load where it is known, hill climbing on tokens/s where it is not.

    The worker calls `started` when it sends a request, `completed` / `failed` when the request
    ends, and `engine` with each `/metrics` reading; `limit` is how many may be in flight now.
    """

    SLOW_START = 1.25  # growth per engine sample before the first sign of a full engine
    AVOIDANCE = 1.05  # growth per engine sample afterwards
    ERROR_CUT = 0.7
    SLOW_CUT = 0.8
    QUEUE_SHARE = 0.2  # the engine queue kept: this share of its batch, at least QUEUE_MIN
    QUEUE_MIN = 4.0
    GAIN_NEEDED = 0.2  # share of a limit increase that tokens/s must follow for it to stay

    def __init__(self, minimum: int, maximum: int, start: int, timeout: float):
        if minimum < 1 or maximum < minimum:
            raise ValueError(f"bounds must satisfy 1 <= minimum <= maximum, got {minimum}..{maximum}")
        self.minimum, self.maximum, self.timeout = minimum, maximum, timeout
        self._limit = float(min(maximum, max(minimum, start)))
        self.latency = 0.0
        self.saturated = False
        self.reason = "start"
        self.slow_start = True
        self.cut_at = -math.inf
        self.peak = 0  # most requests in flight since the last decision: was the limit binding?
        self.in_flight = 0
        self.last_engine: EngineLoad | None = None
        self.engine_at = -math.inf
        # Tokens/s hill climbing (no engine signal): the epoch now measured, the one before.
        self.epoch_start: float | None = None
        self.epoch_tokens = 0
        self.epoch_done = 0
        self.previous: tuple[float, float] | None = None  # (limit, tokens/s)
        self.hold_until = -math.inf

    # --- what the worker reads --------------------------------------------------------------

    @property
    def limit(self) -> int:
        return int(self._limit)

    @property
    def window(self) -> float:
        """One latency: how long a change of the limit takes to show in what is measured."""
        return self.latency if self.latency > 0 else 1.0

    @property
    def sample_interval(self) -> float:
        """How often to read the engine's metrics: several times per request, within reason."""
        return min(5.0, max(0.1, self.window / 8))

    def engine_fresh(self, now: float) -> bool:
        return self.last_engine is not None and now - self.engine_at <= 3 * self.sample_interval + 1.0

    def state(self, now: float) -> ControllerState:
        return ControllerState(self.limit, self.latency, self.saturated, self.reason, self.engine_fresh(now))

    # --- what the worker reports --------------------------------------------------------------

    def started(self, in_flight: int) -> None:
        self.in_flight = in_flight
        self.peak = max(self.peak, in_flight)

    def completed(self, now: float, latency: float, tokens: int, in_flight: int) -> None:
        self.in_flight = in_flight
        self.latency = latency if self.latency <= 0 else 0.8 * self.latency + 0.2 * latency
        if latency > self.timeout / 2:
            self._cut(now, self.SLOW_CUT, "slow requests")
            return
        if self.engine_fresh(now):
            return
        self._climb(now, tokens)

    def failed(self, now: float, kind: str, in_flight: int) -> None:
        self.in_flight = in_flight
        if kind in OVERLOAD_ERRORS:
            self.saturated = True
            self._cut(now, self.ERROR_CUT, f"{kind} errors")

    def engine(self, now: float, load: EngineLoad) -> None:
        """A reading of the engine's metrics: the limit follows its queue and preemptions."""
        before, self.last_engine, self.engine_at = self.last_engine, load, now
        self.epoch_start, self.previous = None, None  # latency-only climbing starts over if needed
        preempted = (
            before is not None
            and before.preemptions is not None
            and load.preemptions is not None
            and load.preemptions > before.preemptions
        )
        allowance = max(self.QUEUE_MIN, self.QUEUE_SHARE * load.running)
        self.saturated = load.full or preempted
        if load.waiting > allowance:
            # Shrink in proportion: every worker sharing the engine does the same, so together
            # they bring its queue back to the allowance. Taken from what is in flight, not from
            # the limit, the cut can be repeated on every reading without compounding: until
            # requests finish, the same reading gives the same limit.
            share = (load.running + allowance) / (load.running + load.waiting)
            target = max(float(self.minimum), min(self._limit, self.in_flight * max(0.5, share)))
            if target < self._limit:
                self._limit, self.reason, self.slow_start = target, "engine queue", False
        elif preempted or (load.kv_usage is not None and load.kv_usage >= KV_FULL):
            # Full, but still running all it admitted: hold. A preempted sequence is computed
            # again later (a prefill, cheap next to its decoding), and it waits in the engine's
            # queue meanwhile, where the rule above sees it if there are too many.
            self.reason = "preemptions" if preempted else "KV cache full"
        elif self.peak >= self.limit and load.running + load.waiting >= 0.9 * self.in_flight:
            # Raise only a limit that holds requests back, and only once the engine has taken in
            # what was sent: requests still on their way would hide a queue about to form.
            self._grow(self.SLOW_START if self.slow_start else self.AVOIDANCE, "engine has room")
        self.peak = self.in_flight

    # --- decisions ----------------------------------------------------------------------------

    def _grow(self, factor: float, reason: str) -> None:
        self._limit = min(float(self.maximum), max(self._limit * factor, self._limit + 1))
        self.reason = reason

    def _cut(self, now: float, factor: float, reason: str) -> None:
        self.slow_start = False
        if now - self.cut_at < self.window:
            return
        self.cut_at = now
        self._limit = max(float(self.minimum), self._limit * factor)
        self.reason = reason
        self.epoch_start, self.previous = None, None

    def _climb(self, now: float, tokens: int) -> None:
        """Without engine metrics: raise the limit while tokens/s follow, else go back and hold."""
        if self.epoch_start is None:
            self.epoch_start, self.epoch_tokens, self.epoch_done = now, 0, 0
            return
        self.epoch_tokens += tokens
        self.epoch_done += 1
        # An epoch spans two latencies and enough answers to average over; the first latency of
        # it still carries requests sent under the previous limit, but both epochs carry as many.
        if now - self.epoch_start < 2 * self.window or self.epoch_done < 8:
            return
        rate = self.epoch_tokens / (now - self.epoch_start)
        self.epoch_start, self.epoch_tokens, self.epoch_done = now, 0, 0
        binding = self.peak >= self.limit
        self.peak = self.in_flight
        if self.previous is not None and self._limit > self.previous[0]:
            old_limit, old_rate = self.previous
            wanted = old_rate * (1 + self.GAIN_NEEDED * (self._limit / old_limit - 1))
            if rate < wanted:  # more in flight bought (almost) nothing: the server is queueing
                self._limit, self.slow_start, self.saturated = old_limit, False, True
                self.previous, self.reason = (old_limit, old_rate), "no gain from more requests"
                self.hold_until = now + 10 * self.window
                return
        self.previous = (self._limit, rate)
        if now < self.hold_until or not binding:
            return
        self.saturated = False
        self._grow(2.0 if self.slow_start else 1.25, "tokens/s still growing")
