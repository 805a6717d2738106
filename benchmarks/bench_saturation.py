"""Fixed in-flight requests against the adaptive controller, on engine models and the real server.

Run: `python benchmarks/bench_saturation.py [--quick] [--rounds N] [--embedded]
[--profiles tgi,vllm,vllm-small-kv]`

(a) An engine model of continuous batching, served over real HTTP in a separate process (TGI's
`/generate`, its Messages API `/v1/chat/completions` and a Prometheus `/metrics`): every step
decodes one token for each sequence in the batch, a step takes longer the larger the batch and
the more KV cache it reads, and the KV cache has a budget in tokens. Two admission rules, as the
engines have them:

- TGI (router v1/v2): a request enters the batch only if its prompt plus `max_new_tokens` fits
  the remaining `max_batch_total_tokens`; the rest waits in its queue. Nothing is preempted.
  Metrics: `tgi_queue_size`, `tgi_batch_current_size`.
- vLLM (PagedAttention): a request enters if its prompt fits the free KV cache (and fewer than
  `max_num_seqs` run); the cache then grows token by token, and when a sequence cannot grow the
  most recently admitted ones are preempted and computed again later ("recompute", vLLM's
  default). Metrics: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
  `vllm:gpu_cache_usage_perc`, `vllm:num_preemptions_total`.

Step times and budgets are round numbers of the order published for 7-8B models on one
A100/H100 (decode steps of a few tens of ms that grow slowly with the batch; KV budgets of tens
of thousands of tokens), divided by `--time-scale` so that a run takes seconds, not hours.

(b) With `--embedded`, the real embedded server (`cosmo serve-model --parallel 4`, llama.cpp
on the CPU, no /metrics: the controller works from latency alone).

For every profile it runs each fixed setting (1, 8, 32, 128, 512 in flight) and the adaptive
controller (bounds 1..512, starting at the spec default 32; the same settings for every
profile), each on a fresh engine, with the worker's own client stack (TGIBackend, Pacer) and an
endless supply of prompts. It prints tokens/s and p99 latency over a window after a warm-up,
and adaptive / best fixed. The goal: at least 0.95 on every profile, p99 under the timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from cosmoforge.generation.inference import Completion, TGIBackend, classify
from cosmoforge.generation.inflight import InflightController
from cosmoforge.generation.pacing import Pacer
from cosmoforge.spec.model import Engine, GenerationSpec, Sampling

FIXED = (1, 8, 32, 128, 512)
GOAL = 0.95
MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class Profile:
    name: str
    admission: str  # "reserve" (TGI) or "paged" (vLLM)
    step_base: float  # seconds of a decode step of one sequence (before time scaling)
    step_per_seq: float  # added per sequence in the batch
    step_per_kv_token: float  # added per token of KV cache read (attention)
    prefill_per_token: float  # added per prompt token prefilled in the step
    kv_budget: int  # tokens
    max_seqs: int
    time_scale: float  # real seconds per modelled second
    timeout: float  # request timeout, modelled seconds


PROFILES = {
    # TGI, a 7B model without grouped-query attention on a 24 GB card (A10G class): 14 GB of
    # weights read per step (~23 ms), ~0.5 MB of KV cache per token, a budget of ~16k tokens, so
    # about 28 requests of 300 + 256 reserved tokens fit at once.
    "tgi": Profile("tgi", "reserve", 0.023, 0.0003, 8.7e-7, 1.1e-4, 16_000, 128, 0.1, 120.0),
    # vLLM, an 8B model with grouped-query attention on an 80 GB card (H100 class): ~10 ms of
    # weights per step, 128 KB of KV per token, 60k tokens of cache: ~100 sequences before it
    # fills, well under max_num_seqs=256, so too many requests in flight get preempted.
    "vllm": Profile("vllm", "paged", 0.010, 0.00005, 6e-8, 3e-5, 60_000, 256, 0.25, 120.0),
    # vLLM, a 13B model without grouped-query attention on a 40 GB card (A100 class): ~12k
    # tokens of cache, preemption after a few dozen sequences.
    "vllm-small-kv": Profile("vllm-small-kv", "paged", 0.017, 0.0001, 5.3e-7, 1e-4, 12_500, 256, 0.1, 120.0),
}


# --- the engine model (runs in its own process) ------------------------------------------------


@dataclass
class Sequence:
    prompt_tokens: int
    target: int  # tokens it generates before its end-of-sequence token
    done: asyncio.Future[int]
    generated: int = 0
    cached: int = 0  # tokens of it in the KV cache (0 while waiting or after preemption)

    @property
    def reserve(self) -> int:
        return self.prompt_tokens + MAX_NEW_TOKENS


class EngineModel:
    def __init__(self, profile: Profile):
        self.profile = profile
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        registry = CollectorRegistry()
        self.registry = registry
        if profile.admission == "reserve":
            self.g_running = Gauge("tgi_batch_current_size", "batch", registry=registry)
            self.g_waiting = Gauge("tgi_queue_size", "queue", registry=registry)
            self.g_kv: Gauge | None = None
            self.c_preempt: Counter | None = None
        else:
            self.g_running = Gauge("vllm:num_requests_running", "running", registry=registry)
            self.g_waiting = Gauge("vllm:num_requests_waiting", "waiting", registry=registry)
            self.g_kv = Gauge("vllm:gpu_cache_usage_perc", "kv", registry=registry)
            self.c_preempt = Counter("vllm:num_preemptions", "preemptions", registry=registry)

    def submit(self, prompt: str, max_new: int) -> asyncio.Future[int]:
        digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
        # Completions end at their own length: from a fifth of max_new_tokens to all of it.
        target = max(1, int(max_new * (0.2 + 0.8 * digest[0] / 255)))
        seq = Sequence(max(1, len(prompt) // 4), target, asyncio.get_running_loop().create_future())
        self.waiting.append(seq)
        return seq.done

    def kv_used(self) -> int:
        if self.profile.admission == "reserve":
            return sum(seq.reserve for seq in self.running)
        return sum(seq.cached for seq in self.running)

    def admit(self) -> int:
        """Move waiting requests into the batch as the engine would; prefill tokens this step."""
        p, prefill, used = self.profile, 0, self.kv_used()
        while self.waiting and len(self.running) < p.max_seqs:
            seq = self.waiting[0]
            if seq.done.done():  # the client gave up
                self.waiting.popleft()
                continue
            need = seq.reserve if p.admission == "reserve" else seq.prompt_tokens + seq.generated
            # vLLM keeps a 1% watermark of free blocks so that running sequences can grow.
            room = p.kv_budget if p.admission == "reserve" else int(p.kv_budget * 0.99)
            if used + need > room:
                break
            self.waiting.popleft()
            seq.cached = seq.prompt_tokens + seq.generated
            used += need
            prefill += seq.cached
            self.running.append(seq)
        return prefill

    def step(self) -> float:
        p = self.profile
        prefill = self.admit()
        self.running = [seq for seq in self.running if not seq.done.done()]
        if p.admission == "paged":
            # Each sequence needs one more token of cache; the newest give theirs up when it runs out.
            while self.running and self.kv_used() + len(self.running) > p.kv_budget:
                victim = self.running.pop()
                victim.cached = 0
                self.waiting.appendleft(victim)
                assert self.c_preempt is not None
                self.c_preempt.inc()
        kv = self.kv_used()
        seconds = (
            p.step_base
            + p.step_per_seq * len(self.running)
            + p.step_per_kv_token * kv
            + p.prefill_per_token * prefill
        )
        still: list[Sequence] = []
        for seq in self.running:
            seq.generated += 1
            seq.cached += 1
            if seq.generated >= seq.target:
                seq.done.set_result(seq.generated)
            else:
                still.append(seq)
        self.running = still
        self.g_running.set(len(self.running))
        self.g_waiting.set(len(self.waiting))
        if self.g_kv is not None:
            self.g_kv.set(min(1.0, self.kv_used() / p.kv_budget))
        return seconds * p.time_scale

    async def loop(self) -> None:
        deadline = time.monotonic()
        while True:
            if not self.running and not self.waiting:
                await asyncio.sleep(0.001)
                deadline = time.monotonic()
                continue
            deadline += self.step()
            pause = deadline - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            else:
                await asyncio.sleep(0)  # behind: let requests in, then carry on
                deadline = max(deadline, time.monotonic() - 0.05)


def engine_app(profile: Profile) -> web.Application:
    engine = EngineModel(profile)

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        max_new = int((body.get("parameters") or {}).get("max_new_tokens") or MAX_NEW_TOKENS)
        tokens = await engine.submit(str(body.get("inputs", "")), max_new)
        return web.json_response(
            {
                "generated_text": "x " * tokens,
                "details": {"finish_reason": "eos_token", "generated_tokens": tokens},
            }
        )

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        prompt = "".join(str(m.get("content", "")) for m in body.get("messages", []))
        future = engine.submit(prompt, int(body.get("max_tokens") or MAX_NEW_TOKENS))
        tokens = await future
        return web.json_response(
            {
                "id": "",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": f"model-{profile.name}",
                "system_fingerprint": "bench",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "x " * tokens},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": max(1, len(prompt) // 4),
                    "completion_tokens": tokens,
                    "total_tokens": tokens + len(prompt) // 4,
                },
            }
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(engine.registry), content_type="text/plain")

    async def start(_: web.Application) -> None:
        app["loop"] = asyncio.create_task(engine.loop())

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(start)
    return app


def serve_engine(profile: Profile, port: int) -> None:
    # Each run ends by dropping hundreds of open requests; aiohttp logs every one of them.
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
    web.run_app(engine_app(profile), host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096)


# --- the client: the worker's stack with an endless supply of prompts ---------------------------

TOPICS = ["tides", "glaciers", "prime numbers", "bread", "volcanoes", "bees", "the alphabet", "coral"]


def prompt(n: int) -> str:
    # 200 to 400 tokens of prompt (4 characters a token), different for every request.
    return f"[{n}] Write a textbook section about {TOPICS[n % len(TOPICS)]}. " + "context " * (
        100 + n * 37 % 200
    )


class GenerateBackend:
    """TGI's /generate over one keep-alive session: the engine model answers hundreds of
    requests a second, and a session per request (the chat client's way) would make the
    benchmark measure the client's CPU instead of the engine's batching."""

    def __init__(self, endpoint: str, max_new: int, timeout: float):
        self.url, self.max_new = endpoint.rstrip("/") + "/generate", max_new
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout), connector=aiohttp.TCPConnector(limit=0)
        )

    async def complete(self, text: str) -> Completion:
        body = {"inputs": text, "parameters": {"max_new_tokens": self.max_new}}
        try:
            async with self.session.post(self.url, json=body) as reply:
                reply.raise_for_status()
                answer = await reply.json()
        except Exception as error:
            raise classify(error) from error
        details = answer["details"]
        return Completion(answer["generated_text"], "model", 0, details["generated_tokens"], "eos_token")

    async def close(self) -> None:
        await self.session.close()


@dataclass
class Result:
    setting: str
    tokens_per_second: float
    p99: float
    errors: int
    answers: int
    mean_limit: float
    limits: list[int] = field(default_factory=list)


async def drive(
    endpoint: str,
    setting: int | None,
    warmup: float,
    measure: float,
    timeout: float,
    max_new: int,
    chat: bool = False,
) -> Result:
    """Keep the pacer's limit in flight for warmup + measure seconds; measure the second part."""
    spec = GenerationSpec(
        engine=Engine.tgi, max_new_tokens=max_new, timeout_seconds=timeout, sampling=Sampling(temperature=0.0)
    )
    inner = TGIBackend(endpoint, spec) if chat else GenerateBackend(endpoint, max_new, timeout)
    if setting is None:
        controller = InflightController(1, 512, spec.concurrency, timeout)
    else:
        controller = InflightController(setting, setting, setting, timeout)
    pacer = Pacer(controller, "bench", endpoint)
    backend = pacer.wrap(inner)
    watch = asyncio.create_task(pacer.watch_engine()) if setting is None else None
    start = time.monotonic()
    window = (start + warmup, start + warmup + measure)
    tokens, latencies, errors, answers, limits = 0, [], 0, 0, []
    tasks: set[asyncio.Task[None]] = set()
    sent = 0

    async def one(n: int) -> None:
        nonlocal tokens, errors, answers
        began = time.monotonic()
        try:
            completion = await backend.complete(prompt(n))
        except Exception:
            ok, count = False, 0
        else:
            ok, count = True, completion.completion_tokens
        ended = time.monotonic()
        if window[0] <= ended <= window[1]:
            latencies.append(ended - began)
            if ok:
                tokens += count
                answers += 1
            else:
                errors += 1

    while time.monotonic() < window[1]:
        while len(tasks) < pacer.limit:
            task = asyncio.create_task(one(sent))
            sent += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if time.monotonic() >= window[0]:
            limits.append(pacer.limit)
        await asyncio.wait(tasks, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    if watch is not None:
        watch.cancel()
    await asyncio.gather(*tasks, *([watch] if watch else []), return_exceptions=True)
    await backend.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("inf")
    return Result(
        "adaptive" if setting is None else str(setting),
        tokens / measure,
        p99,
        errors,
        answers,
        statistics.fmean(limits) if limits else 0.0,
        limits,
    )


def median(results: list[Result]) -> Result:
    """The run with the median tokens/s (on shared cores one run can be slowed by a neighbour)."""
    ordered = sorted(results, key=lambda r: r.tokens_per_second)
    return ordered[(len(ordered) - 1) // 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_port(port: int, seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


async def run_model(profile: Profile, setting: int | None, warmup: float, measure: float) -> Result:
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=serve_engine, args=(profile, port), daemon=True
    )
    process.start()
    try:
        await wait_for_port(port, 30)
        return await drive(
            f"http://127.0.0.1:{port}",
            setting,
            warmup,
            measure,
            profile.timeout * profile.time_scale,
            MAX_NEW_TOKENS,
        )
    finally:
        process.terminate()
        process.join(5)


async def run_embedded(setting: int | None, warmup: float, measure: float, max_new: int) -> Result:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cosmoforge.cli", "serve-model", "--port", str(port), "--parallel", "4"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for_port(port, 120)
        return await drive(f"http://127.0.0.1:{port}", setting, warmup, measure, 120.0, max_new, chat=True)
    finally:
        server.terminate()  # it finishes what it decodes first; requests in its queue can be many
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def report(name: str, results: list[Result], timeout: float) -> float:
    print(f"\n{name}  (request timeout {timeout:.1f}s)", flush=True)
    print(
        f"  {'in flight':>9} {'tokens/s':>10} {'p99 s':>8} {'answers':>8} {'errors':>7} {'mean limit':>11}",
        flush=True,
    )
    for r in results:
        print(
            f"  {r.setting:>9} {r.tokens_per_second:>10.0f} {r.p99:>8.2f} {r.answers:>8} {r.errors:>7}"
            f" {r.mean_limit:>11.1f}"
        )
    adaptive = next(r for r in results if r.setting == "adaptive")
    best = max((r for r in results if r.setting != "adaptive"), key=lambda r: r.tokens_per_second)
    ratio = adaptive.tokens_per_second / best.tokens_per_second
    verdict = "ok" if ratio >= GOAL and adaptive.p99 < timeout else "BELOW GOAL"
    print(
        f"  adaptive / best fixed ({best.setting}): {ratio:.3f}  "
        f"p99 {adaptive.p99:.2f}s vs timeout {timeout:.1f}s  [{verdict}]"
    )
    return ratio


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows (about a minute in all)")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument(
        "--embedded", action="store_true", help="also the real embedded server (about 8 minutes more)"
    )
    parser.add_argument("--warmup", type=float, default=None)
    parser.add_argument("--measure", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each setting; the median is shown")
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 3.0)
    measure = args.measure if args.measure is not None else (3.0 if args.quick else 5.0)
    print(
        f"engine model: warm-up {warmup}s, measured {measure}s per setting; cores: {os.cpu_count()}",
        flush=True,
    )
    ratios: dict[str, float] = {}
    for name in filter(None, args.profiles.split(",")):
        profile = PROFILES[name]
        rounds: list[list[Result]] = []
        for _ in range(args.rounds):  # rounds interleave settings, so a busy minute hits them all
            rounds.append([await run_model(profile, setting, warmup, measure) for setting in (*FIXED, None)])
        results = [median(list(same)) for same in zip(*rounds, strict=True)]
        ratios[name] = report(f"profile {name}", results, profile.timeout * profile.time_scale)
    if args.embedded:
        settings: tuple[int | None, ...] = (1, 4, 8, 32, None)
        # CPU decoding: requests take seconds each, so the windows must be long next to them.
        results = [await run_embedded(s, 30.0, 60.0, 64) for s in settings]
        ratios["embedded"] = report("embedded server (cosmo serve-model --parallel 4)", results, 120.0)
    print("\nadaptive / best fixed: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()), flush=True)
    return 0 if all(v >= GOAL for v in ratios.values()) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
