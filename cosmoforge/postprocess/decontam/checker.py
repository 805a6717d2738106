"""Checking on every core: batches of documents spread over this process and forked ones.

Kept apart from the checking itself, as an executor is apart from the step it runs: the same
`check_batch` runs here, in a gRPC service and in queue workers.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cosmoforge.postprocess.decontam.index import Index
from cosmoforge.postprocess.decontam.model import Verdict
from cosmoforge.postprocess.decontam.verify import check_batch, clean_verdict

BATCH_SIZE = 256  # documents per batch at most
BATCH_CHARS = 1 << 19  # and about this many characters: numpy's per-call cost is shared, workers stay busy

_Packed = tuple[list[int], dict[int, Verdict]]


def _pack(verdicts: list[Verdict]) -> _Packed:
    """Verdicts for the way back from a forked process: token counts, and those with candidates."""
    found = {n: verdict for n, verdict in enumerate(verdicts) if verdict.matches or verdict.near_misses}
    return [verdict.tokens for verdict in verdicts], found


def _unpack(packed: _Packed) -> list[Verdict]:
    tokens, found = packed
    return [found.get(n) or clean_verdict(count) for n, count in enumerate(tokens)]


def _serve(connection: Any, index: Index, inherited: list[Any]) -> None:
    """A forked process: check each batch that arrives and send back its verdicts, until told to stop.

    The caller's ends of the pipes (this process's and its elder siblings') came along with the
    fork: closed here, so that the pipe ends when the caller does, and this process with it.
    """
    for end in inherited:
        end.close()
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message is None:
            return
        number, docs = message
        try:
            reply: tuple[int, _Packed | None, BaseException | None] = (
                number,
                _pack(check_batch(docs, index)),
                None,
            )
        except Exception as error:  # raised in the caller, as if it had checked the batch
            reply = (number, None, error)
        connection.send(reply)


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= size or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _start_method() -> str:
    # Fork hands the index to each worker by copy-on-write memory, never by pickling; where
    # fork is missing the index is pickled once per worker at start, still never per batch.
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(eq=False)
class _Pending:
    """A batch handed to a forked process. `done` is set when its verdicts (or the error checking
    it raised) are back, or when they never will be: its process died, and neither is set."""

    batch: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    packed: _Packed | None = None
    error: BaseException | None = None
    claimed: bool = False  # the caller checks it instead: not sent if not sent yet


class _Forked:
    """One forked checking process with its own pipe, and two threads so that the caller never
    waits on it: one sends the batches as the process takes them, one collects the verdicts.

    A process that dies loses only the batches it was sent: they are marked lost, and the
    caller checks them itself.
    """

    def __init__(self, context: Any, index: Index, elder: list[_Forked]) -> None:
        self.connection, child = context.Pipe()
        inherited = [self.connection, *(forked.connection for forked in elder)]
        self.process = context.Process(target=_serve, args=(child, index, inherited), daemon=True)
        self.process.start()
        child.close()
        self.lock = threading.Lock()
        self.alive = True
        self.waiting = 0  # batches handed over and not back
        self._sent: dict[int, _Pending] = {}
        self._outbox: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._numbers = itertools.count()

    def start(self) -> None:
        """Start the threads, once every process is forked: a fork copies no thread but may copy
        a lock one of them holds."""
        threading.Thread(target=self._send, name="decontam-send", daemon=True).start()
        threading.Thread(target=self._receive, name="decontam-receive", daemon=True).start()

    def hand_over(self, batch: list[str]) -> _Pending:
        pending = _Pending(batch)
        with self.lock:
            self.waiting += 1
        self._outbox.put(pending)
        return pending

    def _settle(
        self, pending: _Pending, packed: _Packed | None = None, error: BaseException | None = None
    ) -> None:
        with self.lock:
            self.waiting -= 1
        pending.packed, pending.error = packed, error
        pending.done.set()

    def _send(self) -> None:
        while (pending := self._outbox.get()) is not None:
            number = next(self._numbers)
            with self.lock:
                go = self.alive and not pending.claimed
                if go:
                    self._sent[number] = pending
            if not go:
                self._settle(pending)
                continue
            # If the process is gone, the receiving thread marks its batches lost.
            with contextlib.suppress(OSError):
                self.connection.send((number, pending.batch))
        with contextlib.suppress(OSError):
            self.connection.send(None)

    def _receive(self) -> None:
        while True:
            try:
                number, packed, error = self.connection.recv()
            except (EOFError, OSError):
                break
            with self.lock:
                pending = self._sent.pop(number)
            self._settle(pending, packed, error)
        with self.lock:
            self.alive, lost = False, list(self._sent.values())
            self._sent.clear()
        if lost or self.process.exitcode not in (None, 0):
            logging.getLogger(__name__).warning(
                "a decontamination process ended (exit code %s); its %d batches are checked by the caller",
                self.process.exitcode,
                len(lost),
            )
        for pending in lost:
            self._settle(pending)

    def close(self) -> None:
        self._outbox.put(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


QUEUED = 16  # batches waiting for each forked process at most


class Checker:
    """`workers` processes that check batches: this one and `workers - 1` forked ones holding the index.

    Started once and reused for every corpus: a long-running worker (or a benchmark) pays the
    start only once; `check_all` below is the one-shot form. The calling thread hands batches to
    the forked processes until each has `QUEUED` waiting, and checks the next batch itself
    whenever they have, so every core is busy and the caller's share never crosses a pipe.
    The queue is deep because batches differ: one document can share n-grams with hundreds of
    items, and the forked processes must not run dry while the caller checks it. At the end of
    the input the caller takes back the last batches not yet sent, so the queue does not leave
    it idle either. A forked process that dies (out of memory, killed) loses nothing: the
    caller checks the batches it held and all that follow. Calls from several threads share
    the processes, and one of them at a time checks here (they would only share one interpreter).
    """

    def __init__(self, index: Index, workers: int | None = None, batch_size: int = BATCH_SIZE) -> None:
        self.index = index
        self.workers = default_workers() if workers is None else workers
        self.batch_size = batch_size
        self._lock = threading.Lock()  # choosing a forked process
        self._here = threading.Lock()  # held by the thread checking in this process
        context = multiprocessing.get_context(_start_method())
        self._forked: list[_Forked] = []
        for _ in range(self.workers - 1):
            self._forked.append(_Forked(context, index, self._forked))
        for forked in self._forked:
            forked.start()

    def processes(self) -> list[int]:
        """Process ids of the forked processes still checking."""
        return [forked.process.pid for forked in self._forked if forked.alive]

    def _hand_over(self, batch: list[str]) -> _Pending | None:
        """`batch` on its way to a forked process, or None when they all have enough waiting."""
        with self._lock:
            free = [forked for forked in self._forked if forked.alive and forked.waiting < QUEUED]
            if not free:
                return None
            return min(free, key=lambda forked: forked.waiting).hand_over(batch)

    def _check_here(self, batch: list[str]) -> list[Verdict]:
        with self._here:
            return check_batch(batch, self.index)

    def _take_back(self, ahead: deque[_Pending | list[Verdict]]) -> bool:
        """Check here the latest batch still waiting for a forked process, if this process is free.

        The first batches not back are left alone: the forked processes are on them.
        """
        waiting = [
            n for n, entry in enumerate(ahead) if isinstance(entry, _Pending) and not entry.done.is_set()
        ]
        if len(waiting) < self.workers or not self._here.acquire(blocking=False):
            return False
        try:
            entry = ahead[waiting[-1]]
            assert isinstance(entry, _Pending)
            entry.claimed = True
            ahead[waiting[-1]] = check_batch(entry.batch, self.index)
        finally:
            self._here.release()
        return True

    def _verdicts(self, entry: _Pending | list[Verdict]) -> list[Verdict]:
        if isinstance(entry, list):
            return entry
        if entry.error is not None:
            raise entry.error
        if entry.packed is None:  # lost with its process
            return self._check_here(entry.batch)
        return _unpack(entry.packed)

    def _settle(self, ahead: deque[_Pending | list[Verdict]], keep: int) -> Iterator[Verdict]:
        """Verdicts of the batches at the front that are done, and of more until `keep` remain."""
        while ahead:
            front = ahead[0]
            if isinstance(front, _Pending) and not front.done.is_set():
                if len(ahead) <= keep:
                    return
                if not self._take_back(ahead):
                    front.done.wait()
                continue
            yield from self._verdicts(ahead.popleft())

    def check_all(self, docs: Iterable[str]) -> Iterator[Verdict]:
        """Verdicts in input order; the same ones whatever the worker count."""
        ahead: deque[_Pending | list[Verdict]] = deque()  # in input order
        for batch in _batches(docs, self.batch_size):
            ahead.append(self._hand_over(batch) or self._check_here(batch))
            # Bounded: a slow process holds back at most so many finished batches behind it.
            yield from self._settle(ahead, keep=4 * QUEUED * self.workers)
        yield from self._settle(ahead, keep=0)

    def close(self) -> None:
        for forked in self._forked:
            forked.close()
        self._forked = []

    def __enter__(self) -> Checker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def check_all(
    docs: Iterable[str], index: Index, workers: int | None = None, batch_size: int = BATCH_SIZE
) -> Iterator[Verdict]:
    """Verdicts in input order; the same ones whatever `workers` is."""
    with Checker(index, workers, batch_size) as checker:
        yield from checker.check_all(docs)
