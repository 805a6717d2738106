"""The RunManager: the dispatcher's work behind the gRPC surface, one asyncio task per run.

Storage is the source of truth for what is done and the JetStream stream for what is left, so
the manager keeps little of its own: a registry of runs (spec and last phase) in a JetStream
key-value bucket, which lets a restarted dispatcher pick its active runs up again. A run is
known by its key (`queue.run_key`): `<namespace>/<name>` when the dispatcher serves a cluster
(`namespaced`), so the same name in two namespaces is two runs with two streams, two registry
entries and two folders (`<output.uri>/<namespace>/<name>/`); the bare name for the embedded
`cosmo run`, as it always was. Starting a run — the first time, again after it finished, or
after a restart — always does the same things in the same order:

1. validate the spec and write it to storage (workers read their settings from there);
2. get the stream ready: an *empty* stream is deleted and created afresh, which clears its
   duplicate window (prompts that failed earlier may be queued again) and is safe because an
   empty work-queue stream holds no unacknowledged prompt; a non-empty one is kept, and its
   duplicate window drops every prompt that is still queued or in flight when it is republished;
3. write the prompt manifest, then read which prompts already have a completion (after step
   2, so a prompt finished in between is seen as done and not sent to the model again);
4. publish the rest, with the prompt id as message id;
5. follow the queue and the workers' events until the queue is drained, then count the
   outcome from storage, compact the dataset and report.

Starting a known key again with the same spec changes nothing while the run is active (an
operator that restarts registers every run again) and resumes it once it is over; another spec
for an active run is refused (RunConflict), never queued beside the first. A run that is over
(or cancelled) starts afresh with whatever spec comes next: prompt ids carry the settings that
make a completion, so completions of unchanged prompts count as done and the rest are queued.

The embedded `cosmo run` runs this same manager in its own process (cli/embedded.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import pyarrow as pa
import pyarrow.compute as pc
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BadRequestError, BucketNotFoundError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from cosmoforge import queue
from cosmoforge.generation import metrics
from cosmoforge.generation.compact import Compacted, compact_dataset
from cosmoforge.prompts.builder import build_prompts
from cosmoforge.prompts.manifest import PublishCount, done_ids, pending_messages, unique_ids, write_prompts
from cosmoforge.prompts.seeds import SeedError
from cosmoforge.queue import ACK_WAIT_SECONDS, QueueState, consumer_limits, drained
from cosmoforge.queue import auth as queue_auth
from cosmoforge.runs.status import ACTIVE, PHASES, RunStatus, apply_event, outcome, parse_event
from cosmoforge.spec.model import GenerationRun, Phase, SpecError, dump_run, single_document
from cosmoforge.spec.validation import resolve_uri, validate_document
from cosmoforge.storage import FAILURES, GENERATIONS, PROMPTS, RunStore

log = logging.getLogger("cosmoforge.services.dispatcher")

REGISTRY_BUCKET = "cosmo-runs"
PUBLISH_ATTEMPTS = 5
# Polls in a row with messages in the stream that no worker can get before the run ends anyway.
STUCK_POLLS = 6


class RunNotFound(LookupError):
    pass


class RunConflict(Exception):
    """The request contradicts the run's state (another spec while active, cancelling a finished run)."""


class StartFailed(Exception):
    """Storage or the queue could not be prepared; nothing was started."""


def load_spec(text: str, source: str = "StartRun") -> GenerationRun:
    """One GenerationRun from YAML text; every problem becomes a SpecError naming field and reason."""
    run = validate_document(single_document(text, source, whole="(root)"), source)
    for seed in run.spec.seeds:
        seed.uri = resolve_uri(seed.uri)
    return run


@dataclass(frozen=True)
class Counted:
    prompts: int
    generated: int
    failed: int
    samples: dict[str, tuple[int, str]]
    wanted: pa.Array


