"""The embedded run: the cluster's pipeline as local processes, for laptops and CI.

It plays every part the operator plays on Kubernetes: starts a nats-server with JetStream,
serves the embedded model unless the spec names an endpoint, publishes the prompts that have
no completion in storage yet, supervises generator worker processes (restarting any that die,
as a Deployment would), and compacts the shards into the dataset. Storage is the source of
truth, so running the same spec again resumes instead of starting over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import nats
import pyarrow as pa
from nats.aio.msg import Msg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cosmoforge import queue, records
from cosmoforge.compact import Compacted, compact, dataset_card, read_dataset
from cosmoforge.dispatcher.state import consumer_limits
from cosmoforge.prompts import Prompt, build_prompts
from cosmoforge.spec import GenerationRun, dump_run
from cosmoforge.stats import document_stats
from cosmoforge.storage import GENERATIONS, PROMPTS, RunStore

if TYPE_CHECKING:
    from cosmoforge.training.chain import TrainingSummary

PROMPTS_PER_FILE = 100_000
ROW_GROUP = 5_000


@dataclass
class RunSummary:
    run: str
    output: str
    prompts: int = 0
    already_done: int = 0
    published: int = 0
    generated: int = 0
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    dataset: Compacted | None = None
    models: list[str] = field(default_factory=list)
    stats: dict[str, Any] | None = None
    training: TrainingSummary | None = None
    dedup: dict[str, Any] | None = None
    decontaminated: int | None = None
    final: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def write_prompts(store: RunStore, prompts: Iterator[Prompt]) -> int:
    """Write the prompt manifest in fixed-size files; returns the number of prompts.

    Prompts are held only one row group at a time, so memory stays flat for any count.
    """
    store.remove(PROMPTS)
    total = 0
    for index in itertools.count():
        groups = _row_groups(itertools.islice(prompts, PROMPTS_PER_FILE))
        first = next(groups, None)
        if first is None and index > 0:
            break
        tables = itertools.chain([first] if first is not None else [], groups)
        written = store.write_tables(f"{PROMPTS}/prompts-{index:05d}.parquet", records.PROMPTS, tables)
        total += written
        if written < PROMPTS_PER_FILE:
            break
    return total


def _row_groups(prompts: Iterator[Prompt]) -> Iterator[pa.Table]:
    while chunk := list(itertools.islice(prompts, ROW_GROUP)):
        yield pa.Table.from_pylist([p.to_dict() for p in chunk], schema=records.PROMPTS)


def pending_prompts(store: RunStore, done: set[str]) -> Iterator[tuple[str, bytes]]:
    for table in store.read_tables(PROMPTS):
        for row in table.to_pylist():
            if row["prompt_id"] not in done:
                yield row["prompt_id"], queue.encode(row)


class ModelServer:
    """The embedded model as a child process speaking TGI's and OpenAI's HTTP APIs."""

    def __init__(self) -> None:
        self.port = queue.free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ModelServer:
        command = [sys.executable, "-m", "cosmoforge.cli", "serve-model", "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"the embedded model server exited: {error.strip()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the embedded model server did not become healthy in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class WorkerPool:
    """Generator worker processes, restarted when they die before the queue is drained."""

    def __init__(self, count: int, nats_url: str, output: str, run: str, endpoint: str):
        self.count = count
        self.base = [
            sys.executable, "-m", "cosmoforge.cli", "worker",
            "--nats", nats_url, "--out", output, "--run", run, "--endpoint", endpoint,
        ]  # fmt: skip
        self.processes: list[subprocess.Popen[bytes]] = []
        self.restarts = 0

    def start(self) -> None:
        self.processes = [self._spawn(i) for i in range(self.count)]

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*self.base, "--worker-id", f"w{index}-{os.getpid()}-{self.restarts}"])

    def supervise(self) -> None:
        for index, process in enumerate(self.processes):
            if process.poll() is not None:
                self.restarts += 1
                self.processes[index] = self._spawn(index)

    def stop(self, timeout: float = 30.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _drive(
    run: GenerationRun,
    store: RunStore,
    done: set[str],
    nats_url: str,
    endpoint: str,
    summary: RunSummary,
    console: Console,
) -> None:
    spec = run.spec.generation
    nc = await nats.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    js = nc.jetstream()
    await queue.ensure_stream(js, run.name)
    limits = consumer_limits(spec)
    await queue.ensure_consumer(
        js, run.name, ack_wait=limits.ack_wait, max_deliver=limits.max_deliver,
        max_ack_pending=limits.max_ack_pending,
    )  # fmt: skip
    published = await queue.publish_all(nc, run.name, pending_prompts(store, done))
    summary.published = published.stored

    tokens = 0

    async def on_event(msg: Msg) -> None:
        nonlocal tokens
        event = json.loads(msg.data)
        tokens += int(event.get("tokens", 0))

    await nc.subscribe(queue.events_subject(run.name), cb=on_event)
    pool = WorkerPool(spec.workers, nats_url, store.uri.rsplit("/", 1)[0], run.name, endpoint)
    pool.start()
    started = time.monotonic()
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[queued]} queued"),
        TextColumn("{task.fields[rate]:.0f} tok/s"),
        TimeElapsedColumn(),
    ]
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(
                "generating", total=summary.published, rate=0.0, queued=summary.published
            )
            while True:
                left = await queue.remaining(js, run.name)
                elapsed = max(1e-6, time.monotonic() - started)
                progress.update(task, completed=summary.published - left, queued=left, rate=tokens / elapsed)
                if left == 0:
                    break
                pool.supervise()
                await asyncio.sleep(0.5)
    finally:
        pool.stop()
        summary.seconds = time.monotonic() - started
        summary.tokens = tokens
        with contextlib.suppress(Exception):
            await nc.close()


class Services:
    """The queue and the model, started on first use: a resumed run with nothing left starts neither."""

    def __init__(self, stack: contextlib.ExitStack, run: GenerationRun, console: Console):
        self.stack, self.run, self.console = stack, run, console
        self._nats: str | None = None
        self._endpoint = run.spec.generation.endpoint

    def nats_url(self) -> str:
        if self._nats is None:
            server = queue.EmbeddedNats()
            self.stack.callback(server.close)
            self._nats = server.start().url
        return self._nats

    def endpoint(self) -> str:
        if self._endpoint is None:
            self.console.print("starting the embedded model (SmolLM2-135M-Instruct on llama.cpp)")
            model = ModelServer()
            self.stack.callback(model.stop)
            self._endpoint = model.start().url
        return self._endpoint


def cluster_web_seeds(run: GenerationRun, store: RunStore, services: Services, console: Console) -> None:
    """Give web sources without topics the topics of their clusters (spec.clustering)."""
    spec = run.spec.clustering
    if spec is None or not spec.enabled:
        return
    for source in run.spec.seeds:
        if source.kind != "web" or source.topic_field or source.topics_uri:
            continue
        out = store.url("topics", source.name)
        if store.read_text(f"topics/{source.name}/summary.json") is None:
            from cosmoforge.clustering.label import ChatClient
            from cosmoforge.clustering.pipeline import ClusterConfig, ClusterInput, run_clustering

            console.print(f"clustering {source.name} into {spec.clusters} topics")
            run_clustering(
                ClusterInput(source.uri, source.text_field, source.id_field, source.format),
                out,
                ClusterConfig.from_spec(spec),
                complete=ChatClient(services.endpoint(), model=run.spec.generation.model,
                                    engine=str(run.spec.generation.engine)),
            )  # fmt: skip
        source.topics_uri = out


def postprocess(run: GenerationRun, store: RunStore, console: Console, summary: RunSummary) -> str:
    """Dedup, then decontamination, each reading what the previous stage kept; returns the final data."""
    from cosmoforge import decontam, dedup
    from cosmoforge.postprocess import KEPT, decontaminate_dataset, dedup_dataset

    spec = run.spec.postprocess
    current = store.url("dataset")
    if spec.dedup.enabled:
        minhash = dedup.DedupConfig(
            ngram=spec.dedup.ngram,
            buckets=spec.dedup.buckets,
            hashes_per_bucket=spec.dedup.hashes_per_bucket,
            exact=spec.dedup.exact,
        )
        summary.dedup = dedup_dataset(current, store.url("dedup"), minhash)
        console.print(f"dedup: kept {summary.dedup['kept']} of {summary.dedup['documents']} documents")
        current = store.url("dedup", KEPT)
    if spec.decontaminate.enabled:
        settings = spec.decontaminate
        matching = decontam.Config(settings.ngram, settings.threshold, settings.min_block_chars)
        report = decontaminate_dataset(current, store.url("decontam"), settings.benchmarks, matching)
        summary.decontaminated = int(report["documents_removed"])
        console.print(f"decontamination: removed {summary.decontaminated} of {report['documents']} documents")
        current = store.url("decontam", KEPT)
    return current


def run_embedded(run: GenerationRun, output: str | None = None, console: Console | None = None) -> RunSummary:
    console = console or Console(stderr=True)
    output_uri = output or run.spec.output.uri
    store = RunStore.open(output_uri, run.name)
    summary = RunSummary(run=run.name, output=store.uri)
    store.write_text("spec.yaml", dump_run(run))
    with contextlib.ExitStack() as stack:
        services = Services(stack, run, console)
        cluster_web_seeds(run, store, services, console)
        summary.prompts = write_prompts(store, build_prompts(run))
        console.print(f"[bold]{run.name}[/]: {summary.prompts} prompts -> {store.uri}")

        wanted = store.ids_in(PROMPTS)
        done = store.ids_in(GENERATIONS) & wanted
        summary.already_done = len(done)
        todo = summary.prompts - len(done)
        if todo == 0:
            console.print("every prompt already has a completion: nothing to generate")
        else:
            endpoint = services.endpoint()
            asyncio.run(_drive(run, store, done, services.nats_url(), endpoint, summary, console))

    result = compact(store, keep=wanted)
    summary.dataset = result
    summary.generated = result.rows - summary.already_done if todo else 0
    summary.failed = result.failures
    summary.models = _models(store)
    store.write_text("dataset/README.md", dataset_card(run.name, dump_run(run), result, summary.models))
    documents = read_dataset(store)
    if documents is not None and documents.num_rows:
        summary.stats = document_stats(documents, run.spec.postprocess.dedup)
        store.write_text("metrics/stats.json", json.dumps(summary.stats, indent=2))
    summary.final = postprocess(run, store, console, summary) if result.rows else store.url("dataset")
    training = run.spec.training
    if training is not None and training.enabled and result.rows:
        from cosmoforge.training.chain import train_run

        console.print(f"training the {training.preset} preset on {summary.final}")
        summary.training = train_run(training, store, summary.final)
        store.write_text("metrics/training.json", json.dumps(asdict(summary.training), indent=2))
    return summary


def _models(store: RunStore) -> list[str]:
    table = read_dataset(store, columns=["model"])
    return sorted(set(table.column("model").to_pylist())) if table is not None else []


def summary_table(summary: RunSummary) -> Table:
    table = Table(title=f"cosmoforge run {summary.run}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rows = [
        ("prompts", summary.prompts),
        ("already generated", summary.already_done),
        ("generated now", summary.generated),
        ("failed", summary.failed),
        ("documents in dataset", summary.dataset.rows if summary.dataset else 0),
        ("duplicate deliveries dropped", summary.dataset.duplicates_dropped if summary.dataset else 0),
        ("generated tokens (this run)", summary.tokens),
        ("tokens/s", f"{summary.tokens_per_second:.1f}"),
        ("seconds generating", f"{summary.seconds:.1f}"),
        ("models", ", ".join(summary.models)),
        ("dataset", f"{summary.output}/dataset"),
    ]
    if summary.dedup is not None:
        rows.append(("removed by dedup (exact + near)", summary.dedup["removed"]))
    if summary.decontaminated is not None:
        rows.append(("removed by decontamination", summary.decontaminated))
    if summary.final:
        rows.append(("final documents", summary.final))
    if summary.training is not None:
        trained = summary.training
        rows += [
            ("training tokens", trained.tokens),
            ("loss (first -> last step)", f"{trained.first_loss:.3f} -> {trained.final_loss:.3f}"),
            ("evaluated tasks", len(trained.tasks)),
            ("evaluation", trained.outputs["eval"]),
        ]
    for key, value in rows:
        table.add_row(key, str(value))
    return table
