"""`cosmo run` drives generation with the dispatcher's RunManager, in-process.

Real nats-server, real worker processes; the canned fake server stands in for the model, since
what is tested is how the run is driven, not what is generated.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from rich.console import Console

from conftest import small_run, write_spec
from cosmoforge import queue
from cosmoforge.cli.embedded import RunSummary, run_embedded
from cosmoforge.generation.compact import read_dataset
from cosmoforge.prompts.builder import Prompt, build_prompts
from cosmoforge.queue import EmbeddedNats, consumer_limits, free_port
from cosmoforge.services.modelserver.canned import Behaviour, FakeServer
from cosmoforge.spec.model import GenerationRun
from cosmoforge.spec.validation import load_file
from cosmoforge.storage import RunStore


@pytest.fixture(scope="module")
def fake_model() -> Iterator[str]:
    with FakeServer() as server:
        yield server.url


def _load(tmp_path: Path, name: str, **generation: object) -> GenerationRun:
    return load_file(write_spec(tmp_path / f"{name}.yaml", small_run(name, **generation)))


def _run(run: GenerationRun, out: Path, nats_url: str | None = None) -> tuple[RunSummary, str, float]:
    text = io.StringIO()
    started = time.monotonic()
    summary = run_embedded(run, str(out), Console(file=text, width=200), nats_url=nats_url)
    return summary, text.getvalue(), time.monotonic() - started


async def _die_on_every_delivery(url: str, run: GenerationRun, prompt: Prompt) -> None:
    """A prompt queued by an earlier attempt whose every delivery timed out unacknowledged, as
    when each worker that took it died: the stream keeps it, but no worker will get it again.

    The consumer has a short ack wait so that this takes seconds; the run keeps that consumer."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await queue.ensure_stream(js, run.name)
        limits = consumer_limits(run.spec.generation, ack_wait=1.0)
        await queue.ensure_consumer(js, run.name, limits.ack_wait, limits.max_deliver, limits.max_ack_pending)
        payload = queue.encode(prompt.to_dict())
        await js.publish(queue.prompts_subject(run.name), payload, headers={"Nats-Msg-Id": prompt.prompt_id})
        pull = await js.pull_subscribe(
            queue.prompts_subject(run.name), durable=queue.CONSUMER, stream=queue.stream_name(run.name)
        )
        for _ in range(limits.max_deliver):
            await pull.fetch(1, timeout=10)
        await asyncio.sleep(limits.ack_wait + 0.5)  # the last delivery times out as well
        state = await queue.read_state(js, run.name)
        assert (state.stored, state.waiting) == (1, 0)
    finally:
        await nc.close()


def test_a_prompt_whose_deliveries_are_used_up_ends_the_run_instead_of_hanging(
    tmp_path: Path, nats_server: EmbeddedNats, fake_model: str
) -> None:
    run = _load(tmp_path, "stuck", engine="tgi", endpoint=fake_model, maxAttempts=1)
    stuck = next(build_prompts(run))
    asyncio.run(_die_on_every_delivery(nats_server.url, run, stuck))

    summary, output, _ = _run(run, tmp_path / "out", nats_server.url)

    # The prompt never leaves the stream (a loop waiting for an empty queue waits forever); the
    # run ends anyway and says what is missing.
    assert summary.phase == "Failed" and not summary.succeeded
    assert "1 of 10 prompts have neither a completion nor a recorded failure" in summary.message
    assert summary.message in " ".join(output.split())
    assert (summary.prompts, summary.published, summary.generated, summary.failed) == (10, 9, 9, 0)
    dataset = read_dataset(RunStore.open(str(tmp_path / "out"), "stuck"))
    assert dataset is not None and dataset.num_rows == 9
    assert stuck.prompt_id not in dataset.column("prompt_id").to_pylist()


def test_a_finished_run_resumes_in_about_a_second_without_the_model(tmp_path: Path, fake_model: str) -> None:
    out = tmp_path / "out"
    first, output, _ = _run(_load(tmp_path, "again", engine="tgi", endpoint=fake_model), out)
    assert first.succeeded and (first.prompts, first.generated, first.already_done) == (10, 10, 0)
    assert first.dataset is not None and first.dataset.models == ["fake/canned-model"]
    assert first.tokens > 0 and first.seconds > 0
    dataset = read_dataset(RunStore.open(str(out), "again"))
    assert dataset is not None

    # Without an endpoint, generating anything would start the embedded model.
    second, output, seconds = _run(_load(tmp_path, "again"), out)
    assert "nothing to generate" in output and "starting the embedded model" not in output
    assert second.succeeded and (second.already_done, second.published, second.generated) == (10, 0, 0)
    assert seconds < 5, f"a finished run took {seconds:.1f}s to resume"
    again = read_dataset(RunStore.open(str(out), "again"))
    assert again is not None and again.sort_by("prompt_id").equals(dataset.sort_by("prompt_id"))


def test_cosmo_run_ui_serves_the_runs_page_while_it_generates(tmp_path: Path) -> None:
    """`cosmo run --ui`: the same page as the dispatcher's, live, from the in-process manager."""
    port = free_port()
    pages: list[str] = []
    with FakeServer(Behaviour(latency=0.5)) as slow:  # 10 prompts, 4 at a time: a few seconds
        run = _load(tmp_path, "paged", engine="tgi", endpoint=slow.url, concurrency=4)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            text = io.StringIO()
            running = pool.submit(run_embedded, run, str(tmp_path / "out"), Console(file=text), None, port)
            deadline = time.monotonic() + 60
            while not pages and not running.done() and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    answer = httpx.get(f"http://127.0.0.1:{port}/runs/paged", timeout=5)
                    if answer.status_code == 200:
                        pages.append(answer.text)
                time.sleep(0.2)
            summary = running.result(timeout=120)
    assert summary.succeeded
    assert f"run page: http://127.0.0.1:{port}/runs/paged" in text.getvalue()
    assert pages and 'id="run-data"' in pages[0] and 'http-equiv="refresh"' in pages[0]
