"""Arrow schemas of what a run stores: prompts, generations (with full lineage) and failures.

Keeping them in one place makes every shard of every worker concatenable, and makes the
dataset's columns a documented contract rather than whatever a worker happened to write.
"""

from __future__ import annotations

import pyarrow as pa

PROMPT_FIELDS = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("run", pa.string()),
    pa.field("seed_source", pa.string()),
    pa.field("seed_kind", pa.string()),
    pa.field("seed_id", pa.string()),
    pa.field("audience", pa.string()),
    pa.field("style", pa.string()),
    pa.field("topic", pa.string()),
    pa.field("template_id", pa.string()),
    pa.field("template_version", pa.string()),
    pa.field("prompt", pa.string()),
]
PROMPTS = pa.schema(PROMPT_FIELDS)

_TIMESTAMP = pa.timestamp("ms", tz="UTC")

GENERATIONS = pa.schema(
    [
        *PROMPT_FIELDS,
        pa.field("text", pa.string()),
        pa.field("model", pa.string()),
        pa.field("engine", pa.string()),
        pa.field("sampling", pa.string()),  # JSON of temperature, top_p, max_new_tokens, seed, stop
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("started_at", _TIMESTAMP),
        pa.field("finished_at", _TIMESTAMP),
        pa.field("worker", pa.string()),
        pa.field("attempt", pa.int32()),
    ]
)

FAILURES = pa.schema(
    [
        *PROMPT_FIELDS,
        pa.field("error_kind", pa.string()),
        pa.field("error", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("failed_at", _TIMESTAMP),
        pa.field("worker", pa.string()),
    ]
)
