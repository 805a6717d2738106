"""Tokens per second of the embedded model server, batched against one request at a time.

Run: `nice -n 10 python benchmarks/bench_modelserver.py [--levels 1,4,8] [--repeats 3] [--rounds 1]
[--tokens 192] [--weights q8_0]`

One process loads SmolLM2-135M once and serves it twice over HTTP with the app `cosmo
serve-model` runs: once with the one-at-a-time engine (`--parallel 1`: llama-cpp-python's own
generate loop under a lock) and once with continuous batching (`--parallel` = the highest
level). The requests are the quickstart's: its prompts as the prompt builder writes them from
the shipped sample seeds, sent as chat turns (~270 prompt tokens with the template) with its
sampling (temperature 0.6, top-p 0.95) and `max_new_tokens` 192. At each concurrency level both
servers get the same requests, `rounds x level` of them kept `level` in flight; tokens/s is
the generated tokens (as the server reports them) over the wall time of the level. The two
servers take turns, level by level and repeat by repeat, so a burst of load from elsewhere on
shared cores falls on both alike; the table shows each cell's median over the repeats and the
load average before and after. The issue's goal: at least 2.5x at 8.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from cosmoforge.services.modelserver.background import BackgroundServer
from cosmoforge.services.modelserver.batching import BatchedEngine
from cosmoforge.services.modelserver.engine import Engine
from cosmoforge.services.modelserver.llama import (
    EMBEDDED_MODEL_ID,
    WEIGHTS,
    LlamaModel,
    SequentialEngine,
    weights_path,
)

QUICKSTART = Path(__file__).resolve().parent.parent / "manifests" / "examples" / "quickstart.yaml"
GOAL = 2.5


@dataclass
class Level:
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    cpu_seconds: float  # this process's CPU time (every thread)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_rate(self) -> float:
        return self.tokens / self.cpu_seconds


def quickstart_prompts() -> list[str]:
    """The quickstart run's prompts, in the order the run would send them."""
    from cosmoforge.prompts.builder import build_prompts
    from cosmoforge.spec.validation import load_file

    return [prompt.prompt for prompt in build_prompts(load_file(QUICKSTART))]


async def measure(url: str, texts: list[str], concurrency: int, new_tokens: int) -> Level:
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, index: int, prompt: str) -> int:
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": new_tokens,
            "temperature": 0.6,
            "top_p": 0.95,
            "seed": 1234 + index,
        }
        async with gate:
            reply = await client.post(f"{url}/v1/chat/completions", json=body)
        reply.raise_for_status()
        return int(reply.json()["usage"]["completion_tokens"])

    async with httpx.AsyncClient(timeout=3600) as client:
        started, cpu = time.perf_counter(), time.process_time()
        counts = await asyncio.gather(*(one(client, i, p) for i, p in enumerate(texts)))
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return Level(concurrency, len(texts), sum(counts), seconds, cpu_seconds)


def load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--levels", default="1,4,8", help="concurrent requests, comma-separated")
    parser.add_argument(
        "--rounds", type=int, default=1, help="requests per level: rounds x level, 2 at least"
    )
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each cell (median shown)")
    parser.add_argument("--tokens", type=int, default=192, help="max_new_tokens of every request")
    parser.add_argument("--threads", type=int, help="CPU threads for llama.cpp (default: the cores)")
    parser.add_argument("--parallel", type=int, help="the batched server's --parallel (default: top level)")
    parser.add_argument("--weights", choices=WEIGHTS, default="q4_1", help="as `cosmo serve-model --weights`")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    parallel = args.parallel or max(levels)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress as it comes

    prompts = quickstart_prompts()
    path = weights_path(args.weights)
    model = LlamaModel(path, EMBEDDED_MODEL_ID, threads=args.threads, dtype=args.weights)
    engines: dict[str, Engine] = {
        "one-at-a-time": SequentialEngine(model),
        "batched": BatchedEngine(model, parallel),
    }
    print(
        f"{EMBEDDED_MODEL_ID} ({args.weights}) on llama.cpp, {model.threads} threads, quickstart chat"
        f" prompts ({len(prompts)}), max_new_tokens {args.tokens}, batched --parallel {parallel};"
        f" load average {load()}"
    )
    servers = {name: BackgroundServer(engine).start() for name, engine in engines.items()}
    results: dict[str, dict[int, list[Level]]] = {name: {level: [] for level in levels} for name in engines}
    try:
        for server in servers.values():  # warm-up: first touch of the weights and the caches
            asyncio.run(measure(server.url, prompts[:1], 1, 8))
        offset = 0
        for repeat in range(args.repeats):
            for level in levels:
                count = max(2, args.rounds * level)
                texts = [prompts[(offset + i) % len(prompts)] for i in range(count)]
                offset += count
                # Alternate who goes first, so neither always runs after the other's load.
                order = list(servers) if (repeat + level) % 2 == 0 else list(reversed(servers))
                for name in order:
                    result = asyncio.run(measure(servers[name].url, texts, level, args.tokens))
                    results[name][level].append(result)
                    print(
                        f"  repeat {repeat + 1} {name:14} concurrency {level}: {result.requests:3} requests,"
                        f" {result.tokens:5} tokens in {result.seconds:6.1f} s = {result.rate:6.1f} tokens/s"
                        f" ({result.cpu_rate:6.1f} per CPU-second); load average {load()}"
                    )
        for name, engine in engines.items():
            print(f"  {name:14} engine counters: {engine.stats()}")
    finally:
        for server in servers.values():
            server.stop()
    report(results["batched"], results["one-at-a-time"], levels)
    print(f"load average at the end {load()}")
    return 0


def report(batched: dict[int, list[Level]], single: dict[int, list[Level]], levels: list[int]) -> None:
    """Medians of tokens/s, and of the ratio within each repeat (both measured back to back)."""
    print("concurrency | one-at-a-time tokens/s | batched tokens/s | batched / one-at-a-time")
    ratios = {}
    for level in levels:
        one = statistics.median(r.rate for r in single[level])
        many = statistics.median(r.rate for r in batched[level])
        ratios[level] = statistics.median(
            b.rate / s.rate for b, s in zip(batched[level], single[level], strict=True)
        )
        print(f"{level:11} | {one:22.1f} | {many:16.1f} | x{ratios[level]:.2f}")
    top = max(levels)
    verdict = "meets" if ratios[top] >= GOAL else "misses"
    print(f"goal >= {GOAL}x at concurrency {top}: x{ratios[top]:.2f}, {verdict} the goal")


if __name__ == "__main__":
    raise SystemExit(main())
