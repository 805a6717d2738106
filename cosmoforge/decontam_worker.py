"""Decontamination as workers of a run: slices of the dataset as NATS tasks, partial reports merged.

`cosmo decontaminate` checks a whole dataset in one process, on the cores of one machine. A
run's decontamination stage can instead be spread over worker processes on any number of
machines, the way generation is:

- **plan** (`make_plan`): the stage's input (the run's `dataset/` shards, or `dedup/kept.parquet`
  when dedup ran first) is cut into row ranges of at most `rows_per_task` rows, in the row
  order `cosmo decontaminate` reads them. The plan is stored beside the outputs; submitting the
  same work again reuses it (and its `nonce`), so a resubmission resumes instead of starting
  over.
- **tasks** (`submit`): one message per range on a JetStream work-queue stream of the run
  (`COSMO_<RUN>_DECONTAM`), except ranges already done or already queued.
- **workers** (`Worker`, `cosmo decontaminate-worker`): pull one task at a time, build the
  benchmark index once per process (from the plan, i.e. the spec's `postprocess.decontaminate`)
  and check the range with `decontam.Checker`, whose forked processes inherit that one index;
  then write the range's kept rows, removed rows and a partial report, each file atomically,
  the partial last, and only then ack. Long ranges send in-progress heartbeats; a worker that
  dies leaves its task unacked, and JetStream hands it to another after `ack_wait`. Outputs
  are named by plan and task, so a redelivered task rewrites the same files: never a
  duplicate row.
- **finalize**: the worker whose partial completes the plan publishes one finalize message
  (deduplicated by its message id if several notice at once); whichever worker takes it merges
  the partials into `kept.parquet`, `removed.parquet`, `report.json` and `report.md`, exactly
  what `cosmo decontaminate` writes for the same input, then marks the plan done and deletes
  the partials. Finalizing is itself a task: if its worker dies, it is redelivered.
- **waiting** (`wait_done`, `run_local`): until the plan is done, then the run's stream is
  removed. A task that wrote an error fails the wait, and so does one JetStream gave up on
  (`max_deliver` deliveries, none acked: its worker died each time), learnt from the server's
  max-deliveries advisory, which the stream also keeps, or from the consumer's state
  (`stranded`). Submitting again deletes such messages and queues their tasks again.

The partial report of a range is its `decontam.Report` as JSON: what the final report needs
and nothing per document that was clean (per benchmark, the removed documents and the item ids
they correspond to, overall and per seed-data group; the best `NEAR_MISS_LIMIT` near-misses
with exact ratios; counts). Merged in row order they give the report of the whole input
(tested byte for byte against one process).

Layout under the stage's output folder (`<run>/decontam/`):

    kept.parquet, removed.parquet, report.json, report.md   the outputs, as one process writes them
    tasks/plan.json                                         the current plan
    tasks/done.json                                         the nonce of the last finished plan
    tasks/<nonce>/<task>.{kept.parquet,removed.parquet,summary.json,error.json}   partials
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import nats
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
)
from nats.js.errors import NotFoundError

from cosmoforge import decontam, evalsets, queue
from cosmoforge.postprocess import (
    KEPT,
    REMOVED,
    REPORT_JSON,
    REPORT_MD,
    check_not_decontaminated,
    group_column,
    groups_of,
    report_json,
    split_by_verdict,
)
from cosmoforge.storage import RunStore

log = logging.getLogger("cosmoforge.decontam_worker")

CONSUMER = "decontaminators"
ROWS_PER_TASK = 20_000
ACK_WAIT = 60.0  # seconds; heartbeats keep a long range alive, so only a dead worker's task waits it out
MAX_DELIVER = 10
TASKS = "tasks"
PLAN = f"{TASKS}/plan.json"
DONE = f"{TASKS}/done.json"
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What evalsets.read_table reads from a folder, in the same order.
INPUT_SUFFIXES = (".parquet", ".jsonl", ".json", ".ndjson", ".arrow", ".gz", ".zst", ".bz2", ".xz")


def stream_name(run: str) -> str:
    return f"{queue.stream_name(run)}_DECONTAM"


def tasks_subject(run: str) -> str:
    return f"cosmo.{run}.decontam"


def advisory_subject(run: str) -> str:
    """Where JetStream announces a task message it stopped delivering (`max_deliver` reached)."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream_name(run)}.{CONSUMER}"


# --- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the index is built from: the spec's `postprocess.decontaminate`."""

    benchmarks: tuple[str, ...]
    config: decontam.Config = field(default_factory=decontam.Config)

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmarks": list(self.benchmarks),
            "ngram": self.config.ngram,
            "threshold": self.config.threshold,
            "min_block_chars": self.config.min_block_chars,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        config = decontam.Config(data["ngram"], data["threshold"], data["min_block_chars"])
        return cls(tuple(data["benchmarks"]), config)


@dataclass(frozen=True)
class Task:
    """Rows [start, stop) of one input file, in the order `cosmo decontaminate` reads them."""

    id: str
    uri: str
    start: int
    stop: int
    format: str = "parquet"  # "parquet": read only the row groups needed; "table": evalsets.read_table

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "uri": self.uri, "start": self.start, "stop": self.stop, "format": self.format}


