"""Every JetStream name, limit and wait of a run, in one place, and the calls that create them.

The stream, its consumer and the consumer's limits are created by whoever reaches the run first
(the dispatcher, the operator without a dispatcher, the embedded runner, the decontamination
submitter); JetStream keeps the first consumer's settings. So every creator takes the limits
from `consumer_limits` here, and workers never create anything: they bind to what exists.

Every name is derived from the run's key (`run_key`): `<namespace>/<name>` for a run that a
cluster's dispatcher or operator drives, the bare name for the embedded `cosmo run`. The same
name in two namespaces is two runs, so the namespace is part of every name below.

Generation: one work-queue stream per run (`COSMO_<RUN>`, `COSMO_<NS>_<RUN>_<digest>` with a
namespace) on `cosmo.<token>.prompts`, one durable pull consumer (`generators`) shared by every
worker, worker events on `cosmo.<token>.events`, where the token is the key with `/` as `_`.
Decontamination: a second stream per run (`<stream>_DECONTAM`) on `cosmo.<token>.decontam`, its
consumer `decontaminators`, whose max-deliveries advisories the stream also keeps.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

if TYPE_CHECKING:
    from cosmoforge.spec.model import GenerationSpec

log = logging.getLogger("cosmoforge.queue")

CONSUMER = "generators"
DUPLICATE_WINDOW_SECONDS = 24 * 3600
# Heartbeats arrive every ack_wait / 3, so live work never times out; only the messages of a
# dead worker wait this long before another worker gets them.
ACK_WAIT_SECONDS = 30.0

DECONTAM_CONSUMER = "decontaminators"
# Longer than generation's: a range is checked on every core at once, and a worker that stalls
# for a moment (page cache, a slow object store) should not lose it to another.
DECONTAM_ACK_WAIT_SECONDS = 60.0
DECONTAM_MAX_DELIVER = 10


def run_key(namespace: str | None, name: str) -> str:
    """A run's identity: `<namespace>/<name>`, or the bare name where no namespace applies.

    It is also the run's folder below `output.uri`, so storage, queue and registry agree by
    construction. Kubernetes names and namespaces are DNS labels (no `/`, `.` or `_`), which
    keeps the key unambiguous and the subject token below free of NATS separators.
    """
    return f"{namespace}/{name}" if namespace else name


def subject_token(run: str) -> str:
    """The key as one NATS subject token. `/` is legal in subjects but reads as a path in tools
    and permission lists; DNS labels never contain `_`, so the token stays unambiguous."""
    return run.replace("/", "_")


def stream_name(run: str) -> str:
    base = "COSMO_" + re.sub(r"[^A-Za-z0-9]", "_", run).upper()
    if "/" not in run:
        return base  # a bare name keeps the stream it always had
    # `-` and `/` both become `_`, so `a-b/c` and `a/b-c` would meet: a digest of the key keeps
    # them apart. 8 hex digits are plenty among the runs of one NATS server, and the name stays
    # far below JetStream's limit (two 63-character labels: about 150 characters).
    return f"{base}_{hashlib.sha256(run.encode()).hexdigest()[:8].upper()}"


def prompts_subject(run: str) -> str:
    return f"cosmo.{subject_token(run)}.prompts"


def events_subject(run: str) -> str:
    return f"cosmo.{subject_token(run)}.events"


def decontam_stream_name(run: str) -> str:
    return f"{stream_name(run)}_DECONTAM"


def decontam_subject(run: str) -> str:
    return f"cosmo.{subject_token(run)}.decontam"


def decontam_advisory_subject(run: str) -> str:
    """Where JetStream announces a task message it stopped delivering (`max_deliver` reached)."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{decontam_stream_name(run)}.{DECONTAM_CONSUMER}"


def prefetch(concurrency: int) -> int:
    """Prompts a generator holds beyond its requests in flight (the consumer must allow them)."""
    return max(1, concurrency // 4)


@dataclass(frozen=True)
class ConsumerLimits:
    ack_wait: float
    max_deliver: int
    max_ack_pending: int


def consumer_limits(spec: GenerationSpec, ack_wait: float = ACK_WAIT_SECONDS) -> ConsumerLimits:
    """The generators' consumer limits for a run.

    A worker holds up to `concurrency` prompts in requests (adaptive: its upper bound), a few
    fetched ahead of them, and up to about a shard of finished ones waiting to be written, all
    unacknowledged; a lower ceiling would stall pulls until the next shard write. One delivery
    more than `maxAttempts` leaves the worker room to record the last failure before the server
    gives up on the message.
    """
    per_worker = spec.max_in_flight + prefetch(spec.max_in_flight) + spec.shard_size
    return ConsumerLimits(
        ack_wait=ack_wait,
        max_deliver=spec.max_attempts + 1,
        max_ack_pending=per_worker * spec.workers,
    )


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
    """The generators' consumer; JetStream refuses (BadRequestError) other settings for one that exists."""
    config = ConsumerConfig(
        durable_name=CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
        filter_subject=prompts_subject(run),
    )
    await js.add_consumer(stream_name(run), config)


async def ensure_generation_queue(
    js: JetStreamContext, run: str, spec: GenerationSpec, ack_wait: float = ACK_WAIT_SECONDS
) -> ConsumerLimits:
    """The run's stream and its generators' consumer with `consumer_limits`; an existing
    consumer keeps its settings (prompts may be in flight under them). Returns the limits."""
    await ensure_stream(js, run)
    limits = consumer_limits(spec, ack_wait)
    try:
        await js.consumer_info(stream_name(run), CONSUMER)
    except NotFoundError:
        await ensure_consumer(js, run, limits.ack_wait, limits.max_deliver, limits.max_ack_pending)
    return limits


async def ensure_decontam_queue(
    js: JetStreamContext,
    run: str,
    ack_wait: float = DECONTAM_ACK_WAIT_SECONDS,
    max_deliver: int = DECONTAM_MAX_DELIVER,
) -> None:
    """The run's decontamination task stream (work queue, file storage) and its workers' consumer.

    The stream also keeps the consumer's max-deliveries advisories, which no consumer takes: a
    submitter that was away when JetStream gave up on a task still finds out.
    """
    stream = decontam_stream_name(run)
    await ensure_work_queue(js, stream, [decontam_subject(run), decontam_advisory_subject(run)])
    consumer = ConsumerConfig(
        durable_name=DECONTAM_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        filter_subject=decontam_subject(run),
    )
    try:
        await js.add_consumer(stream, consumer)
    except Exception as error:  # an existing consumer with other settings keeps them
        log.warning("keeping the existing %s consumer of %s: %s", DECONTAM_CONSUMER, stream, error)
