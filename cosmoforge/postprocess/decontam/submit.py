"""Submitting a run's decontamination plan and waiting for it: `cosmo decontaminate-submit`.

- **submit**: store the plan (or resume the stored one) and queue one message per range on the
  run's task stream, except ranges already done or already queued; failed ranges are retried.
- **wait**: until the plan is done, then the run's task stream is removed. A task that wrote an
  error fails the wait, and so does one JetStream gave up on (`max_deliver` deliveries, none
  acked: its worker died each time), learnt from the server's max-deliveries advisory, which the
  stream also keeps, or from the consumer's state (`stranded`). Submitting again deletes such
  messages and queues their tasks again.
- **run_local**: all of it on this machine, with worker processes kept alive by a `Supervisor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cosmoforge import queue
from cosmoforge.postprocess import decontam
from cosmoforge.postprocess.decontam.plan import (
    Plan,
    finished_tasks,
    is_done,
    out_store,
    part,
    store_plan,
    task_errors,
)
from cosmoforge.postprocess.decontam.tasks import (
    Stranded,
    drop_stranded,
    encode_task,
    publish_task,
    queued,
    read_report,
    remove_stream,
    stranded,
    stranded_at,
)
from cosmoforge.processes import Supervisor
from cosmoforge.queue import auth as queue_auth
from cosmoforge.queue.topology import (
    DECONTAM_ACK_WAIT_SECONDS,
    DECONTAM_MAX_DELIVER,
    decontam_advisory_subject,
    decontam_stream_name,
    ensure_decontam_queue,
)

log = logging.getLogger("cosmoforge.postprocess.decontam.submit")


@dataclass
class Submitted:
    plan: Plan
    published: int = 0
    finished: int = 0
    queued: int = 0
    requeued: int = 0  # tasks of the plan JetStream had given up on, queued again
    done: bool = False


async def submit(
    nats_url: str,
    run: str,
    plan: Plan,
    ack_wait: float = DECONTAM_ACK_WAIT_SECONDS,
    max_deliver: int = DECONTAM_MAX_DELIVER,
) -> Submitted:
    """Store the plan (or resume the stored one) and queue every task neither done nor queued.

    Failed tasks are retried: their error files are removed and the messages JetStream gave up
    on are deleted, so both are queued again. A plan already finalized only has its leftover
    stream removed.
    """
    plan = await asyncio.to_thread(store_plan, plan)
    result = Submitted(plan)
    nc = await nats.connect(
        nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.5, **queue_auth.connect_options()
    )
    try:
        js = nc.jetstream()
        if await asyncio.to_thread(is_done, plan):
            await remove_stream(js, run)
            result.done = True
            return result
        await ensure_decontam_queue(js, run, ack_wait, max_deliver)
        store = out_store(plan.out)
        for task_id in await asyncio.to_thread(task_errors, plan):  # a retry of failed tasks
            await asyncio.to_thread(store.remove, part(plan.nonce, task_id, "error.json"))
        finished = await asyncio.to_thread(finished_tasks, plan)
        dropped = await drop_stranded(js, run)
        result.requeued = sum(1 for message in dropped if message.nonce == plan.nonce and message.task)
        waiting = {task for nonce, task in await queued(js, run) if nonce == plan.nonce}
        result.finished, result.queued = len(finished), len(waiting - {""})
        token = uuid.uuid4().hex[:8]  # a fresh id per submission; retries within it reuse it
        for task in plan.tasks:
            if task.id not in finished and task.id not in waiting:
                result.published += await publish_task(
                    js, run, encode_task("task", plan, task.id), f"{plan.nonce}.{task.id}.{token}"
                )
        if len(finished) == len(plan.tasks) and "" not in waiting:
            await publish_task(js, run, encode_task("finalize", plan), f"{plan.nonce}.finalize.{token}")
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
            nats_url,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=watch._trouble,
            **queue_auth.connect_options(),
        )
        await watch.nc.subscribe(decontam_advisory_subject(run), cb=watch._advisory)
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
                given_up = await stranded_at(self.js, self.run, *self.advised[0])
                self.advised.pop(0)
                candidates += [given_up] if given_up is not None else []
            if time.monotonic() >= self.next_full_check:
                candidates += await stranded(self.js, self.run)
                self.next_full_check = time.monotonic() + self.FULL_CHECK_SECONDS
        except NotFoundError:  # no stream or no consumer: only a finished plan's is ever removed
            if not await asyncio.to_thread(is_done, self.plan):
                raise decontam.DecontamError(
                    f"the task stream {decontam_stream_name(self.run)} or its consumer was removed before "
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
    tick: Callable[[], object] | None = None,
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
    ack_wait: float = DECONTAM_ACK_WAIT_SECONDS,
    max_deliver: int = DECONTAM_MAX_DELIVER,
) -> dict[str, Any]:
    """Submit, run `workers` worker processes here until the plan is done, return the report.

    Without `nats_url` an embedded nats-server is started for the job. By default the cores are
    shared out between the workers (each gets cores / workers checking processes). A dead worker
    is restarted, as a Deployment would; a task JetStream gave up on fails it, as it fails
    `wait_done`.
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
        url = nats_url
        pool = Supervisor(workers, lambda index, _: worker_command(url, run, processes, f"local-{index}"))
        stack.enter_context(pool)
        return asyncio.run(_wait(plan, timeout, 0.5, nats_url, run, pool.supervise))