@dataclass(frozen=True)
class Plan:
    nonce: str
    input: str
    out: str
    settings: Settings
    text_field: str
    group_column: str | None
    rows_per_task: int
    sources: tuple[tuple[str, int, str], ...]  # (uri, rows, fingerprint) of every input file
    tasks: tuple[Task, ...]

    @property
    def documents(self) -> int:
        return sum(rows for _, rows, _ in self.sources)

    def task(self, task_id: str) -> Task:
        for task in self.tasks:
            if task.id == task_id:
                return task
        raise KeyError(task_id)

    def same_work(self, other: Plan) -> bool:
        """Same input files, settings and output: the outputs of one are those of the other.

        How the rows are cut into tasks does not change the outputs, so it is not compared: a
        plan in progress is resumed with its own cut.
        """
        cut = {"nonce": "", "rows_per_task": 0, "tasks": []}
        return self.as_dict() | cut == other.as_dict() | cut

    def as_dict(self) -> dict[str, Any]:
        return {
            "nonce": self.nonce,
            "input": self.input,
            "out": self.out,
            "settings": self.settings.as_dict(),
            "text_field": self.text_field,
            "group_column": self.group_column,
            "rows_per_task": self.rows_per_task,
            "sources": [list(source) for source in self.sources],
            "tasks": [task.as_dict() for task in self.tasks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            nonce=data["nonce"],
            input=data["input"],
            out=data["out"],
            settings=Settings.from_dict(data["settings"]),
            text_field=data["text_field"],
            group_column=data["group_column"],
            rows_per_task=data["rows_per_task"],
            sources=tuple((uri, rows, fingerprint) for uri, rows, fingerprint in data["sources"]),
            tasks=tuple(Task(**task) for task in data["tasks"]),
        )


def out_store(out: str) -> RunStore:
    """The stage's output folder as a RunStore (atomic writes on local disks, one PUT elsewhere)."""
    out = out if "://" in out else os.path.abspath(out)
    fs, root = url_to_fs(out)
    return RunStore(fs, root.rstrip("/"), out.rstrip("/"))


def part(nonce: str, task_id: str, kind: str) -> str:
    return f"{TASKS}/{nonce}/{task_id}.{kind}"


def _input_files(input_uri: str) -> tuple[Any, list[tuple[str, str, str]]]:
    """(fs, [(uri, path, format)]) of an input's files, in `evalsets.read_table`'s order."""
    try:
        fs, path = url_to_fs(input_uri)
    except (ValueError, ImportError) as error:
        raise evalsets.InputError(f"{input_uri}: cannot open: {error}") from None
    if not fs.exists(path):
        raise evalsets.InputError(f"{input_uri}: no such file or folder")
    if not fs.isdir(path):
        return fs, [(input_uri, path, _format_of(path))]
    root = path.rstrip("/")
    if fs.exists(f"{root}/state.json") and fs.exists(f"{root}/dataset_info.json"):
        return fs, [(input_uri, path, "table")]  # a datasets.save_to_disk folder: one table
    files = sorted(p for p in fs.find(path) if p.lower().endswith(INPUT_SUFFIXES) and "/." not in p)
    if not files:
        raise evalsets.InputError(f"{input_uri}: folder holds no .parquet, .jsonl, .json or .arrow files")
    return fs, [(fs.unstrip_protocol(file), file, _format_of(file)) for file in files]


def _format_of(path: str) -> str:
    return "parquet" if path.lower().endswith(".parquet") else "table"


def _fingerprint(fs: Any, path: str) -> str:
    with contextlib.suppress(Exception):
        return str(fs.checksum(path))  # size and modification time (local), ETag (object stores)
    return ""


def make_plan(
    input_uri: str,
    out: str,
    settings: Settings,
    text_field: str = "text",
    group_field: str | None = None,
    rows_per_task: int = ROWS_PER_TASK,
) -> Plan:
    """Cut the input into tasks; checks the columns as `cosmo decontaminate` does (InputError)."""
    if rows_per_task < 1:
        raise decontam.DecontamError(f"rows per task must be at least 1, got {rows_per_task}")
    if not settings.benchmarks:
        raise evalsets.BenchmarkError("at least one benchmark is needed")
    input_uri = input_uri if "://" in input_uri else os.path.abspath(input_uri)  # workers run elsewhere
    fs, files = _input_files(input_uri)
    columns: list[str] = []
    sources: list[tuple[str, int, str]] = []
    tasks: list[Task] = []
    for uri, path, kind in files:
        try:
            if kind == "parquet":
                with fs.open(path, "rb") as handle:
                    meta = pq.ParquetFile(handle)
                    rows, names = meta.metadata.num_rows, meta.schema_arrow.names
            else:
                table = evalsets.read_table(uri)
                rows, names = table.num_rows, table.column_names
        except (OSError, pa.ArrowException) as error:
            raise evalsets.InputError(f"{uri}: cannot read: {error}") from None
        columns += [name for name in names if name not in columns]
        sources.append((uri, rows, _fingerprint(fs, path)))
        # An empty file still gets a task: its schema belongs in the outputs, as in one process.
        for start in range(0, max(rows, 1), rows_per_task):
            tasks.append(Task(f"t{len(tasks):06d}", uri, start, min(start + rows_per_task, rows), kind))
    if text_field not in columns:
        raise evalsets.InputError(
            f"input has no column {text_field!r} (columns: {', '.join(columns)}); "
            "choose one with --text-field"
        )
    check_not_decontaminated(columns)
    return Plan(
        nonce=uuid.uuid4().hex[:12],
        input=input_uri,
        out=out_store(out).uri,
        settings=settings,
        text_field=text_field,
        group_column=group_column(columns, group_field),
        rows_per_task=rows_per_task,
        sources=tuple(sources),
        tasks=tuple(tasks),
    )


def read_spec(output: str, run: str) -> Any:
    """The run's GenerationRun from `<output>/<run>/spec.yaml` (DecontamError when unusable)."""
    from cosmoforge.spec import SpecError, parse_run, single_document

    store = RunStore.open(output, run)
    text = store.read_text("spec.yaml")
    if text is None:
        raise decontam.DecontamError(f"no spec.yaml under {store.uri}")
    source = store.url("spec.yaml")
    try:
        return parse_run(single_document(text, source), source)
    except SpecError as error:
        raise decontam.DecontamError(str(error).replace("\n", "; ")) from None


def settings_of(spec: Any) -> Settings:
    """The index settings of a run: its `spec.postprocess.decontaminate`."""
    wanted = spec.spec.postprocess.decontaminate
    return Settings(
        tuple(wanted.benchmarks), decontam.Config(wanted.ngram, wanted.threshold, wanted.min_block_chars)
    )


def plan_for_run(
    output: str,
    run: str,
    input_uri: str | None = None,
    text_field: str = "text",
    group_field: str | None = None,
    rows_per_task: int = ROWS_PER_TASK,
) -> Plan:
    """The run's decontamination stage as tasks: what `cosmo run` decontaminates, where it writes.

    The input is what the previous stage kept (`dedup/kept.parquet` when dedup is enabled, else
    the compacted `dataset/`), the output `<run>/decontam/`, the settings the spec's.
    """
    spec = read_spec(output, run)
    postprocess = spec.spec.postprocess
    if not postprocess.decontaminate.enabled:
        raise decontam.DecontamError(f"{run}: spec.postprocess.decontaminate.enabled is false")
    store = RunStore.open(output, run)
    source = input_uri or (store.url("dedup", KEPT) if postprocess.dedup.enabled else store.url("dataset"))
    return make_plan(source, store.url("decontam"), settings_of(spec), text_field, group_field, rows_per_task)


def load_plan(out: str) -> Plan | None:
    text = out_store(out).read_text(PLAN)
    return Plan.from_dict(json.loads(text)) if text is not None else None


def store_plan(plan: Plan, replace: bool = False) -> Plan:
    """The plan to work on: the stored one when it describes the same work, else `plan`.

    `replace` starts over with `plan` (and its cut) even then.
    """
    store = out_store(plan.out)
    current = load_plan(plan.out)
    if current is not None and current.same_work(plan) and not replace:
        return current
    if current is not None:
        store.remove(f"{TASKS}/{current.nonce}")  # partials of other work; their late writes are ignored
    store.write_text(PLAN, json.dumps(plan.as_dict(), indent=2))
    return plan


def is_done(plan: Plan) -> bool:
    text = out_store(plan.out).read_text(DONE)
    return text is not None and json.loads(text).get("nonce") == plan.nonce


def _listed(plan: Plan, suffix: str) -> dict[str, str]:
    """{task id: path} of the plan's partial files ending in `suffix`, from one listing."""
    store = out_store(plan.out)
    folder = store.path(TASKS, plan.nonce)
    store.fs.invalidate_cache(folder)
    if not store.fs.exists(folder):
        return {}
    found = {}
    for path in store.fs.ls(folder, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(f".{suffix}"):
            found[name.removesuffix(f".{suffix}")] = path
    return found


def finished_tasks(plan: Plan) -> set[str]:
    return set(_listed(plan, "summary.json")) & {task.id for task in plan.tasks}


def task_errors(plan: Plan) -> dict[str, str]:
    store = out_store(plan.out)
    errors = {}
    for task_id, path in _listed(plan, "error.json").items():
        with contextlib.suppress(FileNotFoundError):
            errors[task_id] = json.loads(store.fs.cat_file(path))["error"]
    return errors


# --- checking one task -------------------------------------------------------------------------


def read_task(task: Task) -> pa.Table:
    """The task's rows; for parquet, only the row groups that hold them are read."""
    if task.format != "parquet":
        return evalsets.read_table(task.uri).slice(task.start, task.stop - task.start)
    fs, path = url_to_fs(task.uri)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        wanted: list[int] = []
        first = offset = 0
        for group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if offset < task.stop and offset + rows > task.start:
                first = offset if not wanted else first
                wanted.append(group)
            offset += rows
        if not wanted:
            return parquet.schema_arrow.empty_table()
        table = parquet.read_row_groups(wanted)
    return table.slice(task.start - first, task.stop - task.start)


def _texts(table: pa.Table, text_field: str) -> list[str]:
    if text_field not in table.column_names:  # a file of a folder without it: null texts
        return [""] * table.num_rows
    return evalsets.text_column(table, text_field)


def run_task(plan: Plan, task: Task, checker: decontam.Checker) -> dict[str, Any]:
    """Check one range and write its partials, the summary last; returns the summary."""
    store = out_store(plan.out)
    table = read_task(task)
    texts = _texts(table, plan.text_field)
    verdicts = list(checker.check_all(texts))
    kept, removed = split_by_verdict(table, verdicts)
    groups = groups_of(table, plan.group_column)
    partial = decontam.Report.of(checker.index, grouped=groups is not None)
    for row, (verdict, text) in enumerate(zip(verdicts, texts, strict=True)):
        partial.add(verdict, groups[row] if groups is not None else None, empty=not text.strip())
    summary = partial.to_json()
    store.write_table(part(plan.nonce, task.id, "kept.parquet"), kept)
    store.write_table(part(plan.nonce, task.id, "removed.parquet"), removed)
    store.write_text(part(plan.nonce, task.id, "summary.json"), json.dumps({"task": task.id, **summary}))
    return summary


def write_error(plan: Plan, task_id: str, error: Exception | str) -> None:
    out_store(plan.out).write_text(
        part(plan.nonce, task_id, "error.json"), json.dumps({"task": task_id, "error": str(error)})
    )


# --- finalizing ----------------------------------------------------------------------------------


def _concatenate(store: RunStore, parts: list[str], target: str) -> None:
    """One parquet file of the parts in order, streamed a part at a time when their schemas agree."""
    schemas = []
    for path in parts:
        with store.fs.open(store.path(path), "rb") as handle:
            schemas.append(pq.read_schema(handle))
    with store.open_atomic(target) as sink:
        if all(schema.equals(schemas[0], check_metadata=False) for schema in schemas):
            with pq.ParquetWriter(sink, schemas[0], compression="zstd") as writer:
                for path in parts:
                    with store.fs.open(store.path(path), "rb") as handle:
                        writer.write_table(pq.read_table(handle))
        else:  # files of differing schemas: the same permissive union as evalsets.read_table
            tables = []
            for path in parts:
                with store.fs.open(store.path(path), "rb") as handle:
                    tables.append(pq.read_table(handle))
            pq.write_table(pa.concat_tables(tables, promote_options="permissive"), sink, compression="zstd")


class Incomplete(Exception):
    """Finalize was asked for before every task of the plan had its partial."""


def finalize(plan: Plan) -> dict[str, Any]:
    """Merge the partials into the outputs `cosmo decontaminate` writes; returns the report."""
    store = out_store(plan.out)
    missing = [task.id for task in plan.tasks if task.id not in finished_tasks(plan)]
    if missing:
        raise Incomplete(f"{len(missing)} task(s) without a partial, e.g. {missing[0]}")
    summaries = [
        json.loads(store.read_text(part(plan.nonce, task.id, "summary.json")) or "") for task in plan.tasks
    ]
    merged = decontam.Report.from_json(summaries[0])
    for summary in summaries[1:]:
        merged.merge(decontam.Report.from_json(summary))
    report = merged.as_dict()
    _concatenate(store, [part(plan.nonce, t.id, "kept.parquet") for t in plan.tasks], KEPT)
    _concatenate(store, [part(plan.nonce, t.id, "removed.parquet") for t in plan.tasks], REMOVED)
    store.write_bytes(REPORT_JSON, report_json(report))
    store.write_text(REPORT_MD, decontam.report_markdown(report))
    done = {
        "nonce": plan.nonce,
        "documents": report["documents"],
        "removed": report["documents_removed"],
        "tasks": len(plan.tasks),
    }
    store.write_text(DONE, json.dumps(done))
    store.remove(f"{TASKS}/{plan.nonce}")
    return report


def read_report(plan: Plan) -> dict[str, Any]:
    text = out_store(plan.out).read_text(REPORT_JSON)
    if text is None:
        raise FileNotFoundError(f"{plan.out}/{REPORT_JSON}")
    report: dict[str, Any] = json.loads(text)
    return report


# --- the queue -----------------------------------------------------------------------------------


async def ensure_topology(
    js: JetStreamContext, run: str, ack_wait: float = ACK_WAIT, max_deliver: int = MAX_DELIVER
) -> None:
    """The run's task stream (work queue, file storage) and the workers' durable pull consumer.

    The stream also keeps the consumer's max-deliveries advisories (`advisory_subject`), which no
    consumer takes: a submitter that was away when JetStream gave up on a task still finds out.
    """
    await queue.ensure_work_queue(js, stream_name(run), [tasks_subject(run), advisory_subject(run)])
    consumer = ConsumerConfig(
        durable_name=CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        filter_subject=tasks_subject(run),
    )
    try:
        await js.add_consumer(stream_name(run), consumer)
    except Exception as error:  # an existing consumer with other settings keeps them
        log.warning("keeping the existing %s consumer of %s: %s", CONSUMER, stream_name(run), error)


async def remove_stream(js: JetStreamContext, run: str) -> None:
    """Delete the run's task stream and with it the consumer: the stage is over."""
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(stream_name(run))
        log.info("removed the task stream %s", stream_name(run))


async def remove_stream_at(nats_url: str, run: str) -> None:
    """`remove_stream` on a server that may be gone: a leftover is removed when it can be, or kept."""
    try:
        nc = await nats.connect(nats_url, allow_reconnect=False, connect_timeout=5)
    except Exception as error:
        log.warning("could not reach %s to remove the task stream %s: %s", nats_url, stream_name(run), error)
        return
    try:
        await remove_stream(nc.jetstream(), run)
    except Exception as error:
        log.warning("could not remove the task stream %s: %s", stream_name(run), error)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def _message(kind: str, plan: Plan, task_id: str = "") -> bytes:
    return queue.encode({"kind": kind, "out": plan.out, "nonce": plan.nonce, "task": task_id})


async def _publish(js: JetStreamContext, run: str, data: bytes, msg_id: str, attempts: int = 5) -> bool:
    """Publish with a message id; returns False when the stream dropped it as a duplicate."""
    for attempt in range(1, attempts + 1):
        try:
            ack = await js.publish(tasks_subject(run), data, headers={"Nats-Msg-Id": msg_id})
            return not ack.duplicate
        except Exception:
            if attempt == attempts:
                raise
            await asyncio.sleep(min(0.5 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class TaskMessage:
    """A task message still in the run's stream."""

    seq: int
    nonce: str
    task: str  # "" for the finalize message


def _task_message(msg: Any, run: str) -> TaskMessage | None:
    if msg.subject != tasks_subject(run) or not msg.seq:
        return None
    try:
        body = json.loads(msg.data or b"")
        return TaskMessage(msg.seq, body["nonce"], body["task"])
    except (ValueError, KeyError, TypeError):
        return None


async def task_messages(js: JetStreamContext, run: str, last: int | None = None) -> list[TaskMessage]:
    """The task messages in the run's stream, in order, up to stream sequence `last`.

    NotFoundError when the run has no stream.
    """
    stream, found = stream_name(run), []
    info = await js.stream_info(stream)
    seq, end = info.state.first_seq, info.state.last_seq if last is None else min(last, info.state.last_seq)
    while info.state.messages and seq <= end:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=tasks_subject(run), next=True)
        except NotFoundError:
            break
        if (msg.seq or seq) > end:
            break
        message = _task_message(msg, run)
        if message is not None:
            found.append(message)
        seq = (msg.seq or seq) + 1
    return found


async def queued(js: JetStreamContext, run: str) -> set[tuple[str, str]]:
    """(nonce, task id, or "" for finalize) of every message still in the run's task stream."""
    try:
        return {(message.nonce, message.task) for message in await task_messages(js, run)}
    except NotFoundError:
        return set()


@dataclass(frozen=True)
class Stranded:
    """A task message JetStream will not deliver again: `deliveries` ended without an ack."""

    message: TaskMessage
    deliveries: int


async def _stranded_at(js: JetStreamContext, run: str, seq: int, deliveries: int) -> Stranded | None:
    """The task message at `seq` that an advisory named, while it is still in the stream."""
    try:
        message = _task_message(await js.get_msg(stream_name(run), seq=seq), run)
    except NotFoundError:  # acknowledged late, deleted by a resubmission, or no stream any more
        return None
    return None if message is None else Stranded(message, deliveries)


async def stranded(js: JetStreamContext, run: str) -> list[Stranded]:
    """Every task message of the run's stream that JetStream gave up on (NotFoundError: no stream).

    The server keeps no delivery count a client can read per message, so two signals are used:
    the max-deliveries advisories the stream keeps (each names a message by its sequence), and
    the consumer's state: when no delivered message waits for an ack, every task message
    delivered so far that is still in the stream was given up (a work queue drops a message as
    soon as it is acknowledged or terminated; undelivered ones lie past `delivered.stream_seq`).
    """
    stream = stream_name(run)
    consumer = await js.consumer_info(stream, CONSUMER)  # first: what is published later lies past it
    info = await js.stream_info(stream)
    found: dict[int, Stranded] = {}
    seq = info.state.first_seq
    while info.state.messages and seq <= info.state.last_seq:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=advisory_subject(run), next=True)
        except NotFoundError:
            break
        with contextlib.suppress(ValueError, KeyError, TypeError):
            advisory = json.loads(msg.data or b"")
            given_up = await _stranded_at(js, run, int(advisory["stream_seq"]), int(advisory["deliveries"]))
            if given_up is not None:
                found[given_up.message.seq] = given_up
        seq = (msg.seq or seq) + 1
    delivered = consumer.delivered.stream_seq if consumer.delivered else 0
    if not consumer.num_ack_pending and delivered:
        for message in await task_messages(js, run, last=delivered):
            found.setdefault(message.seq, Stranded(message, consumer.config.max_deliver or 0))
    return sorted(found.values(), key=lambda given_up: given_up.message.seq)


async def _drop_stranded(js: JetStreamContext, run: str) -> list[TaskMessage]:
    """Delete the messages JetStream gave up on and their advisories, so they can be queued again."""
    dropped = []
    for given_up in await stranded(js, run):
        with contextlib.suppress(NotFoundError):
            await js.delete_msg(stream_name(run), given_up.message.seq)
            dropped.append(given_up.message)
            log.info(
                "dropped task %s of plan %s, given up after %d deliveries, to queue it again",
                given_up.message.task or "finalize",
                given_up.message.nonce,
                given_up.deliveries,
            )
    await js.purge_stream(stream_name(run), subject=advisory_subject(run))
    return dropped


@dataclass
class Submitted:
    plan: Plan
    published: int = 0
    finished: int = 0
    queued: int = 0
    requeued: int = 0  # tasks of the plan JetStream had given up on, queued again
    done: bool = False


async def submit(
    nats_url: str, run: str, plan: Plan, ack_wait: float = ACK_WAIT, max_deliver: int = MAX_DELIVER
) -> Submitted:
    """Store the plan (or resume the stored one) and queue every task neither done nor queued.

    Failed tasks are retried: their error files are removed and the messages JetStream gave up
    on are deleted, so both are queued again. A plan already finalized only has its leftover
    stream removed.
    """
    plan = await asyncio.to_thread(store_plan, plan)
    result = Submitted(plan)
    nc = await nats.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    try:
        js = nc.jetstream()
        if await asyncio.to_thread(is_done, plan):
            await remove_stream(js, run)
            result.done = True
            return result
        await ensure_topology(js, run, ack_wait, max_deliver)
        store = out_store(plan.out)
        for task_id in await asyncio.to_thread(task_errors, plan):  # a retry of failed tasks
            await asyncio.to_thread(store.remove, part(plan.nonce, task_id, "error.json"))
        finished = await asyncio.to_thread(finished_tasks, plan)
        dropped = await _drop_stranded(js, run)
        result.requeued = sum(1 for message in dropped if message.nonce == plan.nonce and message.task)
        waiting = {task for nonce, task in await queued(js, run) if nonce == plan.nonce}
        result.finished, result.queued = len(finished), len(waiting - {""})
        token = uuid.uuid4().hex[:8]  # a fresh id per submission; retries within it reuse it
        for task in plan.tasks:
            if task.id not in finished and task.id not in waiting:
                result.published += await _publish(
                    js, run, _message("task", plan, task.id), f"{plan.nonce}.{task.id}.{token}"
                )
        if len(finished) == len(plan.tasks) and "" not in waiting:
            await _publish(js, run, _message("finalize", plan), f"{plan.nonce}.finalize.{token}")
        return result
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


class TaskFailed(decontam.DecontamError):
    """A task the workers gave up on (bad input or settings); resubmit once it is fixed."""


class TaskGivenUp(TaskFailed):
    """A task JetStream stopped delivering: every delivery ended without an ack (its worker died)."""


def given_up_message(plan: Plan, given_up: Stranded) -> str:
    """One line naming the task and what became of it."""
    if given_up.message.task:
        task = plan.task(given_up.message.task)
        what = f"task {task.id} (rows {task.start}-{task.stop} of {task.uri})"
    else:
        what = f"the merge of plan {plan.nonce} ({len(plan.tasks)} ranges into {plan.out})"
    return (
        f"{what} was given up: its worker died (or stopped answering) on each of the "
        f"{given_up.deliveries} deliveries, out of memory or crashed? See the workers' logs, then "
        "submit again to retry it (with --replan and a lower --rows-per-task to cut it smaller)"
    )


def _raise_failed(plan: Plan) -> None:
    errors = task_errors(plan)
    if errors:
        task_id, message = sorted(errors.items())[0]
        raise TaskFailed(f"task {task_id} failed: {message}")


class _Watch:
    """What JetStream says about the tasks of a plan being waited for: those it gave up on.

    The live advisories are heard from the moment `open` returns; the stream's stored ones and the
    consumer's state (`stranded`) are read at the first check and every `FULL_CHECK_SECONDS`,
    which covers a submitter that started, or reconnected, after JetStream gave up.
    """

    FULL_CHECK_SECONDS = 10.0

    def __init__(self, run: str, plan: Plan) -> None:
        self.run, self.plan = run, plan
        self.nc: Any = None
        self.advised: list[tuple[int, int]] = []  # (stream sequence, deliveries) from live advisories
        self.next_full_check = 0.0
        self.troubled = False
        self.closing = False

    @classmethod
    async def open(cls, nats_url: str, run: str, plan: Plan) -> _Watch:
        watch = cls(run, plan)
        watch.nc = await nats.connect(
            nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=watch._trouble
        )
        await watch.nc.subscribe(advisory_subject(run), cb=watch._advisory)
        return watch

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    async def _trouble(self, error: Exception) -> None:
        if not self.closing:
            log.warning("nats: %s (%s)", error or "connection error", type(error).__name__)

    async def _advisory(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            advisory = json.loads(msg.data)
            self.advised.append((int(advisory["stream_seq"]), int(advisory["deliveries"])))

    async def check(self) -> None:
        """Raise TaskGivenUp when JetStream gave up on a task of the plan that is not finished."""
        candidates: list[Stranded] = []
        try:
            while self.advised:
                given_up = await _stranded_at(self.js, self.run, *self.advised[0])
                self.advised.pop(0)
                candidates += [given_up] if given_up is not None else []
            if time.monotonic() >= self.next_full_check:
                candidates += await stranded(self.js, self.run)
                self.next_full_check = time.monotonic() + self.FULL_CHECK_SECONDS
        except NotFoundError:  # no stream or no consumer: only a finished plan's is ever removed
            if not await asyncio.to_thread(is_done, self.plan):
                raise decontam.DecontamError(
                    f"the task stream {stream_name(self.run)} or its consumer was removed before "
                    f"plan {self.plan.nonce} finished; submit again"
                ) from None
            return
        except (NatsError, OSError) as error:  # the server is away: storage still tells when it is done
            if not self.troubled:
                log.warning("cannot ask JetStream about the tasks (%s); still waiting", error)
            self.troubled = True
            return
        self.troubled = False
        mine = [c for c in candidates if c.message.nonce == self.plan.nonce]
        if not mine:
            return
        # Read after JetStream: a task's partials, and the plan's done.json, are written before
        # the ack that removes its message, so a message seen just before it left is not counted.
        finished = await asyncio.to_thread(finished_tasks, self.plan)
        for given_up in mine:
            if given_up.message.task not in finished and not await asyncio.to_thread(is_done, self.plan):
                raise TaskGivenUp(given_up_message(self.plan, given_up))

    async def close(self, stage_over: bool) -> None:
        try:
            if stage_over:
                with contextlib.suppress(NatsError, OSError):
                    await remove_stream(self.js, self.run)
        finally:
            self.closing = True
            with contextlib.suppress(Exception):
                await self.nc.close()


async def _wait(
    plan: Plan,
    timeout: float | None,
    interval: float,
    nats_url: str | None,
    run: str | None,
    tick: Callable[[], None] | None = None,
) -> dict[str, Any]:
    deadline = None if timeout is None else time.monotonic() + timeout
    # Listen to JetStream before the first look at storage: no advisory falls in between.
    watch = await _Watch.open(nats_url, run, plan) if nats_url and run else None
    finished = False
    try:
        while not await asyncio.to_thread(is_done, plan):
            await asyncio.to_thread(_raise_failed, plan)
            if watch is not None:
                await watch.check()
            if deadline is not None and time.monotonic() > deadline:
                done = len(await asyncio.to_thread(finished_tasks, plan))
                raise TimeoutError(
                    f"decontamination not finished after {timeout:.0f}s: "
                    f"{done} of {len(plan.tasks)} tasks done"
                )
            if tick is not None:
                tick()
            await asyncio.sleep(interval)
        finished = True
    finally:
        if watch is not None:
            await watch.close(stage_over=finished)
    return read_report(plan)


def wait_done(
    plan: Plan,
    timeout: float | None = None,
    interval: float = 0.5,
    *,
    nats_url: str | None = None,
    run: str | None = None,
) -> dict[str, Any]:
    """Block until the plan is finalized (returns the report) or a task failed (TaskFailed).

    With `nats_url` and `run`, a task JetStream gave up on fails the wait too (TaskGivenUp), and
    the run's task stream is removed once the plan is finalized.
    """
    return asyncio.run(_wait(plan, timeout, interval, nats_url, run))


# --- the worker ----------------------------------------------------------------------------------


def build_index(settings: Settings) -> decontam.Index:
    return decontam.build_index(evalsets.load_benchmarks(list(settings.benchmarks)), settings.config)


@dataclass
class WorkerConfig:
    nats_url: str
    run: str
    processes: int | None = None  # decontam.Checker processes; None: every core
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    idle_exit: float = 0.0  # exit after this many seconds without a task, once bound (0: never)
    ack_wait: float = ACK_WAIT  # replaced by the consumer's own setting once connected
    max_deliver: int = MAX_DELIVER  # likewise


class Stale(Exception):
    """A task of a plan that was replaced: acknowledged and dropped."""


class Worker:
    """Pulls one task at a time; the index and its Checker processes are built once and reused."""

    def __init__(self, config: WorkerConfig, settings: Settings | None = None) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self.closing = False
        self.tasks_done = 0
        self._signals = False
        self._idle_since: float | None = None  # since the last task; None until first bound
        self._settings: Settings | None = None
        self._checker: decontam.Checker | None = None
        if settings is not None:
            self._use(settings, build_index(settings))

    def _use(self, settings: Settings, index: decontam.Index) -> decontam.Checker:
        # Called on the event loop's thread, never from a worker thread: the Checker forks, and
        # its processes inherit the index (copy-on-write), never a pickled copy.
        self.close()
        with self._default_signals():
            self._checker = decontam.Checker(index, self.config.processes)
        self._settings = settings
        log.info(
            "index of %d benchmark items ready, %d checking process(es)",
            len(index.items),
            self._checker.workers,
            extra={"worker": self.config.worker_id},
        )
        return self._checker

    async def _checker_for(self, settings: Settings) -> decontam.Checker:
        if self._checker is not None and self._settings == settings:
            return self._checker
        index = await asyncio.to_thread(build_index, settings)
        return self._use(settings, index)

    def close(self) -> None:
        if self._checker is not None:
            self._checker.close()
            self._checker = None

    def stop(self) -> None:
        self.stopping.set()

    def handle_signals(self) -> None:
        """SIGTERM/SIGINT: finish the task in hand, then exit."""
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self.stop)
        self._signals = True

    @contextlib.contextmanager
    def _default_signals(self) -> Iterator[None]:
        """Fork the Checker's processes without our handlers, so that SIGTERM ends them.

        A child that inherits the event loop's handlers takes SIGTERM as a wake-up of the
        parent's loop and keeps running: `Checker.close()` would then wait for it forever.
        """
        if not self._signals:
            yield
            return
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
        try:
            yield
        finally:
            for signum in SIGNALS:
                loop.add_signal_handler(signum, self.stop)

    async def run(self) -> None:
        nc = await queue.connect_unless_stopped(
            self.config.nats_url,
            self.stopping,
            reconnect_time_wait=0.5,
            name=f"decontaminator-{self.config.worker_id}",
            error_cb=self._connection_error,
            disconnected_cb=self._disconnected,
            reconnected_cb=_reconnected,
        )
        if nc is None:  # SIGTERM before NATS ever answered
            self.closing = True
            return
        try:
            js = nc.jetstream()
            while not self.stopping.is_set():
                sub = await self._subscribe(js)
                if sub is None or not await self._pull(js, sub):
                    break
                with contextlib.suppress(Exception):  # the consumer is gone: wait for a new one
                    await sub.unsubscribe()
        finally:
            self.closing = True
            with contextlib.suppress(Exception):
                await nc.close()

    async def _connection_error(self, error: Exception) -> None:
        if not self.closing:
            log.warning("nats: %s (%s)", error or "connection error", type(error).__name__)

    async def _disconnected(self) -> None:
        if not self.closing:
            log.warning("nats: disconnected; reconnecting")

    def _idle_too_long(self) -> bool:
        if not self.config.idle_exit or self._idle_since is None:
            return False
        if time.monotonic() - self._idle_since <= self.config.idle_exit:
            return False
        log.info("idle for %.0fs: exiting", self.config.idle_exit)
        return True

    async def _subscribe(self, js: JetStreamContext) -> Any:
        """Bind to the consumer, waiting for the submitter to create it (the topology is not ours).

        None when stopped, or when `idle_exit` passed without a task since the worker last held one
        (a stage's stream is removed once it is finalized: its workers leave in their own time).
        """
        stream = stream_name(self.config.run)
        waiting = False
        while not self.stopping.is_set() and not self._idle_too_long():
            try:
                consumer = await js.consumer_info(stream, CONSUMER)
                sub = await js.pull_subscribe_bind(durable=CONSUMER, stream=stream)
            except Exception as error:  # not created yet, removed, or the server is restarting
                if not waiting:
                    log.info("waiting for the %s consumer of %s (%s)", CONSUMER, stream, type(error).__name__)
                    waiting = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)
                continue
            if consumer.config.ack_wait:
                self.config.ack_wait = float(consumer.config.ack_wait)
            if consumer.config.max_deliver:
                self.config.max_deliver = consumer.config.max_deliver
            if self._idle_since is None:
                self._idle_since = time.monotonic()
            log.info(
                "bound to the %s consumer of %s (ack wait %.0fs, %d deliveries at most)",
                CONSUMER, stream, self.config.ack_wait, self.config.max_deliver,
            )  # fmt: skip
            return sub
        return None

    async def _consumer_gone(self, js: JetStreamContext) -> bool:
        try:
            await js.consumer_info(stream_name(self.config.run), CONSUMER)
        except NotFoundError:
            return True
        except Exception:  # the server is away: not a sign the consumer is
            return False
        return False

    async def _pull(self, js: JetStreamContext, sub: Any) -> bool:
        """Take tasks until stopped or idle too long (False), or until the consumer is gone (True)."""
        while not self.stopping.is_set():
            try:
                messages = await sub.fetch(batch=1, timeout=1.0)
            except (TimeoutError, NatsTimeout):
                if self._idle_too_long():
                    return False
                continue
            except Exception as error:  # the consumer removed, or the server away: find out which
                if await self._consumer_gone(js):
                    log.info(
                        "the %s consumer of %s is gone (its stage is over, or it was removed)",
                        CONSUMER, stream_name(self.config.run),
                    )  # fmt: skip
                    return True
                log.warning("fetch failed (%s); retrying", error)
                await asyncio.sleep(0.5)
                continue
            for msg in messages:
                await self._handle(js, msg)
            self._idle_since = time.monotonic()
        return False

    async def _heartbeat(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.config.ack_wait / 3))
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _handle(self, js: JetStreamContext, msg: Msg) -> None:
        try:
            body = json.loads(msg.data)
            kind, out, nonce, task_id = body["kind"], body["out"], body["nonce"], body["task"]
        except (ValueError, KeyError, TypeError):
            log.error("dropping a message that is not a decontamination task: %r", msg.data[:200])
            await _settle(msg.term())
            return
        delivered = msg.metadata.num_delivered or 1
        beat = asyncio.create_task(self._heartbeat(msg))
        plan: Plan | None = None
        try:
            plan = await asyncio.to_thread(load_plan, out)
            if plan is None or plan.nonce != nonce:
                raise Stale()
            if kind == "finalize":
                await self._finalize(plan, delivered)
            else:
                await self._task(js, plan, plan.task(task_id), delivered)
            await self._ack(msg, plan, task_id)
        except Stale:
            log.info("dropping task %s of replaced plan %s", task_id or "finalize", nonce)
            await _settle(msg.ack())
        except decontam.DecontamError as error:  # bad input or settings: retrying cannot help
            log.error("task %s failed: %s", task_id or "finalize", error)
            if plan is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(write_error, plan, task_id or "finalize", error)
            await _settle(msg.term())
        except NatsError as error:  # the server is away: the task comes back after ack_wait
            log.warning(
                "task %s: %s (%s); it will be redelivered", task_id or "finalize", error, type(error).__name__
            )
            await _settle(msg.nak(delay=5.0))
        except Exception as error:  # storage trouble or a bug: another delivery, after a pause
            name = task_id or "finalize"
            if plan is None or not 0 < self.config.max_deliver <= delivered:
                log.error("task %s: %s; handing it back", name, error, exc_info=error)
                await _settle(msg.nak(delay=5.0))
                return
            # JetStream would drop it without a word: say why, for the submitter, and let it go.
            log.error("task %s: %s on its last delivery; giving up", name, error, exc_info=error)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    write_error, plan, name, f"{error} (on delivery {delivered}, the last)"
                )
            await _settle(msg.term())
        finally:
            beat.cancel()

    async def _ack(self, msg: Msg, plan: Plan, task_id: str) -> None:
        try:
            await msg.ack_sync()
        except NatsError:
            if not await asyncio.to_thread(is_done, plan):
                raise
            # The submitter removes the stream once the plan is finalized, maybe before this ack.
            log.info(
                "task %s: plan %s is finalized and its stream removed", task_id or "finalize", plan.nonce
            )

    async def _task(self, js: JetStreamContext, plan: Plan, task: Task, delivered: int) -> None:
        extra = {"worker": self.config.worker_id, "task": task.id}
        log.info(
            "task %s: rows %d-%d of %s (delivery %d)", task.id, task.start, task.stop, task.uri, delivered,
            extra=extra,
        )  # fmt: skip
        store = out_store(plan.out)
        summary_path = part(plan.nonce, task.id, "summary.json")
        if await asyncio.to_thread(is_done, plan):  # a late redelivery: the outputs are written
            log.info("task %s: plan %s is already finalized", task.id, plan.nonce, extra=extra)
            return
        if await asyncio.to_thread(store.fs.exists, store.path(summary_path)):
            log.info("task %s: already checked (redelivered after its partials landed)", task.id, extra=extra)
        else:
            checker = await self._checker_for(plan.settings)
            started = time.monotonic()
            summary = await asyncio.to_thread(run_task, plan, task, checker)
            seconds = time.monotonic() - started
            log.info(
                "task %s done: %d documents, %d removed in %.2fs (%.0f docs/s)", task.id,
                summary["documents"], summary["removed"], seconds, summary["documents"] / max(seconds, 1e-9),
                extra=extra,
            )  # fmt: skip
        self.tasks_done += 1
        if len(await asyncio.to_thread(finished_tasks, plan)) < len(plan.tasks):
            return
        # Every partial is in: one finalize message, however many workers noticed it at once.
        if await _publish(js, self.config.run, _message("finalize", plan), f"{plan.nonce}.finalize"):
            log.info("plan %s complete: finalize queued", plan.nonce, extra=extra)

    async def _finalize(self, plan: Plan, delivered: int) -> None:
        if await asyncio.to_thread(is_done, plan):
            return
        log.info("finalizing plan %s (delivery %d)", plan.nonce, delivered)
        try:
            report = await asyncio.to_thread(finalize, plan)
        except (FileNotFoundError, Incomplete):
            if await asyncio.to_thread(is_done, plan):  # another finalizer got there first
                return
            raise
        log.info(
            "plan %s finalized: %d documents, %d removed -> %s",
            plan.nonce,
            report["documents"],
            report["documents_removed"],
            plan.out,
        )


