"""What the HTTP server asks of an engine, and nothing more: a job in, tokens out.

vLLM and TGI are small HTTP servers around an engine they do not look inside; so is this one.
The server turns TGI's and OpenAI's requests into a `Job`, hands it to `Engine.submit`, and
writes the `Token`s and the final `Finished` back in whichever wire format was asked for. An
engine refuses a job by raising one of the errors below before its first token; the server
maps each to an HTTP status in one place (`app.status_for`).
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["length", "stop"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; `None` leaves the engine's default."""

    max_tokens: int = 20
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    do_sample: bool = True

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


@dataclass(frozen=True)
class Job:
    """One generation: raw text (`prompt`) or chat turns the engine formats with its template.

    `strict_context` is TGI's rule (prompt plus `max_tokens` must fit, else 422); without it the
    answer is cut to the room left, as the OpenAI routes have always done here.
    """

    params: SamplingParams
    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    schema: dict[str, Any] | None = None  # constrained decoding: the answer is JSON of this shape
    model: str | None = None  # the model name the client asked for; None: the API has no such field
    strict_context: bool = False


@dataclass(frozen=True)
class Token:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    completion_tokens: int


@dataclass
class Generation:
    """A job the engine accepted: its prompt size, then its tokens and one `Finished` last."""

    prompt_tokens: int
    events: AsyncGenerator[Token | Finished, None]
    seed: int | None = None


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    max_total_tokens: int
    dtype: str = "unknown"
    device: str = "cpu"
    max_concurrent_requests: int = 128
    version: str = "cosmoforge"


@dataclass
class Collected:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    seed: int | None = None
    pieces: list[str] = field(default_factory=list)


class Engine(ABC):
    """A model the server can run jobs on, concurrently if it can."""

    info: EngineInfo

    @abstractmethod
    async def submit(self, job: Job) -> Generation:
        """Accept the job (or raise a `Refused`) and return its token stream."""

    def stats(self) -> dict[str, Any]:
        """Counters for `GET /stats`: whatever the engine finds worth showing."""
        return {}

    def close(self) -> None:  # noqa: B027 - an engine with nothing to release keeps this
        """Release the model; the server calls it on shutdown."""


async def streamed(generation: Generation) -> AsyncIterator[str | Collected]:
    """Each token's text as it comes, then the whole answer."""
    pieces: list[str] = []
    finished = Finished("length", 0)
    try:
        async for event in generation.events:
            if isinstance(event, Token):
                pieces.append(event.text)
                yield event.text
            else:
                finished = event
    finally:
        await generation.events.aclose()  # a client gone mid-stream frees its slot at once
    yield Collected(
        text="".join(pieces),
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        finish_reason=finished.reason,
        seed=generation.seed,
        pieces=pieces,
    )


async def collect(generation: Generation) -> Collected:
    """Drain a generation into one answer, for the routes that do not stream."""
    async for item in streamed(generation):
        if isinstance(item, Collected):
            return item
    raise RuntimeError("a generation ended without its answer")


class Refused(Exception):
    """A job the engine will not run; the subclass says which HTTP status answers it."""


class InvalidRequest(Refused, ValueError):
    """Well-formed JSON the engine cannot honour (422, TGI's "Input validation error")."""


class GrammarError(InvalidRequest):
    """A constrained-decoding request the server cannot honour; answered with 422, as TGI does."""


class ContextTooLong(InvalidRequest):
    def __init__(self, prompt_tokens: int, max_new_tokens: int | None, n_ctx: int):
        # TGI's wording, which the generator's error classification recognises as permanent.
        if max_new_tokens is None:
            message = (
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {n_ctx}. "
                f"Given: {prompt_tokens} `inputs` tokens"
            )
        else:
            message = (
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {n_ctx}. "
                f"Given: {prompt_tokens} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        super().__init__(message)


class UnknownModel(Refused):
    """The request names a model this server does not serve (404, as vLLM answers)."""


class Overloaded(Refused):
    """The engine cannot take the job now (503: clients retry)."""


def room_for(job: Job, prompt_tokens: int, n_ctx: int) -> int:
    """How many tokens the job may generate in a context of `n_ctx`, or `ContextTooLong`."""
    wanted = job.params.max_tokens
    if prompt_tokens >= n_ctx or (job.strict_context and prompt_tokens + wanted > n_ctx):
        raise ContextTooLong(prompt_tokens, wanted if job.strict_context else None, n_ctx)
    return max(0, min(wanted, n_ctx - prompt_tokens))


async def drain(
    queue: asyncio.Queue[Token | Finished | BaseException], cancelled: threading.Event
) -> AsyncGenerator[Token | Finished, None]:
    """A decode thread's events as a generation's stream: tokens until `Finished`, an error the
    thread handed over raised here. Closing the stream early sets `cancelled`, so the thread
    frees the request's slot at its next step (a client that went away costs nothing more)."""
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return
    finally:
        cancelled.set()
