"""A generator worker with adaptive in-flight requests, against a server that exports its load.

Real nats-server and a real HTTP server speaking TGI's Messages API with a vLLM-style
`/metrics`: the server batches up to CAPACITY requests and queues the rest, like an engine whose
batch is full. The worker starts at 2 in flight with room up to 64; it must find the server's
capacity (plus a small queue) by itself, answer the autoscaler's load request, and still write
every prompt exactly once.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from aiohttp import web

from conftest import small_run
from cosmoforge import queue
from cosmoforge.generation.compact import compact, read_dataset
from cosmoforge.generation.load import gather
from cosmoforge.generation.worker import Worker, WorkerConfig
from cosmoforge.prompts.builder import build_prompts
from cosmoforge.queue import EmbeddedNats
from cosmoforge.spec.model import GenerationRun, parse_run
from cosmoforge.spec.validation import resolve_uri
from cosmoforge.storage import RunStore

CAPACITY = 6


class BatchingServer:
    """Answers after 0.3 s of batch time; more than CAPACITY requests wait their turn."""

    def __init__(self) -> None:
        self.active = 0
        self.most = 0
        self.slots: asyncio.Semaphore | None = None
        self.port = 0
        self.ready = threading.Event()

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.Response:
            body = await request.json()
            assert self.slots is not None
            self.active += 1
            self.most = max(self.most, self.active)
            try:
                async with self.slots:
                    await asyncio.sleep(0.3)
            finally:
                self.active -= 1
            text = f"An answer to: {body['messages'][0]['content'][:40]}"
            return web.json_response(
                {
                    "id": "",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "batching",
                    "system_fingerprint": "test",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18},
                }
            )

        async def metrics(_: web.Request) -> web.Response:
            running = min(self.active, CAPACITY)
            text = (
                "# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="batching"}} {running}\n'
                "# TYPE vllm:num_requests_waiting gauge\n"
                f'vllm:num_requests_waiting{{model_name="batching"}} {self.active - running}\n'
            )
            return web.Response(text=text, content_type="text/plain")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/metrics", metrics)
        return app

    def serve(self, sock: socket.socket) -> None:
        async def main() -> None:
            self.slots = asyncio.Semaphore(CAPACITY)
            runner = web.AppRunner(self.app(), access_log=None)
            await runner.setup()
            await web.SockSite(runner, sock).start()
            self.ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())


@pytest.fixture
def batching_server() -> Iterator[tuple[str, BatchingServer]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = BatchingServer()
    threading.Thread(target=server.serve, args=(sock,), daemon=True).start()
    assert server.ready.wait(10)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", server


def _run() -> GenerationRun:
    document = small_run(
        "adaptive", concurrency=2, adaptiveConcurrency={"enabled": True, "min": 1, "max": 64}, maxNewTokens=8
    )
    for seed in document["spec"]["seeds"]:
        seed["uri"] = resolve_uri(seed["uri"])
    return parse_run(document)


def test_the_worker_finds_the_servers_capacity_and_keeps_exactly_once(
    tmp_path: Path, nats_server: EmbeddedNats, batching_server: tuple[str, BatchingServer]
) -> None:
    endpoint, server = batching_server
    run = _run()
    prompts = list(build_prompts(run))
    store = RunStore.open(str(tmp_path), run.name)
    # Enough work for the limit to settle: every prompt ten times under distinct ids.
    records = [{**p.to_dict(), "prompt_id": f"{p.prompt_id}-{copy}"} for copy in range(10) for p in prompts]

    async def scenario() -> tuple[list[int], list[bool]]:
        nc = await nats.connect(nats_server.url)
        await queue.ensure_generation_queue(nc.jetstream(), run.name, run.spec.generation, 10.0)
        await queue.publish_all(nc, run.name, ((r["prompt_id"], queue.encode(r)) for r in records))
        config = WorkerConfig(nats_server.url, run.name, str(tmp_path), endpoint, run.spec.generation,
                              worker_id="w", flush_seconds=0.3)  # fmt: skip
        worker = Worker(config)
        task = asyncio.create_task(worker.run())
        limits: list[int] = []
        saturated: list[bool] = []
        try:
            async with asyncio.timeout(180):
                while await queue.remaining(nc.jetstream(), run.name):
                    limits.append(worker.concurrency)
                    for load in await gather(nc, run.name, wait=0.2):
                        saturated.append(load.saturated)
        finally:
            worker.stop()
            await task
            await nc.close()
        return limits, saturated

    limits, saturated = asyncio.run(scenario())
    # It grew from 2 past the server's batch, and stopped near "batch + small queue", far from 64.
    assert max(limits) > CAPACITY
    assert limits[-1] <= CAPACITY + 8
    assert server.most <= 20
    assert any(saturated)  # the autoscaler heard that the server was full
    compact(store)
    table = read_dataset(store)
    assert table is not None
    ids = table.column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(records)
