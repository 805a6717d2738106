"""Tokens per second of the embedded model server, batched against one request at a time.

Run: `python benchmarks/bench_modelserver.py [--levels 1,4,8] [--rounds 2] [--tokens 192] [--weights q8_0]`

One process loads SmolLM2-135M once and serves it twice over HTTP with the app `cosmo
serve-model` runs: once with the one-at-a-time engine (`--parallel 1`: llama-cpp-python's own
generate loop under a lock) and once with continuous batching (`--parallel` = the highest
level). At each concurrency level the same prompts, seeds and `max_new_tokens` go to both, in
`rounds x level` requests kept `level` in flight; tokens/s is the generated tokens (as the
server reports them) over the wall time of the level. The issue's goal: at least 2.5x at 8.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

import httpx

from cosmoforge.services.modelserver.background import BackgroundServer
from cosmoforge.services.modelserver.batching import BatchedEngine
from cosmoforge.services.modelserver.llama import (
    EMBEDDED_MODEL_ID,
    WEIGHTS,
    LlamaModel,
    SequentialEngine,
    weights_path,
)

SUBJECTS = [
    "photosynthesis", "the Roman roads", "prime numbers", "how bees dance", "tides and the moon",
    "the printing press", "volcanoes", "how vaccines work", "the water cycle", "binary numbers",
    "coral reefs", "the steam engine", "black holes", "bread baking", "glaciers", "the alphabet",
]  # fmt: skip
GOAL = 2.5


@dataclass
class Level:
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    cpu_seconds: float  # this process's CPU time (every thread): robust where the cores are shared

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_rate(self) -> float:
        return self.tokens / self.cpu_seconds


def prompts(count: int) -> list[str]:
    template = "<|im_start|>user\nWrite a short textbook section about {}.<|im_end|>\n<|im_start|>assistant\n"
    return [template.format(SUBJECTS[i % len(SUBJECTS)]) for i in range(count)]


async def measure(url: str, concurrency: int, rounds: int, new_tokens: int) -> Level:
    texts = prompts(max(2, rounds * concurrency))
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, index: int, prompt: str) -> int:
        parameters = {"max_new_tokens": new_tokens, "temperature": 0.7, "seed": index}
        async with gate:
            reply = await client.post(f"{url}/generate", json={"inputs": prompt, "parameters": parameters})
        reply.raise_for_status()
        return int(reply.json()["details"]["generated_tokens"])

    async with httpx.AsyncClient(timeout=600) as client:
        started, cpu = time.perf_counter(), time.process_time()
        counts = await asyncio.gather(*(one(client, i, p) for i, p in enumerate(texts)))
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return Level(concurrency, len(texts), sum(counts), seconds, cpu_seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--levels", default="1,4,8", help="concurrent requests, comma-separated")
    parser.add_argument(
        "--rounds", type=int, default=2, help="requests per level = rounds x level (at least 2)"
    )
    parser.add_argument("--tokens", type=int, default=192, help="max_new_tokens of every request")
    parser.add_argument("--threads", type=int, help="CPU threads for llama.cpp (default: all)")
    parser.add_argument("--weights", choices=WEIGHTS, default="q4_1", help="as `cosmo serve-model --weights`")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress as it comes

    model = LlamaModel(
        weights_path(args.weights), EMBEDDED_MODEL_ID, threads=args.threads, dtype=args.weights
    )
    engines = {"one-at-a-time": SequentialEngine(model), "batched": BatchedEngine(model, max(levels))}
    print(
        f"{EMBEDDED_MODEL_ID} ({args.weights}) on llama.cpp, {model.threads} threads,"
        f" max_new_tokens {args.tokens}, batched --parallel {max(levels)}"
    )
    results: dict[str, dict[int, Level]] = {}
    for name, engine in engines.items():
        with BackgroundServer(engine) as server:
            asyncio.run(measure(server.url, 1, 1, 8))  # warm-up: first-touch of the weights
            results[name] = {}
            for level in levels:
                result = asyncio.run(measure(server.url, level, args.rounds, args.tokens))
                results[name][level] = result
                print(
                    f"  {name:14} concurrency {level}: {result.requests:3} requests, {result.tokens:5} tokens"
                    f" in {result.seconds:6.1f} s = {result.rate:6.1f} tokens/s,"
                    f" {result.cpu_rate:6.1f} tokens per CPU-second"
                )
            print(f"  {name:14} engine counters: {engine.stats()}")
    report(results["batched"], results["one-at-a-time"], levels)
    return 0


def report(batched: dict[int, Level], single: dict[int, Level], levels: list[int]) -> None:
    """Ratios by wall clock (what a user sees) and by CPU time (what survives shared cores)."""
    print("batched / one-at-a-time at the same concurrency:")
    for level in levels:
        wall = batched[level].rate / single[level].rate
        cpu = batched[level].cpu_rate / single[level].cpu_rate
        print(f"  concurrency {level}: x{wall:.2f} tokens/s, x{cpu:.2f} tokens per CPU-second")
    top = max(levels)
    wall = batched[top].rate / single[top].rate
    cpu = batched[top].cpu_rate / single[top].cpu_rate
    verdict = "meets" if wall >= GOAL else "misses"
    print(
        f"goal >= {GOAL}x at concurrency {top}: x{wall:.2f} (x{cpu:.2f} per CPU-second), {verdict} the goal"
    )


if __name__ == "__main__":
    raise SystemExit(main())
