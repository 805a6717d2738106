"""The decontamination worker, `cosmo decontaminate-worker`: one range at a time off the task stream.

The pull loop is `queue.PullWorker`'s (connect, bind, fetch, heartbeats, drain on SIGTERM); this
module says what a task means. The benchmark index is built once per process, from the plan
(the spec's `postprocess.decontaminate`), and checked with `decontam.Checker`, whose forked
processes inherit that one index. A range's partials are written before its ack; the worker whose
partial completes the plan publishes one finalize message (deduplicated by its message id if
several notice at once), and whichever worker takes it merges the partials. Finalizing is itself
a task: if its worker dies, it is redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from cosmoforge.postprocess import decontam
from cosmoforge.postprocess.decontam.plan import (
    Plan,
    Settings,
    Task,
    finished_tasks,
    is_done,
    load_plan,
    out_store,
    part,
)
from cosmoforge.postprocess.decontam.tasks import (
    Incomplete,
    build_index,
    encode_task,
    finalize,
    publish_task,
    run_task,
    write_error,
)
from cosmoforge.queue.pull import PullWorker, settle
from cosmoforge.queue.topology import DECONTAM_ACK_WAIT_SECONDS, DECONTAM_CONSUMER, decontam_stream_name

log = logging.getLogger("cosmoforge.postprocess.decontam.worker")


@dataclass
class WorkerConfig:
    nats_url: str
    run: str
    processes: int | None = None  # decontam.Checker processes; None: every core
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    idle_exit: float = 0.0  # exit after this many seconds without a task, once bound (0: never)


class Stale(Exception):
    """A task of a plan that was replaced: acknowledged and dropped."""


class Worker(PullWorker):
    """Pulls one task at a time; the index and its Checker processes are built once and reused."""

    def __init__(self, config: WorkerConfig, settings: Settings | None = None) -> None:
        super().__init__(
            config.nats_url,
            decontam_stream_name(config.run),
            DECONTAM_CONSUMER,
            f"decontaminator-{config.worker_id}",
            idle_exit=config.idle_exit,
            ack_wait=DECONTAM_ACK_WAIT_SECONDS,
        )
        self.config = config
        self.tasks_done = 0
        self._settings: Settings | None = None
        self._checker: decontam.Checker | None = None
        if settings is not None:
            self._use(settings, build_index(settings))

    def _use(self, settings: Settings, index: decontam.Index) -> decontam.Checker:
        # Called on the event loop's thread, never from a worker thread: the Checker forks, and
        # its processes inherit the index (copy-on-write), never a pickled copy.
        self.close()
        with self.default_signals():
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

    async def handle(self, msg: Msg) -> None:
        try:
            body = json.loads(msg.data)
            kind, out, nonce, task_id = body["kind"], body["out"], body["nonce"], body["task"]
        except (ValueError, KeyError, TypeError):
            log.error("dropping a message that is not a decontamination task: %r", msg.data[:200])
            await settle(msg.term())
            return
        delivered = msg.metadata.num_delivered or 1
        plan: Plan | None = None
        try:
            plan = await asyncio.to_thread(load_plan, out)
            if plan is None or plan.nonce != nonce:
                raise Stale()
            if kind == "finalize":
                await self._finalize(plan, delivered)
            else:
                await self._task(plan, plan.task(task_id), delivered)
            await self._ack(msg, plan, task_id)
        except Stale:
            log.info("dropping task %s of replaced plan %s", task_id or "finalize", nonce)
            await settle(msg.ack())
        except decontam.DecontamError as error:  # bad input or settings: retrying cannot help
            log.error("task %s failed: %s", task_id or "finalize", error)
            if plan is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(write_error, plan, task_id or "finalize", error)
            await settle(msg.term())
        except NatsError as error:  # the server is away: the task comes back after ack_wait
            log.warning(
                "task %s: %s (%s); it will be redelivered", task_id or "finalize", error, type(error).__name__
            )
            await settle(msg.nak(delay=5.0))
        except Exception as error:  # storage trouble or a bug: another delivery, after a pause
            await self._retry_or_give_up(msg, plan, task_id or "finalize", delivered, error)

    async def _retry_or_give_up(
        self, msg: Msg, plan: Plan | None, name: str, delivered: int, error: Exception
    ) -> None:
        if plan is None or not 0 < self.max_deliver <= delivered:
            log.error("task %s: %s; handing it back", name, error, exc_info=error)
            await settle(msg.nak(delay=5.0))
            return
        # JetStream would drop it without a word: say why, for the submitter, and let it go.
        log.error("task %s: %s on its last delivery; giving up", name, error, exc_info=error)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(write_error, plan, name, f"{error} (on delivery {delivered}, the last)")
        await settle(msg.term())

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

    async def _task(self, plan: Plan, task: Task, delivered: int) -> None:
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
        if await publish_task(
            self.js, self.config.run, encode_task("finalize", plan), f"{plan.nonce}.finalize"
        ):
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


async def run_worker(config: WorkerConfig, settings: Settings | None = None) -> None:
    """A worker until SIGTERM/SIGINT (it finishes the task in hand) or `idle_exit`."""
    worker = Worker(config, settings)  # with settings, the Checker forks before any handler exists
    worker.handle_signals()
    try:
        await worker.run()
    finally:
        worker.close()
