"""A fault-injecting HTTP proxy in front of a real inference server.

It forwards requests unchanged, except that it answers 503 to a chosen share of them and lets
others hang past the client's timeout: the failures a fleet of TGI servers really produces.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response

from cosmoforge.queue import free_port


@dataclass
class Faults:
    fail_every: int = 0  # every n-th request answers 503 (0: never)
    hang_every: int = 0  # every n-th request hangs for `hang_seconds` (0: never)
    hang_seconds: float = 10.0
    requests: int = 0
    forwarded: int = 0
    prompts: list[str] = field(default_factory=list)


class FaultyProxy:
    def __init__(self, upstream: str, faults: Faults):
        self.upstream, self.faults, self.port = upstream, faults, free_port()
        app = FastAPI()
        client = httpx.AsyncClient(base_url=upstream, timeout=120)

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def forward(path: str, request: Request) -> Response:
            faults.requests += 1
            number = faults.requests
            if faults.fail_every and number % faults.fail_every == 0:
                return Response('{"error":"injected"}', status_code=503, media_type="application/json")
            if faults.hang_every and number % faults.hang_every == 0:
                await asyncio.sleep(faults.hang_seconds)
            body = await request.body()
            upstream_reply = await client.request(
                request.method, f"/{path}", content=body, headers={"content-type": "application/json"}
            )
            faults.forwarded += 1
            if path.endswith("chat/completions") and upstream_reply.status_code == 200:
                faults.prompts.append(body.decode())
            return Response(
                upstream_reply.content,
                status_code=upstream_reply.status_code,
                media_type=upstream_reply.headers.get("content-type"),
            )

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
