"""A fast inference server with canned answers that speaks TGI's and OpenAI's HTTP APIs.

Throughput of the generation path is a property of the pipeline (queue, client, shard
writes), not of the model; measuring it against a real model on a CPU measures the model.
This server answers every request after a fixed, configurable latency with the same text, over
the same wire protocol as TGI (`/`, `/generate`, `/generate_stream`, `/info`, `/health`) and
vLLM (`/v1/chat/completions`, `/v1/models`), so the real clients run unchanged against it. Like
vLLM, it can refuse model names it does not serve, and it can answer 503 to every n-th request.

Run it with `python -m cosmoforge.fakeserver --port 8080 --latency 0.05`, or in a thread with
`FakeServer(...).start()` (tests); `GET /stats` returns the requests it received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

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


def chat_reply(behaviour: Behaviour, body: dict[str, Any]) -> dict[str, Any]:
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    tokens = min(behaviour.tokens, int(body.get("max_tokens") or behaviour.tokens))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": behaviour.model,
        "system_fingerprint": "cosmoforge-fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join([WORD] * tokens)},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": tokens,
            "total_tokens": prompt_tokens + tokens,
        },
    }


def generate_reply(behaviour: Behaviour, body: dict[str, Any]) -> dict[str, Any]:
    parameters = body.get("parameters") or {}
    tokens = min(behaviour.tokens, int(parameters.get("max_new_tokens") or behaviour.tokens))
    details = {"finish_reason": "length", "generated_tokens": tokens, "seed": parameters.get("seed")}
    return {"generated_text": " ".join([WORD] * tokens), "details": {**details, "prefill": [], "tokens": []}}


def create_app(behaviour: Behaviour) -> web.Application:
    async def generation(
        request: web.Request, kind: str
    ) -> tuple[dict[str, Any] | None, web.Response | None]:
        behaviour.requests[kind] += 1
        behaviour.last_at = time.time()
        behaviour.first_at = behaviour.first_at or behaviour.last_at
        number = sum(behaviour.requests[k] for k in ("chat", "generate"))
        body = await request.json()
        behaviour.track(+1)
        try:
            await asyncio.sleep(behaviour.latency)
        finally:
            behaviour.track(-1)
        if behaviour.fail_every and number % behaviour.fail_every == 0:
            return None, web.json_response({"error": "injected", "error_type": "overloaded"}, status=503)
        return body, None

    async def chat(request: web.Request) -> web.Response:
        body, failure = await generation(request, "chat")
        if failure is not None or body is None:
            return failure or web.Response(status=500)
        if behaviour.check_model and body.get("model") != behaviour.model:
            message = f"The model `{body.get('model')}` does not exist."
            error = {
                "object": "error",
                "message": message,
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            }
            return web.json_response(error, status=404)
        return web.json_response(chat_reply(behaviour, body))

    async def generate(request: web.Request) -> web.StreamResponse:
        body, failure = await generation(request, "generate")
        if failure is not None or body is None:
            return failure or web.Response(status=500)
        reply = generate_reply(behaviour, body)
        if request.path == "/generate_stream" or body.get("stream"):
            return await stream(request, reply)
        return web.json_response([reply] if request.path == "/" else reply)

    async def stream(request: web.Request, reply: dict[str, Any]) -> web.StreamResponse:
        """TGI's server-sent events: one event per token, the full text and details on the last."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        words = reply["generated_text"].split(" ")
        for index, word in enumerate(words):
            last = index == len(words) - 1
            token = {
                "id": index,
                "text": word if index == 0 else " " + word,
                "logprob": None,
                "special": False,
            }
            event = {
                "index": index,
                "token": token,
                "generated_text": reply["generated_text"] if last else None,
                "details": reply["details"] if last else None,
            }
            await response.write(f"data:{json.dumps(event)}\n\n".encode())
        await response.write_eof()
        return response

    async def info(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_id": behaviour.model,
                "max_input_tokens": 4095,
                "max_total_tokens": 4096,
                "version": "fake",
            }
        )

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": behaviour.model, "object": "model"}]})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stats(request: web.Request) -> web.Response:
        times = {"first_at": behaviour.first_at, "last_at": behaviour.last_at, "busy": behaviour.busy}
        return web.json_response({**behaviour.requests, **times})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/", generate)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate)
    app.router.add_get("/info", info)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    return app


class FakeServer:
    """The server on a loopback port in a background thread with its own event loop."""

    def __init__(self, behaviour: Behaviour | None = None, port: int = 0):
        self.behaviour = behaviour or Behaviour()
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(create_app(self.behaviour), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds before each answer")
    parser.add_argument("--tokens", type=int, default=16, help="words in each canned answer")
    parser.add_argument("--model", default=Behaviour.model)
    parser.add_argument("--check-model", action="store_true", help="404 for other model names, like vLLM")
    parser.add_argument("--fail-every", type=int, default=0, help="answer 503 to every n-th request")
    args = parser.parse_args(argv)
    behaviour = Behaviour(args.model, args.latency, args.tokens, args.check_model, args.fail_every)
    web.run_app(create_app(behaviour), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
