"""Generation at scale, side by side: cosmoforge's pipeline against a raw asyncio client.

Run: `python benchmarks/bench_generation.py [--prompts 3000] [--concurrency 32] [--latency 0.2]
[--tokens 64] [--repeat 2] [--publish 100000] [--memory 100000,1000000]`

Everything talks to the same kind of server: the model server with its canned engine, a separate process that
speaks TGI's HTTP API and answers every request after `--latency` seconds with canned text, so
what is measured is the machinery around the model, not the model.

1. Throughput. The same prompts (built by the prompt engine from a synthetic seed file) go
   through (a) the llm-swarm approach: one asyncio client, a semaphore at `--concurrency`,
   `gather`, results written to parquet at the end; and (b) the pipeline: dispatcher (in this
   process) queues the run on a nats-server, a `cosmo worker` process pulls, calls the server,
   writes shards and acks. Both use the `text-generation` client's chat call. The clock starts
   at the server's first request (so process start-up is not counted) and stops when the last
   result is durable (raw: the parquet file is written; pipeline: the queue is drained, which
   happens only after every shard is written). Repeated `--repeat` times, alternating.
2. Publish rate: the dispatcher's publish of a run's manifest (read parquet, encode, publish,
   every message confirmed by JetStream) with `queue.publish_all`, beside the plain way
   (one awaited future per message).
3. Memory: a `cosmo dispatcher` process starts runs of each `--memory` size with no workers;
   its peak resident memory (VmHWM) once every prompt is queued, and the time that took.

Targets: pipeline >= 0.95 x raw; publish >= 20k prompts/s; dispatcher memory flat in the run size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pyarrow as pa
import yaml
from nats.js import JetStreamContext

from cosmoforge import queue
from cosmoforge.prompts.builder import build_prompts
from cosmoforge.prompts.manifest import PublishCount, pending_messages, write_prompts
from cosmoforge.queue import EmbeddedNats, free_port
from cosmoforge.runs.manager import RunManager
from cosmoforge.services.dispatcher.client import DispatcherClient
from cosmoforge.spec.model import GenerationRun, parse_run
from cosmoforge.storage import PROMPTS, RunStore

COSMO = [sys.executable, "-m", "cosmoforge.cli"]
WORDS = (
    "energy cell market river theorem poem protein orbit ledger climate grammar circuit "
    "harvest empire vaccine algebra canyon contract melody fossil"
).split()
VARIANTS = 12  # audience x style pairs per seed record: prompts = 12 x records


def write_seeds(path: Path, prompts: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for index in range(-(-prompts // VARIANTS)):
            text = " ".join(rng.choice(WORDS) for _ in range(60))
            handle.write(json.dumps({"id": f"s{index}", "text": text, "topic": rng.choice(WORDS)}) + "\n")
    return path


def document(
    name: str, seeds: Path, out: Path, prompts: int, concurrency: int, tokens: int, workers: int = 1
) -> dict[str, Any]:
    """A run over the synthetic seeds; `concurrency` is split evenly between `workers`."""
    return {
        "apiVersion": "cosmoforge.io/v1alpha1",
        "kind": "GenerationRun",
        "metadata": {"name": name},
        "spec": {
            "seeds": [
                {"name": "web", "kind": "web", "uri": str(seeds), "idField": "id", "topicField": "topic"}
            ],
            "prompts": {"variantsPerSeed": VARIANTS, "limit": prompts},
            "generation": {
                "engine": "tgi",
                "maxNewTokens": tokens,
                "concurrency": max(1, concurrency // workers),
                "workers": workers,
                "timeoutSeconds": 120,
            },
            "output": {"uri": str(out)},
        },
    }


@dataclass
class Fake:
    process: subprocess.Popen[bytes]
    url: str

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/stats", timeout=10).json())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_fake(latency: float, tokens: int) -> Fake:
    port = free_port()
    command = [sys.executable, "-m", "cosmoforge.services.modelserver", "--engine", "canned",
               "--port", str(port), "--latency", str(latency), "--tokens", str(tokens)]  # fmt: skip
    fake = Fake(subprocess.Popen(command), f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{fake.url}/health", timeout=1).status_code == 200:
                return fake
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the fake server did not start")
        time.sleep(0.1)


# --- 1. throughput ----------------------------------------------------------------------------


async def raw_client(url: str, rows: list[dict[str, Any]], concurrency: int, tokens: int, out: Path) -> float:
    """The llm-swarm approach: gather every prompt behind a semaphore; write once at the end."""
    from text_generation import AsyncClient
    from text_generation.types import Message

    client = AsyncClient(url, timeout=120)
    gate = asyncio.Semaphore(concurrency)

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        async with gate:
            reply = await client.chat(
                messages=[Message(role="user", content=row["prompt"])], max_tokens=tokens
            )
        usage = reply.usage or {}
        return {
            "prompt_id": row["prompt_id"],
            "text": reply.choices[0].message.content,
            "completion_tokens": int(usage.get("completion_tokens", 0)),
        }

    results = await asyncio.gather(*(one(row) for row in rows))
    RunStore.open(str(out), "raw").write_table("generations.parquet", pa.Table.from_pylist(results))
    return time.time()


def measure_raw(work: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> float:
    fake = start_fake(args.latency, args.tokens)
    try:
        finished = asyncio.run(raw_client(fake.url, rows, args.concurrency, args.tokens, work / "raw-out"))
        return len(rows) / (finished - fake.stats()["first_at"])
    finally:
        fake.stop()
        shutil.rmtree(work / "raw-out", ignore_errors=True)


async def pipeline(
    nats_url: str, spec_text: str, run: GenerationRun, fake: Fake, args: argparse.Namespace
) -> float:
    manager = RunManager(nats_url, compact=False)
    await manager.start()
    workers: list[subprocess.Popen[bytes]] = []
    nc = await nats.connect(nats_url)
    try:
        status = await manager.start_run(spec_text)
        while status.phase != "Generating":
            await asyncio.sleep(0.05)
            status = manager.status(run.name)
        out = str(Path(status.output_uri).parent)
        for index in range(args.workers):
            command = [*COSMO, "worker", "--nats", nats_url, "--out", out, "--run", run.name,
                       "--endpoint", fake.url, "--worker-id", f"w{index}"]  # fmt: skip
            workers.append(subprocess.Popen(command))
        js = nc.jetstream()
        while await queue.remaining(js, run.name):
            await asyncio.sleep(0.02)
        return time.time()
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)
        await nc.close()
        await manager.close()


def measure_pipeline(work: Path, seeds: Path, index: int, args: argparse.Namespace) -> float:
    name = f"bench-{index}"
    spec_text = yaml.safe_dump(
        document(name, seeds, work / "out", args.prompts, args.concurrency, args.tokens, args.workers)
    )
    run = parse_run(yaml.safe_load(spec_text))
    fake = start_fake(args.latency, args.tokens)
    try:
        with EmbeddedNats(store_dir=str(work / f"js-{index}")) as server:
            finished = asyncio.run(pipeline(server.url, spec_text, run, fake, args))
        stats = fake.stats()
        assert stats.get("chat") == args.prompts, f"{stats} requests for {args.prompts} prompts"
        return args.prompts / (finished - stats["first_at"])
    finally:
        fake.stop()


# --- 2. publish rate --------------------------------------------------------------------------


async def publish_one_future_each(
    js: JetStreamContext, run: str, messages: Iterable[tuple[str, bytes]], window: int = 512
) -> int:
    """The straightforward way, kept as the reference: one awaited future per message, in windows."""
    subject = queue.prompts_subject(run)
    published = 0
    pending: list[asyncio.Future[object]] = []
    for prompt_id, payload in messages:
        pending.append(
            asyncio.ensure_future(
                js.publish(
                    subject, payload, stream=queue.stream_name(run), headers={"Nats-Msg-Id": prompt_id}
                )
            )
        )
        if len(pending) >= window:
            await asyncio.gather(*pending)
            published += len(pending)
            pending.clear()
    await asyncio.gather(*pending)
    return published + len(pending)


async def publish_rates(nats_url: str, store: RunStore, count: int) -> dict[str, float]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    empty = pa.array([], type=pa.string())
    rates = {}
    try:
        for label in ("publish (a future per message)", "publish_all (pipelined acks)"):
            await queue.ensure_stream(js, "pub")
            messages = pending_messages(store, empty, PublishCount())
            started = time.perf_counter()
            if label.startswith("publish_all"):
                published = (await queue.publish_all(nc, "pub", messages)).stored
            else:
                published = await publish_one_future_each(js, "pub", messages)
            rates[label] = published / (time.perf_counter() - started)
            assert published == count and await queue.remaining(js, "pub") == count
            await js.delete_stream(queue.stream_name("pub"))
    finally:
        await nc.close()
    return rates


# --- 3. memory --------------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def queue_everything(target: str, spec_text: str, name: str) -> dict[str, Any]:
    async with DispatcherClient(target) as client:
        await client.wait_ready()
        await client.start_run(spec_text)
        while True:
            status = await client.get_status(name)
            if status["phase"] != "Pending":
                return status
            await asyncio.sleep(0.2)


def measure_memory(work: Path, size: int) -> dict[str, float]:
    seeds = write_seeds(work / f"seeds-{size}.jsonl", size)
    name = f"memory-{size}"
    spec_text = yaml.safe_dump(document(name, seeds, work / "out", size, 32, 64))
    port = free_port()
    with EmbeddedNats(store_dir=str(work / f"js-memory-{size}")) as server:
        command = [*COSMO, "dispatcher", "--nats", server.url, "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            idle = rss_mb(process.pid)
            started = time.perf_counter()
            status = asyncio.run(queue_everything(f"127.0.0.1:{port}", spec_text, name))
            seconds = time.perf_counter() - started
            peak = peak_rss_mb(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert status["phase"] == "Generating" and status["published"] == size, status
    shutil.rmtree(work / "out" / name, ignore_errors=True)
    return {"prompts": size, "seconds": seconds, "rate": size / seconds, "idle_mb": idle, "peak_mb": peak}


# --- report -----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "meets target" if ok else "BELOW TARGET"


def report_throughput(work: Path, args: argparse.Namespace) -> None:
    seeds = write_seeds(work / "seeds.jsonl", args.prompts)
    spec = document("raw", seeds, work / "out", args.prompts, args.concurrency, args.tokens)
    rows = [p.to_dict() for p in build_prompts(parse_run(spec))]
    assert len(rows) == args.prompts
    print(
        f"throughput: {args.prompts} prompts, concurrency {args.concurrency}, "
        f"{args.latency * 1000:.0f} ms per request, {args.tokens} tokens per answer, "
        f"{args.workers} worker(s); ideal {args.concurrency / args.latency:.0f} prompts/s"
    )
    raw, ours = [], []
    for index in range(args.repeat):
        raw.append(measure_raw(work, rows, args))
        ours.append(measure_pipeline(work, seeds, index, args))
        print(f"  round {index + 1}: raw {raw[-1]:8.1f} prompts/s   pipeline {ours[-1]:8.1f} prompts/s")
    ratio = statistics.median(ours) / statistics.median(raw)
    print(f"  median: raw {statistics.median(raw):.1f}, pipeline {statistics.median(ours):.1f} prompts/s")
    print(f"  pipeline / raw = {ratio:.3f}  (target >= 0.95: {verdict(ratio >= 0.95)})")


def report_publish(work: Path, count: int) -> None:
    store = RunStore.open(str(work / "out"), "publish")
    seeds = write_seeds(work / "publish-seeds.jsonl", count)
    write_prompts(store, build_prompts(parse_run(document("publish", seeds, work / "out", count, 32, 64))))
    with EmbeddedNats(store_dir=str(work / "js-publish")) as server:
        rates = asyncio.run(publish_rates(server.url, store, count))
    size = sum(store.fs.size(p) for p in store.list_parquet(PROMPTS))
    print(f"publish: {count} prompts read from the manifest ({size / 1e6:.0f} MB of parquet), each confirmed")
    for label, rate in rates.items():
        print(f"  {label:34s} {rate:10.0f} prompts/s")
    best = rates["publish_all (pipelined acks)"]
    print(f"  publish_all rate target >= 20000/s: {verdict(best >= 20_000)}")


def report_memory(work: Path, sizes: list[int]) -> None:
    print("memory: a dispatcher process queues a whole run (build, manifest, publish), no workers")
    results = [measure_memory(work, size) for size in sizes]
    for r in results:
        print(
            f"  {r['prompts']:>9,.0f} prompts: queued in {r['seconds']:6.1f} s ({r['rate']:7.0f}/s), "
            f"idle {r['idle_mb']:5.0f} MB, peak {r['peak_mb']:5.0f} MB"
        )
    if len(results) > 1:
        growth = results[-1]["peak_mb"] / results[0]["peak_mb"]
        scale = results[-1]["prompts"] / results[0]["prompts"]
        print(f"  peak grows x{growth:.2f} for x{scale:.0f} prompts (flat: {verdict(growth < 1.25)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--prompts", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--latency", type=float, default=0.2, help="seconds the fake server takes per request"
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens in each canned answer")
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing --concurrency")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--publish", type=int, default=100_000, help="prompts for the publish rate (0: skip)")
    parser.add_argument("--memory", default="100000,1000000", help="run sizes for the memory test ('': skip)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cosmo-bench-") as scratch:
        work = Path(scratch)
        if args.repeat and args.prompts:
            report_throughput(work, args)
        if args.publish:
            report_publish(work, args.publish)
        sizes = [int(s) for s in args.memory.split(",") if s.strip()]
        if sizes:
            report_memory(work, sizes)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
