"""An engine with canned answers after a fixed latency, to measure everything but the model.

Throughput of the generation path is a property of the pipeline (queue, client, shard
writes), not of the model; measuring it against a real model on a CPU measures the model.
This engine answers every job after `latency` seconds with the same words, behind the same
server and wire protocol as the real model, so the real clients run unchanged against it.
Like vLLM it can refuse model names it does not serve, and it can answer 503 to every n-th
request. It records what it received (`GET /stats`).

`python -m cosmoforge.services.modelserver --engine canned --latency 0.05` serves it;
`FakeServer(Behaviour(...))` runs it on a loopback port in a thread (tests).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from cosmoforge.services.modelserver.background import BackgroundServer
from cosmoforge.services.modelserver.engine import (
    Engine,
    EngineInfo,
    Finished,
    Generation,
    Job,
    Overloaded,
    Token,
    UnknownModel,
)

WORD = "lorem"


@dataclass
class Behaviour:
    model: str = "fake/canned-model"
    latency: float = 0.05
    tokens: int = 16
    check_model: bool = False  # vLLM answers 404 to a model it does not serve; TGI ignores the name
    fail_every: int = 0  # every n-th generation request answers 503 (0: never)
    requests: Counter[str] = field(default_factory=Counter)
    first_at: float = 0.0  # wall-clock time of the first and the latest generation request
    last_at: float = 0.0
    in_flight: int = 0
    busy: float = 0.0  # request-seconds spent waiting out the latency: busy / span = concurrency
    _changed: float = 0.0

    def track(self, delta: int) -> None:
        now = time.time()
        if self.in_flight:
            self.busy += self.in_flight * (now - self._changed)
        self.in_flight += delta
        self._changed = now

    @property
    def text(self) -> str:
        return " ".join([WORD] * self.tokens)


class CannedEngine(Engine):
    def __init__(self, behaviour: Behaviour | None = None):
        self.behaviour = behaviour or Behaviour()
        self.info = EngineInfo(self.behaviour.model, max_total_tokens=4096, dtype="none", version="fake")

    async def submit(self, job: Job) -> Generation:
        b = self.behaviour
        b.requests["chat" if job.messages is not None else "generate"] += 1
        b.last_at = time.time()
        b.first_at = b.first_at or b.last_at
        number = b.requests["chat"] + b.requests["generate"]
        b.track(+1)
        try:
            await asyncio.sleep(b.latency)
        finally:
            b.track(-1)
        if b.fail_every and number % b.fail_every == 0:
            raise Overloaded("injected")
        if b.check_model and job.model is not None and job.model != b.model:  # TGI routes name none
            raise UnknownModel(f"The model `{job.model}` does not exist.")
        tokens = min(b.tokens, job.params.max_tokens)
        return Generation(_prompt_words(job), _words(tokens), job.params.seed)

    def stats(self) -> dict[str, Any]:
        b = self.behaviour
        return {**b.requests, "first_at": b.first_at, "last_at": b.last_at, "busy": b.busy}


def _prompt_words(job: Job) -> int:
    if job.messages is not None:
        return sum(len(str(m.get("content") or "").split()) for m in job.messages)
    return len((job.prompt or "").split())


async def _words(count: int) -> AsyncGenerator[Token | Finished, None]:
    for index in range(count):
        yield Token(WORD if index == 0 else " " + WORD)
    yield Finished("length", count)


class FakeServer(BackgroundServer):
    """The canned engine behind the real server, on a loopback port in a background thread."""

    def __init__(self, behaviour: Behaviour | None = None, port: int = 0):
        self.behaviour = behaviour or Behaviour()
        super().__init__(CannedEngine(self.behaviour), port=port)
