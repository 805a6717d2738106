"""Clients for inference servers: TGI (text-generation client) and OpenAI-compatible (vLLM, OpenAI).

Both return the same `Completion`, and both sort failures into transient ones (5xx, 429,
timeouts, connection errors: retry, maybe on another delivery) and permanent ones (validation,
context too long, unknown model: record and stop), because that decides whether a prompt is
retried or lands in the run's failure table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from cosmoforge.spec.model import Engine, GenerationSpec


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class InferenceError(Exception):
    def __init__(self, kind: str, message: str, transient: bool):
        self.kind, self.transient = kind, transient
        super().__init__(f"{kind}: {message}")


class Backend(Protocol):
    async def complete(self, prompt: str) -> Completion: ...

    async def close(self) -> None: ...


def _truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TGIBackend:
    """TGI's Messages API through the `text-generation` client: the server applies the chat template."""

    def __init__(self, endpoint: str, spec: GenerationSpec):
        from text_generation import AsyncClient

        self.spec = spec
        token = os.environ.get("HF_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.client = AsyncClient(endpoint.rstrip("/"), headers=headers, timeout=int(spec.timeout_seconds))

    async def complete(self, prompt: str) -> Completion:
        from text_generation.types import Message

        sampling = self.spec.sampling
        try:
            reply = await self.client.chat(
                messages=[Message(role="user", content=prompt)],
                max_tokens=self.spec.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed,
                repetition_penalty=sampling.repetition_penalty,
            )
        except Exception as error:
            raise classify(error) from error
        with answer_checked():
            choice = reply.choices[0]
            text = choice.message.content or ""
            finish = choice.finish_reason
            # The client has no `stop` for chat; cut client-side so the contract holds for every engine.
            text, stopped = _truncate_at_stop(text, sampling.stop)
            usage = reply.usage or {}
            if not isinstance(usage, dict):
                usage = dict(getattr(usage, "__dict__", {}))
            completion = Completion(
                text=text,
                model=str(reply.model),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                finish_reason="stop_sequence" if stopped else str(finish),
            )
        return checked(completion)

    async def close(self) -> None:
        return None


class OpenAIBackend:
    """Any OpenAI-compatible chat completions server: vLLM, OpenAI, TGI's Messages API."""

    def __init__(self, endpoint: str, spec: GenerationSpec):
        from openai import AsyncOpenAI

        self.spec = spec
        base = endpoint.rstrip("/")
        self.client = AsyncOpenAI(
            base_url=base if base.endswith("/v1") else base + "/v1",
            api_key=os.environ.get("OPENAI_API_KEY", "not-needed"),
            timeout=spec.timeout_seconds,
            max_retries=0,  # retries are ours: one policy for every engine
        )

    async def complete(self, prompt: str) -> Completion:
        sampling = self.spec.sampling
        extra: dict[str, object] = {}
        if sampling.top_k is not None:
            extra["top_k"] = sampling.top_k
        if sampling.repetition_penalty is not None:
            extra["repetition_penalty"] = sampling.repetition_penalty
        try:
            reply = await self.client.chat.completions.create(
                model=self.spec.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=self.spec.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed,
                stop=sampling.stop or None,
                extra_body=extra or None,
            )
        except Exception as error:
            raise classify(error) from error
        with answer_checked():
            choice = reply.choices[0]
            usage = reply.usage
            completion = Completion(
                text=choice.message.content or "",
                model=str(reply.model),
                prompt_tokens=int(usage.prompt_tokens or 0) if usage else 0,
                completion_tokens=int(usage.completion_tokens or 0) if usage else 0,
                finish_reason=choice.finish_reason or "unknown",
            )
        return checked(completion)

    async def close(self) -> None:
        await self.client.close()


@contextlib.contextmanager
def answer_checked() -> Iterator[None]:
    """An answer that is not the API's shape (no choices, fields missing or null) is a bad
    answer: retried like a 5xx, then recorded, never left to crash the handler."""
    try:
        yield
    except (IndexError, KeyError, AttributeError, TypeError, ValueError) as error:
        raise InferenceError("bad_answer", f"{type(error).__name__}: {error}", transient=True) from error


def checked(completion: Completion) -> Completion:
    """No text and no tokens is not a document: a server hiccup worth another try, not a row."""
    if not completion.text.strip() and completion.completion_tokens == 0:
        raise InferenceError(
            "empty_completion", f"the server answered no text (finish: {completion.finish_reason})", True
        )
    return completion


def _bad_body(error: BaseException) -> bool:
    """A 200 whose body is not the API's JSON (an HTML page from a proxy, a truncated body)."""
    name = type(error).__name__
    module = type(error).__module__
    return (
        name in ("ContentTypeError", "JSONDecodeError")
        # pydantic names the model that failed: the answer's (ChatComplete), not our request's.
        or (
            name == "ValidationError"
            and module.startswith(("pydantic", "pydantic_core"))
            and "Request" not in str(getattr(error, "title", ""))
        )
        or (name == "APIResponseValidationError")
    )


def classify(error: BaseException) -> InferenceError:
    """Sort any client exception into a transient or permanent InferenceError."""
    if isinstance(error, InferenceError):
        return error
    name = type(error).__name__
    message = str(error) or name
    if _bad_body(error):
        return InferenceError("bad_answer", message[:500], transient=True)
    if isinstance(error, asyncio.TimeoutError | TimeoutError | httpx.TimeoutException) or "Timeout" in name:
        return InferenceError("timeout", message, transient=True)
    status = getattr(error, "status_code", None) or getattr(
        getattr(error, "response", None), "status_code", None
    )
    permanent_names = {
        "ValidationError",
        "BadRequestError",
        "NotFoundError",
        "NotSupportedError",
        "UnprocessableEntityError",
        "AuthenticationError",
        "PermissionDeniedError",
    }
    if name in permanent_names or (isinstance(status, int) and status in (400, 401, 403, 404, 413, 422)):
        kind = (
            "context_length"
            if "token" in message.lower() and "must be" in message.lower()
            else "invalid_request"
        )
        if name in ("NotFoundError",) or status == 404:
            kind = "not_found"
        return InferenceError(kind, message, transient=False)
    if name in ("OverloadedError", "RateLimitExceededError", "RateLimitError") or status == 429:
        return InferenceError("rate_limited", message, transient=True)
    if "Connect" in name or "Connection" in name or isinstance(error, OSError):
        return InferenceError("connection", message, transient=True)
    return InferenceError("server_error", message, transient=True)


def backend_for(spec: GenerationSpec, endpoint: str) -> Backend:
    if spec.engine in (Engine.tgi, Engine.embedded):
        return TGIBackend(endpoint, spec)
    return OpenAIBackend(endpoint, spec)


async def complete_with_retries(backend: Backend, prompt: str, attempts: int = 3) -> Completion:
    """Retry transient failures with exponential backoff and jitter inside one delivery."""
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.5, max=8),
        retry=retry_if_exception(lambda e: isinstance(e, InferenceError) and e.transient),
        reraise=True,
    ):
        with attempt:
            return await backend.complete(prompt)
    raise AssertionError("unreachable: tenacity reraises the last error")
