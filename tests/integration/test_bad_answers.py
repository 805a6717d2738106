"""Answers that are not completions: each is classified, retried, then recorded, never stranded.

A real HTTP server answers the chat API with 200s that are not what the API promises (no
choices, null usage, an HTML page, no text); both clients (TGI's and OpenAI's) must turn each
into a transient `InferenceError` of a named kind, and a worker must end such a prompt as a
failure row with that kind once its deliveries are used up.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from aiohttp import web

from conftest import small_run
from cosmoforge import queue
from cosmoforge.generation.inference import InferenceError, OpenAIBackend, TGIBackend
from cosmoforge.generation.worker import Worker, WorkerConfig
from cosmoforge.prompts.builder import build_prompts
from cosmoforge.queue import EmbeddedNats
from cosmoforge.spec.model import GenerationRun, GenerationSpec, parse_run
from cosmoforge.spec.validation import resolve_uri
from cosmoforge.storage import FAILURES, GENERATIONS, RunStore


def completion(content: Any, usage: Any) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "system_fingerprint": "t",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def answer(kind: str) -> web.Response:
    if kind == "no-choices":
        return web.json_response({**completion("x", USAGE), "choices": []})
    if kind == "null-usage":
        return web.json_response(completion("Some text.", None))
    if kind == "html":
        return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
    if kind == "empty":
        return web.json_response(completion("", {**USAGE, "completion_tokens": 0}))
    return web.json_response(completion("A fine answer.", USAGE))


@pytest.fixture
def odd_server() -> Iterator[str]:
    """`/<kind>/v1/chat/completions` answers that kind of answer."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    ready = threading.Event()

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return answer(request.match_info["kind"])

    def serve() -> None:
        async def main() -> None:
            app = web.Application()
            app.router.add_post("/{kind}/v1/chat/completions", chat)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.SockSite(runner, sock).start()
            ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())

    threading.Thread(target=serve, daemon=True).start()
    assert ready.wait(10)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"


SPEC = GenerationSpec(max_new_tokens=8, timeout_seconds=10)


@pytest.mark.parametrize("client", [TGIBackend, OpenAIBackend])
@pytest.mark.parametrize(
    ("kind", "error_kind"),
    [("no-choices", "bad_answer"), ("html", "bad_answer"), ("empty", "empty_completion")],
)
async def test_answers_that_are_not_completions_are_transient_errors_of_a_named_kind(
    odd_server: str, client: Any, kind: str, error_kind: str
) -> None:
    backend = client(f"{odd_server}/{kind}", SPEC)
    try:
        with pytest.raises(InferenceError) as caught:
            await backend.complete("hello")
    finally:
        await backend.close()
    assert caught.value.kind == error_kind and caught.value.transient


@pytest.mark.parametrize("client", [TGIBackend, OpenAIBackend])
async def test_null_usage_keeps_the_text_with_unknown_token_counts(odd_server: str, client: Any) -> None:
    backend = client(f"{odd_server}/null-usage", SPEC)
    try:
        result = await backend.complete("hello")
    finally:
        await backend.close()
    assert result.text == "Some text." and result.completion_tokens == 0


def _run() -> GenerationRun:
    document = small_run("odd", concurrency=2, maxAttempts=2, maxNewTokens=8, timeoutSeconds=10)
    for seed in document["spec"]["seeds"]:
        seed["uri"] = resolve_uri(seed["uri"])
    return parse_run(document)


def test_a_server_that_never_answers_properly_ends_in_failure_rows_not_stranded(
    tmp_path: Path, nats_server: EmbeddedNats, odd_server: str
) -> None:
    run = _run()
    prompts = list(build_prompts(run))[:4]
    store = RunStore.open(str(tmp_path), run.name)

    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        await queue.ensure_generation_queue(nc.jetstream(), run.name, run.spec.generation, 5.0)
        await queue.publish_all(nc, run.name, ((p.prompt_id, queue.encode(p.to_dict())) for p in prompts))
        config = WorkerConfig(nats_server.url, run.name, str(tmp_path), f"{odd_server}/no-choices",
                              run.spec.generation, worker_id="w", flush_seconds=0.3)  # fmt: skip
        worker = Worker(config)
        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(120):
                while await queue.remaining(nc.jetstream(), run.name):
                    await asyncio.sleep(0.3)
        finally:
            worker.stop()
            await task
            await nc.close()

    asyncio.run(scenario())
    failures = store.read_folder(FAILURES)
    assert failures is not None
    assert sorted(failures.column("prompt_id").to_pylist()) == sorted(p.prompt_id for p in prompts)
    assert set(failures.column("error_kind").to_pylist()) == {"bad_answer"}
    assert set(failures.column("attempts").to_pylist()) == {2}
    assert store.read_folder(GENERATIONS) is None
