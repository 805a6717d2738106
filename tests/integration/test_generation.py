"""Generator workers under faults: every prompt ends up generated exactly once.

Everything here is real: nats-server with JetStream file storage, worker processes, the
embedded model over HTTP; faults come from a proxy that fails and stalls requests, from
kill -9 and from restarting nats-server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import nats
import pytest
from nats.js.errors import NotFoundError

from conftest import COSMO, small_run
from cosmoforge import queue
from cosmoforge.generation.compact import compact, read_dataset
from cosmoforge.generation.worker import Worker, WorkerConfig
from cosmoforge.prompts.builder import Prompt, build_prompts
from cosmoforge.queue import EmbeddedNats
from cosmoforge.spec.model import GenerationRun, dump_run, parse_run
from cosmoforge.spec.validation import resolve_uri
from cosmoforge.storage import FAILURES, GENERATIONS, RunStore
from faults import Faults, FaultyProxy


def _run(name: str, **generation: object) -> GenerationRun:
    document = small_run(name, **generation)
    for seed in document["spec"]["seeds"]:
        seed["uri"] = resolve_uri(seed["uri"])
    return parse_run(document)


async def _enqueue(url: str, run: GenerationRun, prompts: list[Prompt], ack_wait: float = 3.0) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await queue.ensure_generation_queue(js, run.name, run.spec.generation, ack_wait)
    await queue.publish_all(nc, run.name, ((p.prompt_id, queue.encode(p.to_dict())) for p in prompts))
    await nc.close()


async def _remaining(url: str, run: str) -> int:
    nc = await nats.connect(url)
    try:
        return await queue.remaining(nc.jetstream(), run)
    finally:
        await nc.close()


async def _drain(url: str, run: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while await _remaining(url, run):
        assert time.monotonic() < deadline, "queue not drained in time"
        await asyncio.sleep(0.3)


async def _work(
    url: str, run: GenerationRun, out: Path, endpoint: str, prompts: list[Prompt], timeout: float
) -> None:
    """Enqueue the prompts, let one in-process worker drain the queue, stop it."""
    await _enqueue(url, run, prompts)
    config = WorkerConfig(
        url, run.name, str(out), endpoint, run.spec.generation, worker_id="w", flush_seconds=0.3
    )
    worker = Worker(config)
    task = asyncio.create_task(worker.run())
    await _drain(url, run.name, timeout=timeout)
    worker.stop()
    await task


def _assert_exactly_once(store: RunStore, prompts: list[Prompt], keep: set[str] | None = None) -> None:
    result = compact(store)
    table = read_dataset(store)
    assert table is not None
    ids = table.column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == result.rows
    assert set(ids) == {p.prompt_id for p in prompts}
    assert all(text.strip() for text in table.column("text").to_pylist())


def test_5xx_and_hanging_requests_are_retried_to_exactly_once(
    tmp_path: Path, nats_server: EmbeddedNats, model_server: str
) -> None:
    run = _run("faults", timeoutSeconds=10, maxNewTokens=6, concurrency=2)
    prompts = list(build_prompts(run))
    store = RunStore.open(str(tmp_path), run.name)
    faults = Faults(fail_every=3, hang_every=7, hang_seconds=12)

    async def scenario() -> None:
        await _enqueue(nats_server.url, run, prompts)
        with FaultyProxy(model_server, faults) as proxy:
            config = WorkerConfig(nats_server.url, run.name, str(tmp_path), proxy.url, run.spec.generation,
                                  worker_id="w", flush_seconds=0.5)  # fmt: skip
            worker = Worker(config)
            task = asyncio.create_task(worker.run())
            await _drain(nats_server.url, run.name, timeout=120)
            worker.stop()
            await task

    asyncio.run(scenario())
    assert faults.requests > len(prompts)  # failures really happened and were retried
    assert faults.requests // 3 >= 3
    _assert_exactly_once(store, prompts)
    assert store.read_folder(FAILURES) is None


def test_worker_killed_mid_shard_and_nats_restart_lose_nothing(tmp_path: Path, model_server: str) -> None:
    run = _run("chaos", maxNewTokens=24, concurrency=2, shardSize=4)
    prompts = list(build_prompts(run))
    store = RunStore.open(str(tmp_path / "out"), run.name)
    store.write_text("spec.yaml", dump_run(run))
    server = EmbeddedNats(store_dir=str(tmp_path / "js")).start()
    command = [*COSMO, "worker", "--nats", server.url,
               "--out", str(tmp_path / "out"), "--run", run.name, "--endpoint", model_server]  # fmt: skip
    try:
        asyncio.run(_enqueue(server.url, run, prompts))
        first = subprocess.Popen([*command, "--worker-id", "doomed"])
        deadline = time.monotonic() + 60
        while not store.list_parquet(GENERATIONS):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)  # let it get some prompts in flight past the first shard
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        left = asyncio.run(_remaining(server.url, run.name))
        assert 0 < left < len(prompts)

        # Restart the queue itself: file storage keeps what is not yet acked.
        server.stop()
        server.start()
        second = subprocess.Popen([*command, "--worker-id", "survivor"])
        try:
            asyncio.run(_drain(server.url, run.name, timeout=120))
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=30) == 0
    finally:
        server.close()
    _assert_exactly_once(store, prompts)
    workers = set(read_dataset(store).column("worker").to_pylist())
    assert workers == {"doomed", "survivor"}


def test_permanent_failures_are_recorded_not_dropped(
    tmp_path: Path, nats_server: EmbeddedNats, model_server: str
) -> None:
    run = _run("toolong", maxNewTokens=4)
    prompts = list(build_prompts(run))[:3]
    huge = Prompt(**{**prompts[0].to_dict(), "prompt_id": "huge", "prompt": "word " * 3000})
    store = RunStore.open(str(tmp_path), run.name)

    asyncio.run(_work(nats_server.url, run, tmp_path, model_server, [*prompts, huge], timeout=60))
    result = compact(store)
    assert result.rows == 3 and result.failures == 1
    failures = store.read_folder("failed.parquet")
    assert failures is not None
    row = failures.to_pylist()[0]
    assert row["prompt_id"] == "huge" and row["error_kind"] == "context_length" and row["attempts"] == 1


def test_unreachable_endpoint_fails_each_prompt_after_max_attempts(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    run = _run("unreachable", maxAttempts=2, timeoutSeconds=1)
    prompts = list(build_prompts(run))[:2]
    store = RunStore.open(str(tmp_path), run.name)
    dead = f"http://127.0.0.1:{queue.free_port()}"

    asyncio.run(_work(nats_server.url, run, tmp_path, dead, prompts, timeout=90))
    result = compact(store)
    assert result.rows == 0 and result.failures == 2
    kinds = set(store.read_folder("failed.parquet").column("error_kind").to_pylist())
    assert kinds == {"connection"}


@pytest.mark.parametrize("duplicates", [1, 3])
def test_compaction_keeps_the_earliest_completion_of_each_prompt(tmp_path: Path, duplicates: int) -> None:
    import datetime as dt

    import pyarrow as pa

    from cosmoforge.spec import records

    store = RunStore.open(str(tmp_path), "c")
    base = {name: "x" for name in records.PROMPTS.names}
    for copy in range(duplicates):
        rows = [
            {**base, "prompt_id": f"p{i}", "text": f"copy {copy}", "completion_tokens": 1,
             "finished_at": dt.datetime(2026, 1, 1, 0, 0, copy, tzinfo=dt.UTC)}
            for i in range(5)
        ]  # fmt: skip
        store.write_table(
            f"{GENERATIONS}/shard-{copy}.parquet", pa.Table.from_pylist(rows, schema=records.GENERATIONS)
        )
    result = compact(store)
    assert result.rows == 5 and result.duplicates_dropped == 5 * (duplicates - 1)
    assert set(read_dataset(store).column("text").to_pylist()) == {"copy 0"}


def test_a_worker_waits_for_the_consumer_and_never_creates_it(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    # JetStream keeps the settings of whoever creates the consumer first: a worker starting before
    # the dispatcher (or the operator) must not be that one, with the server's default limits.
    run = _run("early")
    dead = f"http://127.0.0.1:{queue.free_port()}"

    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await queue.ensure_stream(js, run.name)
        config = WorkerConfig(
            nats_server.url, run.name, str(tmp_path), dead, run.spec.generation, worker_id="w"
        )
        worker = Worker(config)
        task = asyncio.create_task(worker.run())
        try:
            await asyncio.sleep(2.0)
            with pytest.raises(NotFoundError):
                await js.consumer_info(queue.stream_name(run.name), queue.CONSUMER)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
            await nc.close()

    asyncio.run(scenario())


def test_workers_wait_for_nats_but_a_stop_ends_the_wait(nats_server: EmbeddedNats) -> None:
    # Pods may start before NATS: connecting retries until it answers, unless the pod is told
    # to stop first (a rollout), which both worker kinds honour through this one function.
    async def scenario() -> None:
        stopping = asyncio.Event()
        waiting = asyncio.ensure_future(queue.connect_unless_stopped("nats://127.0.0.1:9", stopping))
        await asyncio.sleep(1.0)  # it keeps trying meanwhile
        assert not waiting.done()
        stopping.set()
        assert await asyncio.wait_for(waiting, timeout=30) is None
        nc = await queue.connect_unless_stopped(nats_server.url, asyncio.Event())
        assert nc is not None and nc.is_connected
        await nc.close()

    asyncio.run(scenario())