async def _reconnected() -> None:
    log.info("nats: reconnected")


async def _settle(reply: Any) -> None:
    """Ack, nak or term; when the server is away, the task comes back after ack_wait anyway."""
    try:
        await reply
    except Exception as error:
        log.warning("could not settle a task message (%s); it will be redelivered", error)


async def run_worker(config: WorkerConfig, settings: Settings | None = None) -> None:
    """A worker until SIGTERM/SIGINT (it finishes the task in hand) or `idle_exit`."""
    worker = Worker(config, settings)  # with settings, the Checker forks before any handler exists
    worker.handle_signals()
    try:
        await worker.run()
    finally:
        worker.close()


# --- everything on this machine ------------------------------------------------------------------


def worker_command(nats_url: str, run: str, processes: int | None, worker_id: str) -> list[str]:
    command = [sys.executable, "-m", "cosmoforge.cli", "decontaminate-worker", "--nats", nats_url]
    command += ["--run", run, "--worker-id", worker_id]
    return command + (["--workers", str(processes)] if processes else [])


def run_local(
    plan: Plan,
    run: str,
    workers: int,
    nats_url: str | None = None,
    processes: int | None = None,
    timeout: float | None = None,
    ack_wait: float = ACK_WAIT,
    max_deliver: int = MAX_DELIVER,
) -> dict[str, Any]:
    """Submit, run `workers` worker processes here until the plan is done, return the report.

    Without `nats_url` an embedded nats-server is started for the job. By default the cores are
    shared out between the workers (each gets cores / workers checking processes). A dead worker
    is restarted; a task JetStream gave up on fails it, as it fails `wait_done`.
    """
    processes = processes or max(1, decontam.default_workers() // workers)
    with contextlib.ExitStack() as stack:
        if nats_url is None:
            server = queue.EmbeddedNats()
            stack.callback(server.close)
            nats_url = server.start().url
        submitted = asyncio.run(submit(nats_url, run, plan, ack_wait, max_deliver))
        plan = submitted.plan
        if submitted.done:
            return read_report(plan)
        children: list[subprocess.Popen[bytes]] = []

        def stop_children() -> None:
            for child in children:
                if child.poll() is None:
                    child.terminate()
            for child in children:
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()

        stack.callback(stop_children)
        for number in range(workers):
            children.append(subprocess.Popen(worker_command(nats_url, run, processes, f"local-{number}")))

        def restart_dead() -> None:  # a dead worker is replaced, as a Deployment would
            for number, child in enumerate(children):
                if child.poll() is not None:
                    log.warning("worker local-%d exited with %s; restarting it", number, child.returncode)
                    children[number] = subprocess.Popen(
                        worker_command(nats_url, run, processes, f"local-{number}")
                    )

        return asyncio.run(_wait(plan, timeout, 0.5, nats_url, run, restart_dead))
