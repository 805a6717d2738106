"""The Decontaminator gRPC service over a real loopback socket: same verdicts and report as the library.

The server runs in this process for the verdict and report checks (its gRPC still goes over a
socket) and as a real `cosmo decontaminator` process for start-up errors, health and SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cosmoforge.postprocess.stages import decontam, evalsets
from cosmoforge.queue import free_port
from cosmoforge.services import decontaminator as decontam_service
from cosmoforge.services.decontaminator import DecontaminatorClient, pb, pb_grpc
from processes import COSMO

DATA = Path(__file__).parents[1] / "data" / "benchmarks"
BENCHMARKS = [str(DATA / name) for name in ("arc_easy.jsonl", "boolq.jsonl", "mmlu.jsonl", "custom.jsonl")]
FILLER = (
    "Gardeners in temperate climates often start seedlings indoors during late winter, moving them "
    "outside once the soil warms and the risk of frost has passed. "
)


@pytest.fixture(scope="module")
def index() -> decontam.Index:
    return decontam_service.build_index(BENCHMARKS, decontam.Config())


def corpus(index: decontam.Index) -> list[dict[str, str]]:
    """Planted copies (whole, upper-cased, paraphrased, partial, short items), clean and empty text."""
    texts = {(item.benchmark, item.index): item.text for item in index.items}
    boolq = texts[("boolq", 1)]
    words = boolq.split()
    paraphrase = " ".join("swim" if i in (12, 20) else w for i, w in enumerate(words))
    docs = [
        FILLER + texts[("arc_easy", 1)] + " " + FILLER,
        FILLER + boolq.upper(),
        FILLER + paraphrase,
        FILLER + " ".join(words[:11]),  # a third of the item: a near-miss
        "Quiz time. " + texts[("mmlu", 0)] + " Easy.",
        "A note on " + texts[("custom", 0)],  # a one-word item, matched whole
        texts[("house_eval", 0)],
        FILLER,
        "",
        "   \n ",
        FILLER * 40,
    ]
    groups = ["web", "web", "stories", "stories", "", "web", "", "web", "", "stories", "web"]
    return [
        {"id": f"doc-{n}", "text": t, "group": g} for n, (t, g) in enumerate(zip(docs, groups, strict=True))
    ]


def expected_verdict(doc_id: str, verdict: decontam.Verdict) -> dict[str, Any]:
    best = verdict.best
    return {
        "id": doc_id,
        "contaminated": verdict.contaminated,
        "benchmark": best.benchmark if best else "",
        "item_index": best.item_index if best else 0,
        "item_text": best.item_text if best else "",
        "ngram": best.ngram if best else "",
        "ratio": best.ratio if best else 0.0,
    }


@contextlib.asynccontextmanager
async def service(index: decontam.Index) -> AsyncIterator[DecontaminatorClient]:
    server, _, port = decontam_service.create_server(index, 0, "127.0.0.1")
    await server.start()
    try:
        async with DecontaminatorClient(f"127.0.0.1:{port}") as client:
            await client.wait_ready(10)
            yield client
    finally:
        await server.stop(None)


async def test_verdicts_and_report_match_the_library(index: decontam.Index) -> None:
    docs = corpus(index)
    expected = [decontam.check(doc["text"], index) for doc in docs]
    async with service(index) as client:
        verdicts = [verdict async for verdict in client.check(docs)]
        report = await client.report()
        typed = await pb_grpc.DecontaminatorStub(client.channel).Report(pb.ReportRequest())
    assert verdicts == [expected_verdict(doc["id"], v) for doc, v in zip(docs, expected, strict=True)]
    assert [v["contaminated"] for v in verdicts] == [True] * 3 + [False] + [True] * 3 + [False] * 4
    library = decontam.build_report(
        expected,
        index,
        [doc["group"] or None for doc in docs],
        empty_documents=sum(1 for doc in docs if not doc["text"].strip()),
    )
    assert [miss.pop("id") for miss in report["near_misses"]] == ["doc-3"]
    assert report == library
    assert report["empty_documents"] == 2 and report["documents_removed"] == 6
    counts = (typed.documents, typed.documents_removed, typed.documents_kept, typed.empty_documents)
    assert counts == (11, 6, 5, 2)
    assert {name: (c.items, c.removed, c.unique_items) for name, c in typed.benchmarks.items()} == {
        name: (entry["items"], entry["removed"], entry["unique_items"])
        for name, entry in library["benchmarks"].items()
    }
    assert (typed.benchmarks["boolq"].removed, typed.benchmarks["boolq"].unique_items) == (2, 1)


async def test_report_accumulates_over_calls_and_empty_streams_are_fine(index: decontam.Index) -> None:
    docs = corpus(index)
    async with service(index) as client:
        assert [v async for v in client.check([])] == []
        assert (await client.report())["documents"] == 0
        first = [v async for v in client.check(docs[:4])]
        second = [v async for v in client.check(docs[4:])]
        report = await client.report()
    assert [v["id"] for v in first + second] == [doc["id"] for doc in docs]
    assert report["documents"] == len(docs) and report["documents_removed"] == 6


async def test_a_client_may_wait_for_each_verdict_before_sending_the_next(index: decontam.Index) -> None:
    docs = corpus(index)
    outbox: asyncio.Queue[dict[str, str] | None] = asyncio.Queue()

    async def documents() -> AsyncIterator[dict[str, str]]:
        while (doc := await outbox.get()) is not None:
            yield doc

    async with service(index) as client:
        stream = client.check(documents())
        for doc in docs[:3]:
            await outbox.put(doc)
            verdict = await asyncio.wait_for(anext(stream), 10)
            assert verdict["id"] == doc["id"] and verdict["contaminated"]
        await outbox.put(None)
        assert [v async for v in stream] == []


def test_unknown_benchmark_fails_at_start_with_the_known_names() -> None:
    with pytest.raises(evalsets.BenchmarkError, match=r"unknown benchmark 'nope'.*mmlu"):
        decontam_service.build_index(["nope"], decontam.Config())
    result = subprocess.run(
        [*COSMO, "decontaminator", "--port", "0", "--benchmark", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("cosmo decontaminator: error: unknown benchmark 'nope'")
    assert len(result.stderr.strip().splitlines()) == 1


async def test_the_command_serves_reports_health_and_stops_on_sigterm(
    index: decontam.Index, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "decontaminator.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*COSMO, "decontaminator", "--port", str(port), "--host", "127.0.0.1"]
            + [arg for path in BENCHMARKS for arg in ("--benchmark", path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await wait_serving(f"127.0.0.1:{port}", process, log)
        docs = corpus(index)
        async with DecontaminatorClient(f"127.0.0.1:{port}") as client:
            verdicts = [v async for v in client.check(docs)]
        assert verdicts == [expected_verdict(d["id"], decontam.check(d["text"], index)) for d in docs]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log.read_text()
        assert "decontaminator stopped" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def wait_serving(target: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.poll() is None, log.read_text()
            with contextlib.suppress(grpc.aio.AioRpcError):
                request = health_pb2.HealthCheckRequest(service=decontam_service.SERVICE)
                reply = await stub.Check(request, timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            assert time.monotonic() < deadline, f"not serving after {timeout}s:\n{log.read_text()}"
            await asyncio.sleep(0.1)


async def test_a_document_over_grpcs_default_4_mib_limit_is_checked(index: decontam.Index) -> None:
    text = FILLER * 30000 + index.items[0].text  # about 6 MB
    async with service(index) as client:
        verdicts = [v async for v in client.check([{"id": "big", "text": text}])]
    assert verdicts == [expected_verdict("big", decontam.check(text, index))]
    assert verdicts[0]["contaminated"]


async def test_the_pooled_service_keeps_check_alls_verdicts_and_their_order(index: decontam.Index) -> None:
    # Small batches, several in flight at once on two processes: order must still hold.
    docs = [{**doc, "id": f"{doc['id']}-{copy}"} for copy in range(30) for doc in corpus(index)]
    expected = list(decontam.check_all([doc["text"] for doc in docs], index, workers=1))
    with decontam.Checker(index, workers=2, batch_size=8) as checker:
        server, _, port = decontam_service.create_server(index, 0, "127.0.0.1", checker=checker, batch_size=8)
        await server.start()
        try:
            async with DecontaminatorClient(f"127.0.0.1:{port}") as client:
                await client.wait_ready(10)
                first, second = await asyncio.gather(
                    collect(client, docs), collect(client, list(reversed(docs)))
                )
                report = await client.report()
        finally:
            await server.stop(None)
    assert first == [expected_verdict(d["id"], v) for d, v in zip(docs, expected, strict=True)]
    assert second == list(reversed(first))
    assert report["documents"] == 2 * len(docs) and report["documents_removed"] == 2 * 30 * 6


async def collect(client: DecontaminatorClient, docs: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [verdict async for verdict in client.check(docs)]
