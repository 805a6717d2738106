"""Observability of the generation path: Prometheus metrics of the dispatcher and a worker,
JSON logs, and a run whose failures (a prompt past the model's context, injected 503s) show up
in the status, the failure table and the counters alike. Real processes throughout: the
dispatcher and the worker are `cosmo` commands, the model is the embedded one behind the
fault-injecting proxy.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import small_run
from cosmoforge import logs
from cosmoforge.generation import metrics
from cosmoforge.generation.compact import FAILED_TABLE, read_dataset
from cosmoforge.queue import EmbeddedNats, free_port
from cosmoforge.services.dispatcher.client import DispatcherClient
from cosmoforge.storage import RunStore
from faults import Faults, FaultyProxy
from processes import final_status, metric, scrape, services, until

RUN = "observed"


def _document(out: Path, huge_seed: Path) -> dict[str, Any]:
    document = small_run(RUN, maxNewTokens=4, concurrency=2, shardSize=2, timeoutSeconds=30)
    math = document["spec"]["seeds"][1]
    huge = {"name": "huge", "kind": "web", "uri": str(huge_seed), "idField": "id"}
    document["spec"]["seeds"] = [math, huge]
    document["spec"]["prompts"]["maxSeedChars"] = 20_000  # let the huge seed through whole
    document["spec"]["output"] = {"uri": str(out)}
    return document


def test_metrics_logs_and_failures_agree(
    tmp_path: Path, nats_server: EmbeddedNats, model_server: str
) -> None:
    huge_seed = tmp_path / "huge.jsonl"
    huge_seed.write_text(json.dumps({"id": "huge", "text": "words " * 4000}) + "\n")
    out = tmp_path / "out"
    document = _document(out, huge_seed)
    faults = Faults(fail_every=3)
    worker_port = free_port()

    async def scenario(target: str, start_worker: Any, dispatcher_port: int) -> dict[str, Any]:
        async with DispatcherClient(target) as client:
            await client.start_run(yaml.safe_dump(document))

            async def depth() -> bool:
                return metric(scrape(dispatcher_port), "cosmoforge_queue_depth", run=RUN) == 5

            await until(depth, 60, what="queue depth 5 on /metrics")
            start_worker()
            return await final_status(client, RUN, timeout=120)

    with services(tmp_path) as processes, FaultyProxy(model_server, faults) as proxy:
        dispatcher = processes.dispatcher(nats_server.url, 0, "--log-format", "json", metrics=True)
        worker_args = ("--metrics-port", str(worker_port), "--log-format", "json")
        status = asyncio.run(
            scenario(
                dispatcher.target,
                lambda: processes.worker(nats_server.url, out, RUN, proxy.url, "w", *worker_args),
                dispatcher.metrics_port,
            )
        )
        # The worker updates its counters right after the acks the dispatcher waited for.
        deadline = time.monotonic() + 10
        while metric(worker := scrape(worker_port), "cosmoforge_prompts_generated_total", run=RUN) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        served = scrape(dispatcher.metrics_port)
        dispatcher_log = dispatcher.output()

    # The status, the failure table and the dataset tell the same story.
    assert status["phase"] == "Succeeded", status
    assert (status["prompts"], status["generated"], status["failed"]) == (5, 4, 1)
    assert status["errors"] == {"context_length": 1} and "context_length x1" in status["message"]
    store = RunStore.open(str(out), RUN)
    failed = store.read_folder(FAILED_TABLE)
    assert failed is not None and failed.column("error_kind").to_pylist() == ["context_length"]
    dataset = read_dataset(store)
    assert dataset is not None and dataset.num_rows == 4
    tokens = sum(dataset.column("completion_tokens").to_pylist())

    # The worker's view: every request timed, every error counted by kind.
    assert metric(worker, "cosmoforge_prompts_failed_total", run=RUN, kind="context_length") == 1
    assert metric(worker, "cosmoforge_generated_tokens_total", run=RUN) == tokens > 0
    assert metric(worker, "cosmoforge_request_seconds_count", run=RUN, outcome="ok") == 4
    refused = faults.requests - faults.forwarded  # the 503s the proxy injected
    assert refused >= 1
    assert metric(worker, "cosmoforge_request_errors_total", run=RUN) == refused + 1
    assert metric(worker, "cosmoforge_request_errors_total", run=RUN, kind="context_length") == 1
    assert metric(worker, "cosmoforge_requests_in_flight", run=RUN) == 0
    assert metric(worker, "cosmoforge_tokens_per_second", run=RUN) > 0

    # The dispatcher's view of the whole run.
    assert metric(served, "cosmoforge_run_prompts", run=RUN) == 5
    assert metric(served, "cosmoforge_run_prompts_done", run=RUN) == 4
    assert metric(served, "cosmoforge_run_prompts_failed", run=RUN) == 1
    assert metric(served, "cosmoforge_prompts_published_total", run=RUN) == 5
    assert metric(served, "cosmoforge_queue_depth", run=RUN) == 0
    assert metric(served, "cosmoforge_run_phase", run=RUN, phase="Succeeded") == 1
    assert metric(served, "cosmoforge_run_phase", run=RUN, phase="Generating") == 0

    # JSON logs carry the run as a field.
    records = [json.loads(line) for line in dispatcher_log.splitlines() if line.startswith("{")]
    queued = [r for r in records if r.get("run") == RUN and "already generated" in r["message"]]
    assert queued and queued[0]["logger"] == "cosmoforge.services.dispatcher" and queued[0]["level"] == "info"


def test_rate_meter_averages_over_its_window() -> None:
    meter = metrics.RateMeter(window=10.0)
    meter.add(100, now=0.0)
    meter.add(100, now=5.0)
    assert meter.rate(now=5.0) == pytest.approx(200 / 5)
    assert meter.rate(now=14.0) == pytest.approx(100 / 9)  # the first point left the window
    assert meter.rate(now=100.0) == 0.0


def test_json_log_lines_hold_extra_fields() -> None:
    import io
    import logging

    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("cosmoforge.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("queued %d", 3, extra={"run": "r1"})
    finally:
        logger.removeHandler(handler)
    line = json.loads(sink.getvalue())
    assert (line["message"], line["run"], line["level"]) == ("queued 3", "r1", "warning")
    assert line["logger"] == "cosmoforge.test.json" and line["time"].endswith("+00:00")


def test_wandb_is_skipped_without_the_package() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert metrics.WandbLog.start("r", {}) is None
    else:
        pytest.skip("wandb is installed here; the offline path is exercised by a real run")