def count_outcomes(store: RunStore) -> Counted:
    """Exact counts from storage: each manifest prompt is generated, failed, or neither."""
    wanted = unique_ids(store, PROMPTS)
    generated = unique_ids(store, GENERATIONS)
    generated = generated.filter(pc.is_in(generated, value_set=wanted)) if len(generated) else generated
    samples: dict[str, tuple[int, str]] = {}
    seen: set[str] = set()
    for table in store.read_tables(FAILURES, columns=["prompt_id", "error_kind", "error"]):
        keep = pc.and_(
            pc.is_in(table.column("prompt_id"), value_set=wanted),
            pc.invert(pc.is_in(table.column("prompt_id"), value_set=generated)),
        )
        for row in table.filter(keep).to_pylist():
            if row["prompt_id"] in seen:
                continue
            seen.add(row["prompt_id"])
            kind = row["error_kind"] or "unknown"
            count, example = samples.get(kind, (0, row["error"] or ""))
            samples[kind] = (count + 1, example)
    return Counted(len(wanted), len(generated), len(seen), samples, wanted)


@dataclass
class Tracked:
    """One run the dispatcher knows; `run` is None only for a registry entry it cannot parse."""

    status: RunStatus
    spec_yaml: str
    run: GenerationRun | None = None
    task: asyncio.Task[None] | None = None
    events: Subscription | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: metrics.RateMeter = field(default_factory=metrics.RateMeter)
    wandb: metrics.WandbLog | None = None
    # What the last start ended with, for an in-process caller (the embedded runner): the
    # compacted dataset, or the error that failed the run before the queue was drained.
    dataset: Compacted | None = None
    error: BaseException | None = None

    def bump(self) -> None:
        """Wake every watcher; each waits on the event it saw, so a new one replaces it."""
        self.status.updated_at = time.time()
        self.changed.set()
        self.changed = asyncio.Event()


