"""Continuous batching on llama.cpp: several requests decoded in one batch (`--parallel N`).

On a CPU, decoding one token of a small model costs about the same for one sequence as for
eight: the weights are read once per step either way. So, as vLLM and TGI do on GPUs, one
thread runs a decode loop over up to N sequences, each with its own llama.cpp sequence id in a
shared KV cache. Between two steps finished sequences leave (their cache cells are dropped)
and waiting requests join (their whole prompt goes into the next step's batch), so a long
answer never holds up a short one. Each sequence samples with its own sampler chain (its
temperature, top-p, seed, repetition penalty and grammar) from its own row of logits, and
`TextStream` cuts its text at its stop strings and `max_new_tokens`. Grammar-constrained
requests are batched like the others: the grammar is one more sampler in the sequence's chain.
A step's tokens reach the event loop in one hand-off, which the next step waits for (briefly), so
the loop's thread never takes a core from llama.cpp's threads mid-step (`_deliver`).

The low-level API (`llama_batch_init`, `llama_decode`, `llama_sampler_sample`) is used
directly: llama-cpp-python's `Llama` object decodes one sequence at a time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cosmoforge.services.modelserver.decoding import TextStream
from cosmoforge.services.modelserver.engine import (
    Engine,
    Finished,
    Generation,
    Job,
    SamplingParams,
    Token,
    drain,
    room_for,
)
from cosmoforge.services.modelserver.llama import (
    DEFAULT_MIN_P,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    PENALTY_LAST_N,
    LlamaModel,
    seed_of,
)

Event = Token | Finished | BaseException
# How long a decode step waits for the event loop to take the previous step's tokens: long
# enough for a loop with nothing else to do, short enough that a busy one never stalls decoding.
HANDOFF_WAIT = 0.02


@dataclass
class Sequence:
    """One request in the decode loop."""

    pending: list[int]  # tokens to feed at the next step: the prompt, then the last sampled token
    text: TextStream
    sampler: Any  # llama_sampler_p: this request's chain, freed when it leaves
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Event]
    cancelled: threading.Event = field(default_factory=threading.Event)
    seq_id: int = -1
    pos: int = 0  # position of pending[0] in the sequence


class BatchedEngine(Engine):
    def __init__(self, model: LlamaModel, parallel: int):
        import llama_cpp

        self.model = model
        self.parallel = parallel
        self.info = model.info(parallel)
        params = llama_cpp.llama_context_default_params()
        # Every sequence may use the whole per-request context, so the cache holds N of them.
        params.n_ctx = model.n_ctx * parallel
        self.n_batch = model.n_ctx + parallel  # one full prompt plus a token for every other slot
        params.n_batch = self.n_batch
        params.n_ubatch = 512
        params.n_seq_max = parallel
        params.n_threads = params.n_threads_batch = model.threads
        # A cache stream per sequence: a token attends to its own sequence's cells only, not to
        # every cell of one shared cache under a mask (measured: a step of 8 costs 30% less CPU).
        params.kv_unified = False
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model.llama._model.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context for batched decoding")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.free_ids = list(range(parallel))
        self.active: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.wake = threading.Condition()
        self.closed = False
        self.counts = {"requests": 0, "steps": 0, "tokens": 0, "batched_tokens": 0}
        self.seconds = {"decode": 0.0, "sample": 0.0, "handoff": 0.0}  # where the decode loop's time goes
        # A step's tokens, handed to the event loop in one call: a wake-up per token would put
        # the loop's thread on a core eight times a step, preempting llama.cpp's own threads.
        self.outbox: list[tuple[Sequence, Event]] = []
        self.thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self.thread.start()

    async def submit(self, job: Job) -> Generation:
        tokens = self.model.tokens(job)
        budget = room_for(job, len(tokens), self.model.n_ctx)
        sampler = self._sampler(job.params, self.model.grammar(job.schema))
        queue: asyncio.Queue[Event] = asyncio.Queue()
        text = self.model.text_stream(job.params, budget)
        sequence = Sequence(tokens, text, sampler, asyncio.get_running_loop(), queue)
        with self.wake:
            self.counts["requests"] += 1
            self.waiting.append(sequence)
            self.wake.notify()
        return Generation(len(tokens), drain(queue, sequence.cancelled), job.params.seed)

    def _sampler(self, params: SamplingParams, gbnf: str | None) -> Any:
        """The request's sampler chain, in the order llama-cpp-python's own generate uses."""
        import llama_cpp as ll

        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = lambda sampler: ll.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        if params.repetition_penalty not in (None, 1.0):
            n_vocab = self.model.llama.n_vocab()
            add(ll.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, params.repetition_penalty, 0.0, 0.0))
        if gbnf is not None:
            add(ll.llama_sampler_init_grammar(self.model.vocab, gbnf.encode("utf-8"), b"root"))
        if params.greedy:
            add(ll.llama_sampler_init_greedy())
            return chain
        add(ll.llama_sampler_init_top_k(params.top_k or DEFAULT_TOP_K))
        add(ll.llama_sampler_init_top_p(params.top_p or DEFAULT_TOP_P, 1))
        add(ll.llama_sampler_init_min_p(DEFAULT_MIN_P, 1))
        add(ll.llama_sampler_init_temp(params.temperature or 1.0))
        add(ll.llama_sampler_init_dist(seed_of(params)))
        return chain

    # --- the decode loop (its own thread; the only one that touches the context) -----------------

    def _loop(self) -> None:
        while self._admit():
            outputs = self._fill_batch()
            started = time.perf_counter()
            rc = self._decode()
            decoded = time.perf_counter()
            if rc != 0:
                self._fail_all(RuntimeError(f"llama_decode failed with status {rc}"))
                self._deliver()
                continue
            for sequence, index in outputs:
                self._sample(sequence, index)
            self.counts["steps"] += 1
            self.counts["batched_tokens"] += len(outputs)
            self.seconds["decode"] += decoded - started
            self.seconds["sample"] += time.perf_counter() - decoded
            for sequence in [s for s in self.active if s.text.finish is not None or s.cancelled.is_set()]:
                self._leave(sequence)
            sampled = time.perf_counter()
            self._deliver()
            self.seconds["handoff"] += time.perf_counter() - sampled

    def _admit(self) -> bool:
        """Let waiting requests take free slots; block while there is nothing to decode."""
        with self.wake:
            while not self.active and not self.waiting and not self.closed:
                self.wake.wait()
            if self.closed:
                return False
            room = self.n_batch - len(self.active)
            while self.waiting and self.free_ids:
                sequence = self.waiting[0]
                if sequence.cancelled.is_set():
                    self.waiting.popleft()
                    self._free_sampler(sequence)
                    continue
                if len(sequence.pending) > room:  # joins at the next step, when the batch has room
                    break
                self.waiting.popleft()
                sequence.seq_id = self.free_ids.pop()
                room -= len(sequence.pending)
                self.active.append(sequence)
        return True

    def _fill_batch(self) -> list[tuple[Sequence, int]]:
        """Put every active sequence's pending tokens in the batch; logits for each last one."""
        batch, n, outputs = self.batch, 0, []
        for sequence in self.active:
            for offset, token in enumerate(sequence.pending):
                batch.token[n] = token
                batch.pos[n] = sequence.pos + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = sequence.seq_id
                batch.logits[n] = offset == len(sequence.pending) - 1
                n += 1
            outputs.append((sequence, n - 1))
            sequence.pos += len(sequence.pending)
        batch.n_tokens = n
        return outputs

    def _decode(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_decode(self.ctx, self.batch))

    def _sample(self, sequence: Sequence, index: int) -> None:
        import llama_cpp

        token = int(llama_cpp.llama_sampler_sample(sequence.sampler, self.ctx, index))
        piece = sequence.text.push(token)
        self.counts["tokens"] += 1
        if piece:
            self.outbox.append((sequence, Token(piece)))
        sequence.pending = [token]

    def _deliver(self, wait: bool = True) -> None:
        """Hand the step's events to their event loops, and let the loops write them out before
        the next step starts.

        llama.cpp's threads wait for one another at every operation of a step, spinning; on a
        machine with as many cores as threads, the event loop's thread waking mid-step takes a
        core from one of them and the others spin until it is back. So a step's tokens go over
        in one call per loop, and the next step waits (a little, at most) for the loop to have
        run the streams they woke.
        """
        if not self.outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Event]]] = {}
        for sequence, event in self.outbox:
            by_loop.setdefault(sequence.loop, []).append((sequence, event))
        self.outbox = []
        handed: list[threading.Event] = []
        for loop, events in by_loop.items():
            done = threading.Event()
            try:
                loop.call_soon_threadsafe(_put_all, loop, events, done)
            except RuntimeError:  # a loop already closed has no reader left
                continue
            handed.append(done)
        deadline = time.monotonic() + (HANDOFF_WAIT if wait else 0.0)
        for done in handed:
            done.wait(max(0.0, deadline - time.monotonic()))

    def _leave(self, sequence: Sequence) -> None:
        import llama_cpp

        if not sequence.cancelled.is_set():
            self.outbox.append((sequence, Finished(sequence.text.finish or "stop", sequence.text.count)))
        llama_cpp.llama_memory_seq_rm(self.memory, sequence.seq_id, -1, -1)
        self._free_sampler(sequence)
        with self.wake:
            self.active.remove(sequence)
            self.free_ids.append(sequence.seq_id)

    def _fail_all(self, error: BaseException) -> None:
        for sequence in list(self.active):
            self.outbox.append((sequence, error))
            sequence.cancelled.set()
            self._leave(sequence)

    @staticmethod
    def _free_sampler(sequence: Sequence) -> None:
        import llama_cpp

        if sequence.sampler:
            llama_cpp.llama_sampler_free(sequence.sampler)
            sequence.sampler = None

    def stats(self) -> dict[str, Any]:
        counts = dict(self.counts)
        mean = counts["batched_tokens"] / counts["steps"] if counts["steps"] else 0.0
        seconds = {f"{name}_seconds": round(value, 3) for name, value in self.seconds.items()}
        return {
            "engine": "batched",
            "parallel": self.parallel,
            **counts,
            **seconds,
            "mean_batch": round(mean, 2),
            "active": len(self.active),
            "waiting": len(self.waiting),
        }

    def close(self) -> None:
        import llama_cpp

        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=30)
        self._fail_all(RuntimeError("the model server is shutting down"))
        self._deliver(wait=False)  # called on the event loop's thread: it cannot wait for itself
        for sequence in self.waiting:
            self._free_sampler(sequence)
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        self.ctx = None


def _put_all(
    loop: asyncio.AbstractEventLoop, events: list[tuple[Sequence, Event]], done: threading.Event
) -> None:
    for sequence, event in events:
        sequence.queue.put_nowait(event)
    # Queued behind the wake-ups of the streams just fed, so it runs once they have.
    loop.call_soon(done.set)
