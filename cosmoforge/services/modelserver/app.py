"""The HTTP server: TGI's and OpenAI's routes over any `Engine`.

Routes translate and nothing else: a request body becomes a `Job` (`api.py`), the engine runs
it, and the answer goes back as JSON or as server-sent events in the API's own format. Errors
are mapped to statuses in one function, `status_for`, so a malformed request is a 4xx whatever
the engine behind it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from cosmoforge.services.modelserver import api
from cosmoforge.services.modelserver.engine import (
    Collected,
    Engine,
    Generation,
    InvalidRequest,
    Overloaded,
    Refused,
    UnknownModel,
    collect,
    streamed,
)

VALIDATION = "Input validation error"


def status_for(error: Refused) -> int:
    if isinstance(error, InvalidRequest):
        return 422
    if isinstance(error, UnknownModel):
        return 404
    if isinstance(error, Overloaded):
        return 503
    return 400


def error_body(error: Refused) -> dict[str, Any]:
    status = status_for(error)
    if status == 404:  # vLLM's shape, which the openai client turns into NotFoundError
        return {"object": "error", "message": str(error), "type": "NotFoundError", "param": None, "code": 404}
    kind = {422: "validation", 503: "overloaded"}.get(status, "invalid_request")
    message = str(error)
    if status == 422 and not message.startswith(VALIDATION):
        message = f"{VALIDATION}: {message}"  # TGI's prefix, which clients match on
    return {"error": message, "error_type": kind}


def create_app(engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(title="cosmoforge model server", docs_url=None, redoc_url=None, lifespan=lifespan)
    model = engine.info.model_id

    @app.exception_handler(Refused)
    async def refused(_: Request, error: Refused) -> JSONResponse:
        return JSONResponse(error_body(error), status_code=status_for(error))

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, error: RequestValidationError) -> JSONResponse:
        # TGI's shape for a body it cannot read, rather than FastAPI's `detail` list.
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        body = {"error": f"{VALIDATION}: {problems}", "error_type": "validation"}
        return JSONResponse(body, status_code=422)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return api.tgi_info(engine.info)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "cosmoforge"}]}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return engine.stats()

    @app.post("/generate", response_model=None)
    async def generate(body: api.TGIRequest) -> dict[str, Any]:
        return api.tgi_answer(await collect(await engine.submit(api.tgi_job(body))))

    @app.post("/generate_stream", response_model=None)
    async def generate_stream(body: api.TGIRequest) -> StreamingResponse:
        return sse(tgi_events(await engine.submit(api.tgi_job(body))))

    @app.post("/", response_model=None)
    async def compat(body: api.TGIRequest) -> Any:
        generation = await engine.submit(api.tgi_job(body))
        if body.stream:
            return sse(tgi_events(generation))
        return [api.tgi_answer(await collect(generation))]

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: api.ChatRequest) -> Any:
        generation = await engine.submit(api.chat_job(body))
        if body.stream:
            return sse(chat_events(generation, model, body.include_usage), done=True)
        return api.chat_answer(await collect(generation), model)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: api.CompletionRequest) -> Any:
        jobs = api.completion_jobs(body)
        if body.stream:
            if len(jobs) > 1:
                raise InvalidRequest("streaming takes one prompt, not a list")
            generation = await engine.submit(jobs[0])
            return sse(completion_events(generation, model, body.include_usage), done=True)
        generations = await asyncio.gather(*(engine.submit(job) for job in jobs))
        results = await asyncio.gather(*(collect(g) for g in generations))
        return api.completion_answer(list(results), model)

    return app


def sse(events: AsyncIterator[dict[str, Any]], done: bool = False) -> StreamingResponse:
    """Server-sent events; OpenAI's streams end with `[DONE]`, TGI's with the last event."""

    async def lines() -> AsyncIterator[bytes]:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n".encode()
        if done:
            yield b"data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


async def tgi_events(generation: Generation) -> AsyncIterator[dict[str, Any]]:
    index = 0
    async for item in streamed(generation):
        if isinstance(item, Collected):
            yield api.tgi_last_event(index, item)
        else:
            yield api.tgi_token_event(index, item)
            index += 1


async def chat_events(
    generation: Generation, model: str, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    stream_id = api.new_id("chatcmpl")
    yield api.chat_chunk(stream_id, model, {"role": "assistant", "content": ""})
    async for item in streamed(generation):
        if isinstance(item, Collected):
            yield api.chat_chunk(stream_id, model, {}, item.finish_reason)
            if include_usage:
                yield api.usage_chunk(stream_id, "chat.completion.chunk", model, item)
        elif item:
            yield api.chat_chunk(stream_id, model, {"content": item})


async def completion_events(
    generation: Generation, model: str, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    stream_id = api.new_id("cmpl")
    async for item in streamed(generation):
        if isinstance(item, Collected):
            yield api.completion_chunk(stream_id, model, "", item.finish_reason)
            if include_usage:
                yield api.usage_chunk(stream_id, "text_completion", model, item)
        elif item:
            yield api.completion_chunk(stream_id, model, item)