class RunManager:
    def __init__(
        self,
        nats_url: str,
        *,
        poll_seconds: float = 0.5,
        compact: bool = True,
        use_wandb: bool = False,
        publish_window: int = 4096,
        ack_wait: float = ACK_WAIT_SECONDS,
        namespaced: bool = False,
    ):
        self.nats_url = nats_url
        self.namespaced = namespaced
        self.poll_seconds = poll_seconds
        self.compact = compact
        self.use_wandb = use_wandb
        self.publish_window = publish_window
        self.ack_wait = ack_wait
        self.runs: dict[str, Tracked] = {}
        self.lock = asyncio.Lock()
        self._nc: NATS | None = None
        self._kv: KeyValue | None = None

    def key_of(self, run: GenerationRun) -> str:
        """The run's key here: with its namespace when this manager serves a cluster."""
        return queue.run_key(run.metadata.namespace if self.namespaced else None, run.name)

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "RunManager.start() first"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    async def start(self) -> None:
        """Connect, open the registry and take up again every run that was active."""
        self._nc = await nats.connect(
            self.nats_url,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            name="cosmoforge-dispatcher",
            **queue_auth.connect_options(),
        )
        self._kv = await self._registry()
        for name, record in (await self._records()).items():
            saved = RunStatus.from_dict(record.get("status", {"run": name}))
            tracked = Tracked(saved, record.get("spec", ""))
            self.runs[name] = tracked
            if saved.phase not in ACTIVE:
                continue
            log.info("resuming run %s", name, extra={"run": name})
            # Counts start over: storage and the stream say where the run stands now.
            tracked.status = RunStatus(run=name, output_uri=saved.output_uri, started_at=saved.started_at)
            try:
                tracked.run = await asyncio.to_thread(load_spec, tracked.spec_yaml, f"registry:{name}")
                await self._launch(tracked)
            except (SpecError, StartFailed) as error:
                await self._fail(tracked, f"cannot resume: {error}")

    async def close(self) -> None:
        await asyncio.gather(*(self._stop(tracked) for tracked in self.runs.values()))
        for tracked in self.runs.values():
            if tracked.wandb is not None:
                tracked.wandb.finish()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    # --- the API the servicer calls -------------------------------------------------------

    async def start_run(self, spec_text: str) -> RunStatus:
        # Off the event loop: checking template overrides may take seconds.
        run = await asyncio.to_thread(load_spec, spec_text)
        spec_yaml = dump_run(run)
        key = self.key_of(run)
        async with self.lock:
            tracked = self.runs.get(key)
            if tracked is not None and tracked.status.phase in ACTIVE:
                if tracked.spec_yaml == spec_yaml:
                    return tracked.status
                raise RunConflict(f"run {key!r} is {tracked.status.phase} with another spec; cancel it first")
            store = RunStore.open(run.spec.output.uri, key)
            now = time.time()
            status = RunStatus(run=key, output_uri=store.uri, started_at=now, updated_at=now)
            if tracked is None:
                tracked = self.runs[key] = Tracked(status, spec_yaml, run)
            else:
                tracked.status, tracked.spec_yaml, tracked.run = status, spec_yaml, run
                tracked.tokens = metrics.RateMeter()
            try:
                await self._launch(tracked)
            except StartFailed as error:
                await self._fail(tracked, str(error))
                raise
            return tracked.status

    def status(self, name: str) -> RunStatus:
        tracked = self.runs.get(name)
        if tracked is None:
            raise self._unknown(name)
        return tracked.status

    def _unknown(self, name: str) -> RunNotFound:
        """Not found, naming the keys that end in `name`: a bare name misses a namespaced run."""
        similar = [key for key in sorted(self.runs) if key.rpartition("/")[2] == name and key != name]
        hint = f" (known with a namespace: {', '.join(similar)})" if similar else ""
        return RunNotFound(f"no run named {name!r}{hint}")

    def list_runs(self) -> list[RunStatus]:
        return [self.runs[name].status for name in sorted(self.runs)]

    async def watch(self, name: str, heartbeat: float = 5.0) -> AsyncIterator[tuple[RunStatus, str]]:
        """The status now, then on every change (or heartbeat) until a final phase was sent."""
        tracked = self.runs.get(name)
        if tracked is None:
            raise self._unknown(name)
        phase, sent_final = tracked.status.phase, tracked.status.final
        yield tracked.status, "snapshot"
        # Whether the status was final is taken before each yield: a run that ends while an
        # event is on its way (a seed error right after the start) still gets its final event.
        while not sent_final:
            woken = True
            if not tracked.status.final:
                changed = tracked.changed
                try:
                    await asyncio.wait_for(changed.wait(), heartbeat)
                except TimeoutError:
                    woken = False
            reason = "phase" if tracked.status.phase != phase else "progress" if woken else "heartbeat"
            phase, sent_final = tracked.status.phase, tracked.status.final
            yield tracked.status, reason

    async def cancel(self, name: str) -> RunStatus:
        async with self.lock:
            tracked = self.runs.get(name)
            if tracked is None:
                raise self._unknown(name)
            status = tracked.status
            if status.phase == Phase.cancelled.value:
                return status
            if status.final:
                raise RunConflict(f"run {name!r} already {status.phase}: nothing to cancel")
            await self._stop(tracked)
            with contextlib.suppress(NotFoundError):
                # Deleting (not purging) also clears the duplicate window, so a later start can
                # queue these prompts again.
                await self.js.delete_stream(queue.stream_name(name))
            status.message = f"cancelled with {status.queued} prompts still queued"
            status.phase, status.queued, status.in_flight = Phase.cancelled.value, 0, 0
            await self._settled(tracked)
            return status

    # --- one run ---------------------------------------------------------------------------

    async def _launch(self, tracked: Tracked) -> None:
        """Steps 1 and 2 (see the module docstring), then the rest in the run's own task."""
        run, key = tracked.run, tracked.status.run
        assert run is not None
        store = RunStore.open(run.spec.output.uri, key)
        try:
            await asyncio.to_thread(store.write_text, "spec.yaml", dump_run(run))
            await self._prepare_queue(key, run)
        except Exception as error:
            raise StartFailed(f"cannot prepare run {key!r}: {error}") from error
        if tracked.events is None:

            async def on_event(msg: Msg) -> None:
                self._on_event(tracked, msg)

            tracked.events = await self.nc.subscribe(queue.events_subject(key), cb=on_event)
        tracked.status.phase = Phase.pending.value
        tracked.dataset, tracked.error = None, None
        await self._save(tracked)
        self._export(tracked)
        tracked.bump()
        tracked.task = asyncio.create_task(self._drive(tracked, store), name=f"run-{key}")

    async def _prepare_queue(self, key: str, run: GenerationRun) -> None:
        name = queue.stream_name(key)
        with contextlib.suppress(NotFoundError):
            info = await self.js.stream_info(name)
            if info.state.messages == 0:
                await self.js.delete_stream(name)
        await queue.ensure_stream(self.js, key)
        limits = consumer_limits(run.spec.generation, self.ack_wait)
        try:
            await queue.ensure_consumer(
                self.js, key, limits.ack_wait, limits.max_deliver, limits.max_ack_pending
            )
        except BadRequestError as error:
            # The consumer lives on with prompts in flight; its old limits still work.
            log.warning("keeping the existing consumer of %s: %s", key, error, extra={"run": key})

    async def _drive(self, tracked: Tracked, store: RunStore) -> None:
        run, status = tracked.run, tracked.status
        key = status.run
        assert run is not None
        if self.use_wandb:
            config = run.spec.generation.model_dump(mode="json", by_alias=True)
            tracked.wandb = metrics.WandbLog.start(key, config)
        watcher = asyncio.create_task(self._follow_queue(tracked, until_drained=False))
        try:
            status.prompts = await asyncio.to_thread(write_prompts, store, build_prompts(run))
            done = await asyncio.to_thread(done_ids, store)
            published, count = await self._publish(key, store, done)
            watcher.cancel()
            status.already_done, status.published = count.already_done, published.stored
            status.generated = min(status.generated + count.already_done, status.prompts)
            metrics.PROMPTS_PUBLISHED.labels(key).inc(published.stored)
            status.phase = Phase.generating.value
            await self._save(tracked)
            self._export(tracked)
            tracked.bump()
            log.info(
                "run %s: %d prompts, %d already generated, %d queued",
                key, status.prompts, count.already_done, published.stored,
                extra={"run": key},
            )  # fmt: skip
            await self._follow_queue(tracked, until_drained=True)
            await self._finish(tracked, store)
        except asyncio.CancelledError:
            raise
        except SeedError as error:
            tracked.error = error
            await self._fail(tracked, f"seed error: {error}")
        except Exception as error:
            tracked.error = error
            log.exception("run %s failed", key, extra={"run": key})
            await self._fail(tracked, f"{type(error).__name__}: {error}")
        finally:
            watcher.cancel()

    async def _publish(
        self, name: str, store: RunStore, done: pa.Array
    ) -> tuple[queue.Published, PublishCount]:
        """Publish every pending prompt; a failed pass is simply repeated (the stream deduplicates)."""
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            count = PublishCount()
            try:
                messages = pending_messages(store, done, count)
                return await queue.publish_all(self.nc, name, messages, window=self.publish_window), count
            except (OSError, TimeoutError, nats.errors.Error) as error:
                if attempt == PUBLISH_ATTEMPTS:
                    raise
                log.warning("publishing %s failed (%s); again", name, error, extra={"run": name})
                await asyncio.sleep(min(2.0**attempt, 15.0))
        raise AssertionError("unreachable")

    async def _follow_queue(self, tracked: Tracked, until_drained: bool) -> None:
        name = tracked.status.run
        stuck, last_log = 0, 0.0
        while True:
            try:
                state = await self._queue_state(name)
            except Exception as error:  # the server restarting: the run goes on, look again
                log.warning("queue state of %s unavailable: %s", name, error, extra={"run": name})
                await asyncio.sleep(self.poll_seconds)
                continue
            stuck = stuck + 1 if queue.stuck(state) else 0
            changed = (state.stored, state.in_flight) != (tracked.status.queued, tracked.status.in_flight)
            tracked.status.queued, tracked.status.in_flight = state.stored, state.in_flight
            metrics.PROMPTS_QUEUED.labels(name).set(state.waiting)
            self._export(tracked)
            if changed:
                tracked.bump()
            if tracked.wandb is not None and time.monotonic() - last_log >= 5.0:
                last_log = time.monotonic()
                tracked.wandb.log(self._wandb_values(tracked.status))
            if until_drained and drained(state, stuck, patience=STUCK_POLLS):
                return
            await asyncio.sleep(self.poll_seconds)

    async def _queue_state(self, name: str) -> QueueState:
        return await queue.read_state(self.js, name)

    async def _finish(self, tracked: Tracked, store: RunStore) -> None:
        run, status = tracked.run, tracked.status
        assert run is not None
        counted = await asyncio.to_thread(count_outcomes, store)
        if self.compact:
            keep = counted.wanted.to_pylist()
            tracked.dataset = await asyncio.to_thread(compact_dataset, store, run.name, dump_run(run), keep)
        result = outcome(counted.prompts, counted.generated, counted.failed, counted.samples)
        status.prompts, status.generated, status.failed = counted.prompts, counted.generated, counted.failed
        status.errors = {kind: count for kind, (count, _) in counted.samples.items()}
        status.phase, status.message = result.phase, result.message
        log.info("run %s: %s", status.run, result.message, extra={"run": status.run, "phase": result.phase})
        await self._settled(tracked)

    async def _fail(self, tracked: Tracked, message: str) -> None:
        tracked.status.phase, tracked.status.message = Phase.failed.value, message
        log.error("run %s failed: %s", tracked.status.run, message, extra={"run": tracked.status.run})
        await self._settled(tracked)

    async def _settled(self, tracked: Tracked) -> None:
        """A final phase: persist it, stop listening for the run, tell watchers."""
        if tracked.events is not None:
            with contextlib.suppress(Exception):
                await tracked.events.unsubscribe()
            tracked.events = None
        if tracked.wandb is not None:
            tracked.wandb.log(self._wandb_values(tracked.status))
            tracked.wandb.finish()
            tracked.wandb = None
        await self._save(tracked)
        self._export(tracked)
        tracked.bump()

    async def _stop(self, tracked: Tracked) -> None:
        task = tracked.task
        if task is None:
            return
        # Cancelled again until it ends: on Python 3.11 `asyncio.wait_for` (inside every NATS
        # request) can swallow a cancellation that lands as its reply arrives, and the run's
        # loop would carry on while this waited for it forever.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()

    def _on_event(self, tracked: Tracked, msg: Msg) -> None:
        event = parse_event(msg.data)
        if event is None or tracked.status.final:
            return
        apply_event(tracked.status, event)
        tracked.status.tokens_per_second = tracked.tokens.add(event.tokens)
        self._export(tracked)
        tracked.bump()

    # --- registry, metrics ---------------------------------------------------------------------

    async def _registry(self) -> KeyValue:
        try:
            return await self.js.key_value(REGISTRY_BUCKET)
        except BucketNotFoundError:
            config = KeyValueConfig(bucket=REGISTRY_BUCKET, history=1, storage=StorageType.FILE)
            return await self.js.create_key_value(config)

    async def _records(self) -> dict[str, dict[str, Any]]:
        assert self._kv is not None
        try:
            keys = await self._kv.keys()
        except NoKeysError:
            return {}
        records = {}
        for key in keys:
            entry = await self._kv.get(key)
            if entry.value:
                records[key] = json.loads(entry.value)
        return records

    async def _save(self, tracked: Tracked) -> None:
        if self._kv is None:
            return
        record = {"status": tracked.status.to_dict(), "spec": tracked.spec_yaml}
        try:
            await self._kv.put(tracked.status.run, json.dumps(record).encode())
        except Exception as error:  # the run goes on; a restart would only resume it from scratch
            log.warning("cannot record run %s: %s", tracked.status.run, error)

    def _export(self, tracked: Tracked) -> None:
        status, name = tracked.status, tracked.status.run
        metrics.QUEUE_DEPTH.labels(name).set(status.queued)
        metrics.PROMPTS_IN_FLIGHT.labels(name).set(status.in_flight)
        metrics.RUN_PROMPTS.labels(name).set(status.prompts)
        metrics.RUN_DONE.labels(name).set(status.generated)
        metrics.RUN_FAILED.labels(name).set(status.failed)
        metrics.RUN_TOKENS_PER_SECOND.labels(name).set(status.tokens_per_second)
        metrics.set_phase(name, status.phase, PHASES)

    @staticmethod
    def _wandb_values(status: RunStatus) -> dict[str, float]:
        return {
            "generated": status.generated,
            "failed": status.failed,
            "queued": status.queued,
            "tokens": status.tokens,
            "tokens_per_second": status.tokens_per_second,
        }
