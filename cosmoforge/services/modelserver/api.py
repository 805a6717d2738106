"""TGI's and OpenAI's request and response bodies, and how each maps onto one `Job`.

Pure: pydantic models that refuse malformed requests (a 422 from FastAPI, never a 500 from
deep inside an engine), functions from a request to a `Job`, and from a finished answer to the
JSON each API returns. The routes in `app.py` only glue these to an engine.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cosmoforge.services.modelserver.engine import Collected, EngineInfo, FinishReason, Job, SamplingParams
from cosmoforge.services.modelserver.grammar import schema_from_grammar, schema_from_response_format

# --- TGI ------------------------------------------------------------------------------------------


class TGIParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_new_tokens: int = Field(default=20, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = Field(default=None, ge=0)
    stop: list[str] = Field(default_factory=list)
    details: bool = True
    grammar: dict[str, Any] | None = None


class TGIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(min_length=1)
    parameters: TGIParameters = TGIParameters()
    stream: bool = False


def tgi_job(body: TGIRequest) -> Job:
    p = body.parameters
    params = SamplingParams(
        max_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        repetition_penalty=p.repetition_penalty,
        seed=p.seed,
        stop=tuple(p.stop),
        do_sample=p.do_sample or (p.temperature is not None and p.temperature > 0),
    )
    # TGI refuses a prompt that leaves no room for max_new_tokens; it does not shorten the answer.
    return Job(params, prompt=body.inputs, schema=schema_from_grammar(p.grammar), strict_context=True)


def tgi_info(info: EngineInfo) -> dict[str, Any]:
    return {
        "model_id": info.model_id,
        "model_sha": None,
        "model_dtype": info.dtype,
        "model_device_type": info.device,
        "max_input_tokens": info.max_total_tokens - 1,
        "max_total_tokens": info.max_total_tokens,
        "max_concurrent_requests": info.max_concurrent_requests,
        "router": "cosmoforge",
        "version": info.version,
    }


def tgi_finish(reason: FinishReason) -> str:
    return "length" if reason == "length" else "eos_token"


def tgi_answer(result: Collected) -> dict[str, Any]:
    details = {
        "finish_reason": tgi_finish(result.finish_reason),
        "generated_tokens": result.completion_tokens,
        "seed": result.seed,
        "prefill": [],
        "tokens": [],
    }
    return {"generated_text": result.text, "details": details}


def tgi_token_event(index: int, text: str) -> dict[str, Any]:
    token = {"id": index, "text": text, "logprob": None, "special": False}
    return {"index": index, "token": token, "generated_text": None, "details": None}


def tgi_last_event(index: int, result: Collected) -> dict[str, Any]:
    """The closing event: an empty special token carrying the whole text and the details."""
    details = {
        "finish_reason": tgi_finish(result.finish_reason),
        "generated_tokens": result.completion_tokens,
        "seed": result.seed,
    }
    token = {"id": index, "text": "", "logprob": None, "special": True}
    return {"index": index, "token": token, "generated_text": result.text, "details": details}


# --- OpenAI (and vLLM, and TGI's Messages API) ----------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = Field(default=None, gt=0)  # vLLM's extension
    response_format: dict[str, Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature if self.temperature is not None else 1.0,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(stop),
            repetition_penalty=self.repetition_penalty,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] = Field(min_length=1)


def chat_job(body: ChatRequest) -> Job:
    return Job(
        body.sampling(body.max_completion_tokens or body.max_tokens or 256),
        messages=tuple(m.for_template() for m in body.messages),
        schema=schema_from_response_format(body.response_format),
        model=body.model or "",  # named, if only by omission: TGI's routes leave it None
    )


def completion_jobs(body: CompletionRequest) -> list[Job]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    params = body.sampling(body.max_tokens or 16)  # OpenAI's default for text completions
    schema = schema_from_response_format(body.response_format)
    return [Job(params, prompt=prompt, schema=schema, model=body.model or "") for prompt in prompts]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(results: list[Collected]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_answer(result: Collected, model: str) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": result.text},
        "logprobs": None,
        "finish_reason": result.finish_reason,
    }
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "cosmoforge",
        "choices": [choice],
        "usage": usage([result]),
    }


def completion_answer(results: list[Collected], model: str) -> dict[str, Any]:
    choices = [
        {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
        for i, r in enumerate(results)
    ]
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "cosmoforge",
        "choices": choices,
        "usage": usage(results),
    }


def chat_chunk(
    stream_id: str, model: str, delta: dict[str, Any], finish: FinishReason | None = None
) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return _chunk(stream_id, "chat.completion.chunk", model, [choice])


def completion_chunk(
    stream_id: str, model: str, text: str, finish: FinishReason | None = None
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return _chunk(stream_id, "text_completion", model, [choice])


def usage_chunk(stream_id: str, kind: str, model: str, result: Collected) -> dict[str, Any]:
    return {**_chunk(stream_id, kind, model, []), "usage": usage([result])}


def _chunk(stream_id: str, kind: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": stream_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "cosmoforge",
        "choices": choices,
    }
