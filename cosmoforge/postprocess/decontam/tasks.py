"""A decontamination task's I/O: its messages on the run's task stream, its partial outputs.

A task message names a plan (`out`, `nonce`) and a range (`task`, or "" for the merge). Checking a
range writes its kept rows, removed rows and partial report, each file atomically, the partial
report last: its presence is what marks the task finished, so a redelivered task rewrites the
same files, never a duplicate row. Merging (`finalize`) concatenates the partials in plan order
into exactly what `cosmo decontaminate` writes for the same input.

The partial report of a range is its `decontam.Report` as JSON: what the final report needs and
nothing per document that was clean (per benchmark, the removed documents and the item ids they
correspond to, overall and per seed-data group; the best `NEAR_MISS_LIMIT` near-misses with
exact ratios; counts). Merged in row order they give the report of the whole input (tested byte
for byte against one process).

On the stream, JetStream gives up on a message after `max_deliver` deliveries without an ack;
`stranded` finds such messages, from the max-deliveries advisories the stream keeps and from the
consumer's state, so that a submitter can report them and queue them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import nats
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cosmoforge import queue, tables
from cosmoforge.postprocess import decontam, evalsets
from cosmoforge.postprocess.decontam.plan import (
    DONE,
    TASKS,
    Plan,
    Settings,
    Task,
    finished_tasks,
    out_store,
    part,
)
from cosmoforge.postprocess.stages import (
    KEPT,
    REMOVED,
    REPORT_JSON,
    REPORT_MD,
    groups_of,
    report_json,
    split_by_verdict,
)
from cosmoforge.queue import auth as queue_auth
from cosmoforge.queue.topology import (
    DECONTAM_CONSUMER,
    decontam_advisory_subject,
    decontam_stream_name,
    decontam_subject,
)
from cosmoforge.storage import RunStore

log = logging.getLogger("cosmoforge.postprocess.decontam.tasks")


# --- checking one task and merging ---------------------------------------------------------------


def build_index(settings: Settings) -> decontam.Index:
    return decontam.build_index(evalsets.load_benchmarks(list(settings.benchmarks)), settings.config)


def read_task(task: Task) -> pa.Table:
    """The task's rows; for parquet, only the row groups that hold them are read. An unreadable
    input is bad input (`InputError`): another delivery cannot help."""
    try:
        fs, path = url_to_fs(task.uri)
        return tables.read_rows(tables.TableFile(task.uri, path, task.format), task.start, task.stop, fs)
    except (tables.TableError, ValueError) as error:
        raise evalsets.InputError(str(error)) from None


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


# --- the task stream ----------------------------------------------------------------------------


async def remove_stream(js: JetStreamContext, run: str) -> None:
    """Delete the run's task stream and with it the consumer: the stage is over."""
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(decontam_stream_name(run))
        log.info("removed the task stream %s", decontam_stream_name(run))


async def remove_stream_at(nats_url: str, run: str) -> None:
    """`remove_stream` on a server that may be gone: a leftover is removed when it can be, or kept."""
    try:
        nc = await nats.connect(
            nats_url, allow_reconnect=False, connect_timeout=5, **queue_auth.connect_options()
        )
    except Exception as error:
        log.warning(
            "could not reach %s to remove the task stream %s: %s",
            queue_auth.redact(nats_url),
            decontam_stream_name(run),
            error,
        )
        return
    try:
        await remove_stream(nc.jetstream(), run)
    except Exception as error:
        log.warning("could not remove the task stream %s: %s", decontam_stream_name(run), error)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def encode_task(kind: str, plan: Plan, task_id: str = "") -> bytes:
    return queue.encode({"kind": kind, "out": plan.out, "nonce": plan.nonce, "task": task_id})


async def publish_task(js: JetStreamContext, run: str, data: bytes, msg_id: str, attempts: int = 5) -> bool:
    """Publish with a message id; returns False when the stream dropped it as a duplicate."""
    for attempt in range(1, attempts + 1):
        try:
            ack = await js.publish(decontam_subject(run), data, headers={"Nats-Msg-Id": msg_id})
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
    if msg.subject != decontam_subject(run) or not msg.seq:
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
    stream, found = decontam_stream_name(run), []
    info = await js.stream_info(stream)
    seq, end = info.state.first_seq, info.state.last_seq if last is None else min(last, info.state.last_seq)
    while info.state.messages and seq <= end:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=decontam_subject(run), next=True)
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


async def stranded_at(js: JetStreamContext, run: str, seq: int, deliveries: int) -> Stranded | None:
    """The task message at `seq` that an advisory named, while it is still in the stream."""
    try:
        message = _task_message(await js.get_msg(decontam_stream_name(run), seq=seq), run)
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
    stream = decontam_stream_name(run)
    consumer = await js.consumer_info(
        stream, DECONTAM_CONSUMER
    )  # first: what is published later lies past it
    info = await js.stream_info(stream)
    found: dict[int, Stranded] = {}
    seq = info.state.first_seq
    while info.state.messages and seq <= info.state.last_seq:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=decontam_advisory_subject(run), next=True)
        except NotFoundError:
            break
        with contextlib.suppress(ValueError, KeyError, TypeError):
            advisory = json.loads(msg.data or b"")
            given_up = await stranded_at(js, run, int(advisory["stream_seq"]), int(advisory["deliveries"]))
            if given_up is not None:
                found[given_up.message.seq] = given_up
        seq = (msg.seq or seq) + 1
    delivered = consumer.delivered.stream_seq if consumer.delivered else 0
    if not consumer.num_ack_pending and delivered:
        for message in await task_messages(js, run, last=delivered):
            found.setdefault(message.seq, Stranded(message, consumer.config.max_deliver or 0))
    return sorted(found.values(), key=lambda given_up: given_up.message.seq)


async def drop_stranded(js: JetStreamContext, run: str) -> list[TaskMessage]:
    """Delete the messages JetStream gave up on and their advisories, so they can be queued again."""
    dropped = []
    for given_up in await stranded(js, run):
        with contextlib.suppress(NotFoundError):
            await js.delete_msg(decontam_stream_name(run), given_up.message.seq)
            dropped.append(given_up.message)
            log.info(
                "dropped task %s of plan %s, given up after %d deliveries, to queue it again",
                given_up.message.task or "finalize",
                given_up.message.nonce,
                given_up.deliveries,
            )
    await js.purge_stream(decontam_stream_name(run), subject=decontam_advisory_subject(run))
    return dropped
