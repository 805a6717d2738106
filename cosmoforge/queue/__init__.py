"""NATS JetStream for a run: its topology, publishing, its state, the pull-worker loop, a local server.

One work-queue stream per run holds the prompts; each message's id is its prompt id, so a
republish after a restart is dropped by the server's duplicate window. Generators share one
durable pull consumer: a message leaves the stream only when a worker acks it, and workers ack
only after the completion is durable in storage.

- `topology`: every stream, subject and consumer name, the consumer limits and ack waits;
- `publish`: pipelined, confirmed, idempotent publishing;
- `state`: the queue's numbers (`QueueState`) and when it is `drained`;
- `pull`: the loop every worker runs (`PullWorker`), `connect_unless_stopped`;
- `server`: an embedded nats-server for laptops and tests.

The names most callers need are re-exported here (`from cosmoforge import queue; queue.encode`).
"""

from cosmoforge.queue.publish import Published, encode, publish_all
from cosmoforge.queue.pull import PullWorker, connect_unless_stopped, settle
from cosmoforge.queue.server import EmbeddedNats, free_port, nats_server_binary
from cosmoforge.queue.state import QueueState, drained, read_state, remaining, stuck
from cosmoforge.queue.topology import (
    ACK_WAIT_SECONDS,
    CONSUMER,
    DUPLICATE_WINDOW_SECONDS,
    ConsumerLimits,
    consumer_limits,
    ensure_consumer,
    ensure_generation_queue,
    ensure_stream,
    ensure_work_queue,
    events_subject,
    prefetch,
    prompts_subject,
    run_key,
    stream_name,
    subject_token,
)

__all__ = [
    "ACK_WAIT_SECONDS",
    "CONSUMER",
    "DUPLICATE_WINDOW_SECONDS",
    "ConsumerLimits",
    "EmbeddedNats",
    "Published",
    "PullWorker",
    "QueueState",
    "connect_unless_stopped",
    "consumer_limits",
    "drained",
    "encode",
    "ensure_consumer",
    "ensure_generation_queue",
    "ensure_stream",
    "ensure_work_queue",
    "events_subject",
    "free_port",
    "nats_server_binary",
    "prefetch",
    "prompts_subject",
    "publish_all",
    "read_state",
    "remaining",
    "run_key",
    "settle",
    "stream_name",
    "stuck",
    "subject_token",
]
