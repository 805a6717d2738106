"""Where a run's generation queue stands, read one way for everyone who asks.

The dispatcher ends a run when the queue is drained, the operator scales inference on its depth
and counts progress from it without a dispatcher: all of them read the same four numbers here,
and `drained` is the one rule for "nothing left for the workers".
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext

from cosmoforge.queue.topology import CONSUMER, stream_name


@dataclass(frozen=True)
class QueueState:
    """The run's stream and its generators' consumer."""

    waiting: int  # not yet delivered (the consumer's num_pending)
    in_flight: int  # delivered, not acknowledged (the consumer's num_ack_pending)
    stored: int  # messages in the stream: waiting, in flight, or stuck (deliveries used up)
    published: int = 0  # messages ever stored (the stream's last sequence)

    @property
    def depth(self) -> int:
        """Work the workers still have: what inference is scaled on."""
        return self.waiting + self.in_flight


def drained(queue: QueueState, idle_polls: int, patience: int = 3) -> bool:
    """Is there nothing left for workers to do?

    An empty stream is the normal end. Messages that are neither waiting nor in flight for
    several polls in a row have used up their deliveries (a worker died on each of them); they
    will never be delivered again, and the run must end and report them instead of waiting.
    """
    if queue.stored == 0:
        return True
    return queue.waiting == 0 and queue.in_flight == 0 and idle_polls >= patience


def stuck(queue: QueueState) -> bool:
    """Messages are stored but none is waiting or in flight: one poll towards `drained`'s patience."""
    return bool(queue.stored) and not (queue.waiting or queue.in_flight)


async def read_state(js: JetStreamContext, run: str) -> QueueState:
    """The run's queue now (NotFoundError when it has no stream or consumer yet)."""
    stream = await js.stream_info(stream_name(run))
    consumer = await js.consumer_info(stream_name(run), CONSUMER)
    return QueueState(
        waiting=int(consumer.num_pending or 0),
        in_flight=int(consumer.num_ack_pending or 0),
        stored=int(stream.state.messages or 0),
        published=int(stream.state.last_seq or 0),
    )


async def remaining(js: JetStreamContext, run: str) -> int:
    """Prompts still in the stream: queued or delivered but not yet acknowledged."""
    info = await js.stream_info(stream_name(run))
    return int(info.state.messages)
