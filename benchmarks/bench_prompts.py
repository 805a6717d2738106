"""Prompt building at scale: prompts/s and peak memory for growing seed sets.

Each size runs in a fresh process, so peak RSS belongs to that size alone. Memory must stay
flat as the count grows: the builder streams seeds in and prompt files out.

    python benchmarks/bench_prompts.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = """energy river market cell protein orbit theorem poetry harvest circuit climate museum
voltage grammar treaty enzyme glacier algorithm sculpture vaccine tariff galaxy""".split()


def make_seeds(folder: Path, count: int) -> dict[str, str]:
    """Web extracts with cluster topics, written as jsonl."""
    rng = random.Random(0)
    web = folder / "web.jsonl"
    with web.open("w") as handle:
        for i in range(count):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120)))
            handle.write(json.dumps({"id": f"w{i}", "text": text, "topic": f"topic {i % 145}"}) + "\n")
    return {"web": str(web)}


def run_one(count: int) -> dict[str, float]:
    from cosmoforge.prompts.builder import build_prompts
    from cosmoforge.prompts.manifest import write_prompts
    from cosmoforge.spec.model import parse_run
    from cosmoforge.storage import RunStore

    with tempfile.TemporaryDirectory() as folder:
        seeds = make_seeds(Path(folder), count)
        run = parse_run({
            "apiVersion": "cosmoforge.io/v1alpha1", "kind": "GenerationRun", "metadata": {"name": "bench"},
            "spec": {"seeds": [{"name": "web", "kind": "web", "uri": seeds["web"], "idField": "id",
                                "topicField": "topic"}]},
        })  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        written = write_prompts(RunStore.open(folder, "bench"), build_prompts(run))
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"prompts": written, "seconds": seconds, "prompts_per_s": written / seconds,
            "peak_rss_mb": peak / 1024, "rss_before_mb": before / 1024}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    print(f"{'prompts':>10} {'seconds':>8} {'prompts/s':>10} {'peak RSS MB':>12}")
    for size in args.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(size)], capture_output=True, text=True, check=True
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{result['prompts']:>10} {result['seconds']:>8.1f} "
            f"{result['prompts_per_s']:>10.0f} {result['peak_rss_mb']:>12.0f}"
        )


if __name__ == "__main__":
    main()
