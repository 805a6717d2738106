"""The embedded run: the cluster's pipeline as local processes, for laptops and CI.

It plays every part the operator plays on Kubernetes, with the same code: a nats-server with
JetStream stands in for the chart's, the dispatcher's RunManager runs in this process and drives
generation exactly as it does behind gRPC (manifest, publish what is pending, follow the queue,
end a run whose last prompts can no longer be delivered, compact), and the embedded model and
generator worker processes stand in for the Deployments: started only once there is something
to generate, and restarted when they die. Post-processing and training follow the run's stage
chain. Storage is the source of truth, so running the same spec again resumes instead of
starting over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cosmoforge import queue
from cosmoforge.generation.compact import Compacted, read_dataset
from cosmoforge.postprocess.stats import document_stats
from cosmoforge.processes import Command, Supervisor, stop_process
from cosmoforge.runs.manager import RunManager
from cosmoforge.runs.stages import final_data, post_stages
from cosmoforge.runs.status import RunStatus
from cosmoforge.services.runpages import RunPages, serving
from cosmoforge.spec.model import GenerationRun, Phase, dump_run
from cosmoforge.storage import RunStore

if TYPE_CHECKING:
    from cosmoforge.training.chain import TrainingSummary

# How often the queue is looked at and the workers are checked, as the embedded loop always did.
POLL_SECONDS = 0.5


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
    phase: str = ""
    message: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def succeeded(self) -> bool:
        return self.phase == Phase.succeeded.value and self.failed == 0


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
        if self.process is not None:
            stop_process(self.process)


def worker_command(nats_url: str, output: str, run: str, endpoint: str) -> Command:
    """`cosmo worker` for the supervisor; the id names the index, this runner and the restart."""
    base = [
        sys.executable, "-m", "cosmoforge.cli", "worker",
        "--nats", nats_url, "--out", output, "--run", run, "--endpoint", endpoint,
    ]  # fmt: skip
    return lambda index, restarts: [*base, "--worker-id", f"w{index}-{os.getpid()}-{restarts}"]


class Services:
    """The queue, the model and the workers, each started on first use.

    A resumed run with nothing left to generate starts neither model nor workers. `nats_url`
    names a server to use instead of starting one (tests, or a queue that outlives the run).
    """

    def __init__(
        self, stack: contextlib.ExitStack, run: GenerationRun, console: Console, nats_url: str | None = None
    ):
        self.stack, self.run, self.console = stack, run, console
        self._nats = nats_url
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

    def workers(self, store: RunStore) -> Supervisor:
        """`generation.workers` worker processes on the model, as the generator Deployment runs them."""
        output = store.uri.rsplit("/", 1)[0]
        command = worker_command(self.nats_url(), output, self.run.name, self.endpoint())
        pool = Supervisor(self.run.spec.generation.workers, command, name="generator worker")
        self.stack.callback(pool.stop)
        return pool.start()


class GenerationProgress:
    """The live line while workers generate: prompts done and queued, tokens/s, time."""

    COLUMNS = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[queued]} queued"),
        TextColumn("{task.fields[rate]:.0f} tok/s"),
        TimeElapsedColumn(),
    )

    def __init__(self, console: Console):
        self.progress = Progress(*self.COLUMNS, console=console, transient=False)
        self.task: Any = None
        self.started = 0.0
        self.total = 0

    def start(self, status: RunStatus) -> None:
        # A queue kept from an earlier attempt can hold more than this start published.
        self.total = max(status.published, status.queued)
        self.started = time.monotonic()
        self.progress.start()
        self.task = self.progress.add_task("generating", total=self.total, rate=0.0, queued=self.total)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started if self.task is not None else 0.0

    def update(self, status: RunStatus) -> None:
        if self.task is None:
            return
        rate = status.tokens / max(1e-6, self.seconds)
        left = min(status.queued, self.total)
        self.progress.update(self.task, completed=self.total - left, queued=status.queued, rate=rate)

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()


async def generate(
    run: GenerationRun, store: RunStore, services: Services, summary: RunSummary, ui_port: int | None = None
) -> Compacted | None:
    """Generation as the dispatcher drives it, with the dispatcher's RunManager in this process.

    The manager does what it does behind gRPC; this loop plays the Deployments: once the run is
    generating with prompts in the queue it starts the model and the workers, restarts workers
    that die while it watches, and stops them when the manager reports a final phase. Returns
    the compacted dataset; an error that failed the run before it was drained is raised.
    """
    console = services.console
    manager = RunManager(services.nats_url(), poll_seconds=POLL_SECONDS)
    await manager.start()
    progress = GenerationProgress(console)
    pool: Supervisor | None = None
    announced = False
    pages = contextlib.AsyncExitStack()
    try:
        if ui_port is not None:
            port = await pages.enter_async_context(serving(RunPages.of(manager), "127.0.0.1", ui_port))
            console.print(f"run page: http://127.0.0.1:{port}/runs/{run.name}")
        await manager.start_run(dump_run(run))
        async for status, _ in manager.watch(run.name, heartbeat=POLL_SECONDS):
            if status.phase != Phase.generating.value:
                continue
            if not announced:
                announced = True
                console.print(f"[bold]{run.name}[/]: {status.prompts} prompts -> {store.uri}")
                if not (status.published or status.queued):
                    console.print("every prompt already has a completion: nothing to generate")
            if pool is None and (status.published or status.queued):
                # The model loads in a thread: the manager keeps following the queue meanwhile.
                pool = await asyncio.to_thread(services.workers, store)
                progress.start(status)
            if pool is not None:
                pool.supervise()
            progress.update(status)
    finally:
        progress.stop()
        summary.seconds = progress.seconds
        if pool is not None:
            pool.stop()
        tracked = manager.runs.get(run.name)
        await pages.aclose()
        await manager.close()
    assert tracked is not None
    if tracked.error is not None:
        raise tracked.error
    _record(summary, tracked.status)
    if not summary.succeeded:
        console.print(f"[bold]{summary.phase}[/]: {summary.message}")
    return tracked.dataset


def _record(summary: RunSummary, status: RunStatus) -> None:
    summary.prompts, summary.already_done, summary.published = (
        status.prompts, status.already_done, status.published,
    )  # fmt: skip
    summary.generated = max(0, status.generated - status.already_done)
    summary.failed, summary.tokens = status.failed, status.tokens
    summary.phase, summary.message = status.phase, status.message


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
    """The run's stage chain after generation (runs/stages.py), each stage reading what the one
    before kept; returns the final documents."""
    from cosmoforge.postprocess import decontam, dedup
    from cosmoforge.postprocess.stages import decontaminate_dataset, dedup_dataset

    spec = run.spec.postprocess
    for stage in post_stages(run.spec):
        source, out = store.url(stage.input), store.url(stage.output)
        if stage.name == "compact":
            continue  # done by the driver as generation ended, where it also counted the outcome
        if stage.name == "dedup":
            minhash = dedup.DedupConfig(
                ngram=spec.dedup.ngram,
                buckets=spec.dedup.buckets,
                hashes_per_bucket=spec.dedup.hashes_per_bucket,
                exact=spec.dedup.exact,
            )
            summary.dedup = dedup_dataset(source, out, minhash)
            console.print(f"dedup: kept {summary.dedup['kept']} of {summary.dedup['documents']} documents")
        elif stage.name == "decontaminate":
            settings = spec.decontaminate
            matching = decontam.Config(settings.ngram, settings.threshold, settings.min_block_chars)
            report = decontaminate_dataset(source, out, settings.benchmarks, matching)
            summary.decontaminated = int(report["documents_removed"])
            console.print(
                f"decontamination: removed {summary.decontaminated} of {report['documents']} documents"
            )
        elif stage.name == "tokenize" and run.spec.training is not None:
            # One call runs tokenize, train and evaluate, the stages that follow it in the plan.
            from cosmoforge.training.chain import train_run

            console.print(f"training the {run.spec.training.preset} preset on {source}")
            summary.training = train_run(run.spec.training, store, source)
            store.write_text("metrics/training.json", json.dumps(asdict(summary.training), indent=2))
        elif stage.name == "publish":
            from cosmoforge.publish.run import Settings, publish_run

            pushed = publish_run(store.uri, Settings())
            console.print(f"published to {pushed.repo}: {len(pushed.uploaded)} file(s) uploaded")
    return store.url(final_data(run.spec))


def run_embedded(
    run: GenerationRun,
    output: str | None = None,
    console: Console | None = None,
    nats_url: str | None = None,
    ui_port: int | None = None,
) -> RunSummary:
    """Run a spec end to end on this machine; `output` overrides `spec.output.uri`; with
    `ui_port`, the run's page is served on loopback while it generates (0: any free port)."""
    console = console or Console(stderr=True)
    if output:
        run.spec.output.uri = output
    store = RunStore.open(run.spec.output.uri, run.name)
    summary = RunSummary(run=run.name, output=store.uri)
    with contextlib.ExitStack() as stack:
        services = Services(stack, run, console, nats_url)
        cluster_web_seeds(run, store, services, console)
        summary.dataset = asyncio.run(generate(run, store, services, summary, ui_port))
    summary.models = summary.dataset.models if summary.dataset else []
    documents = read_dataset(store)
    if documents is not None and documents.num_rows:
        summary.stats = document_stats(documents, run.spec.postprocess.dedup)
        store.write_text("metrics/stats.json", json.dumps(summary.stats, indent=2))
    if summary.dataset is not None and summary.dataset.rows:
        summary.final = postprocess(run, store, console, summary)
    else:
        summary.final = store.url("dataset")
    return summary


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
