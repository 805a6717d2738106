"""Peak memory and throughput of the data stages as a run grows: does memory stay flat?

Run: `python benchmarks/bench_scale.py [--docs 100000,1000000] [--stages compact,dedup,decontaminate,tokenize]
[--ranks 4] [--workdir DIR] [--extra "dedup=--workers 2"]`  (stages also: dedup-ranks, tokenize-ranks)

For each size a synthetic run folder is written once (and reused from `--workdir` afterwards):
generation shards of 1,000-5,000 rows in the workers' schema (`cosmoforge.spec.records`), ~3 KB
documents of sentences drawn from a random vocabulary (so documents are distinct, not copies),
lineage columns as workers write them, and about 3% of the prompts delivered twice in later
shards. Each stage then runs as its own `cosmo` child process: its peak RSS comes from the
kernel (`os.wait4`), so nothing polls and nothing is missed. `compact` compacts the run folder;
`dedup`, `decontaminate` and `tokenize` read the compacted dataset with their single-process
defaults; `dedup-ranks` and `tokenize-ranks` run the same work as the operator's Indexed Jobs do
(`--ranks` ranks a step, every rank a process of its own, one after another), and report the
largest peak of one rank and the wall time ranks side by side would take. Single-process dedup
holds the whole input by design (it is the laptop path); the ranked stages are the cluster's.

Prints one row per stage and size (peak RSS MB, seconds, documents/s), then per stage the ratio
of the peak at the largest size to the peak at the smallest, against the goal of 1.25: a stage
whose memory grows with the run fails it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import cosmoforge
from cosmoforge.spec import records

COSMO = [sys.executable, "-m", "cosmoforge.cli"]
PACKAGE = Path(cosmoforge.__file__).parent
TOKENIZER = PACKAGE / "data" / "tokenizers" / "bpe-600.json"
BENCHMARK = PACKAGE / "data" / "samples" / "eval" / "mmlu" / "test.jsonl"
GOAL = 1.25
DUPLICATE_SHARE = 0.03
SENTENCES = 50_000
SENTENCES_PER_DOC = 40  # ~75 bytes each: ~3 KB documents
SOURCES = ["web", "wikihow", "outlines", "math", "instructions"]
AUDIENCES = ["young children", "high school students", "college students", "researchers"]
STYLES = ["textbook", "blogpost", "wikihow"]
SPEC = """apiVersion: cosmoforge.io/v1alpha1
kind: GenerationRun
metadata:
  name: {name}
spec:
  seeds:
  - uri: cosmoforge://samples/web.jsonl
"""


@dataclass(frozen=True)
class Measured:
    stage: str
    docs: int
    peak_mb: float
    seconds: float


def sentence_pool(rng: np.random.Generator) -> list[str]:
    """Sentences of 8-16 words from a 20,000-word random vocabulary of 2-10 letters."""
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    lengths = rng.integers(2, 11, size=20_000)
    vocab = [letters[rng.integers(0, 26, size=n)].tobytes().decode() for n in lengths]
    pool = []
    for n in rng.integers(8, 17, size=SENTENCES):
        words = [vocab[i] for i in rng.zipf(1.2, size=n) % len(vocab)]
        pool.append(" ".join(words).capitalize() + ".")
    return pool


def prompt_ids(start: int, stop: int) -> list[str]:
    return [hashlib.sha256(f"bench {n}".encode()).hexdigest()[:24] for n in range(start, stop)]


def joined(pool: pa.Array, picks: np.ndarray) -> pa.Array:
    """Row i: the sentences `picks[i]` of `pool` joined by spaces, built in Arrow, not Python."""
    rows, per_row = picks.shape
    offsets = pa.array(np.arange(0, rows * per_row + 1, per_row, dtype=np.int32))
    sentences = pa.ListArray.from_arrays(offsets, pool.take(pa.array(picks.ravel())))
    return pc.binary_join(sentences, " ")


def shard_table(
    numbers: np.ndarray, redelivered: np.ndarray, pool: pa.Array, rng: np.random.Generator, at: np.datetime64
) -> pa.Table:
    """One worker shard: fresh prompts `numbers`, plus `redelivered` prompts of earlier shards."""
    every = np.concatenate([numbers, redelivered])
    rows = len(every)
    picks = rng.integers(0, len(pool), size=(rows, SENTENCES_PER_DOC))
    texts = joined(pool, picks)
    prompts = joined(pool, picks[:, :6])
    finished = at + rng.integers(0, 60_000, size=rows).astype("timedelta64[ms]")
    columns = {
        "prompt_id": [hashlib.sha256(f"bench {n}".encode()).hexdigest()[:24] for n in every],
        "run": ["bench"] * rows,
        "seed_source": [SOURCES[n % 5] for n in every],
        "seed_kind": [SOURCES[n % 5] for n in every],
        "seed_id": [f"record-{n // 3}" for n in every],
        "audience": [AUDIENCES[n % 4] for n in every],
        "style": [STYLES[n % 3] for n in every],
        "topic": [f"topic {n % 97}" for n in every],
        "template_id": [f"{SOURCES[n % 5]}-{STYLES[n % 3]}" for n in every],
        "template_version": ["3"] * rows,
        "prompt": prompts,
        "text": texts,
        "model": ["HuggingFaceTB/SmolLM2-1.7B-Instruct"] * rows,
        "engine": ["tgi"] * rows,
        "sampling": ['{"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 2048}'] * rows,
        "prompt_tokens": pc.divide(pc.binary_length(prompts), 4).cast(pa.int32()),
        "completion_tokens": pc.divide(pc.binary_length(texts), 4).cast(pa.int32()),
        "finish_reason": ["stop"] * rows,
        "started_at": pa.array(finished - np.timedelta64(20, "s"), pa.timestamp("ms", tz="UTC")),
        "finished_at": pa.array(finished, pa.timestamp("ms", tz="UTC")),
        "worker": [f"generator-{rng.integers(8)}"] * rows,
        "attempt": np.ones(rows, dtype=np.int32),
    }
    return pa.table(columns).cast(records.GENERATIONS)


def make_run(workdir: Path, docs: int) -> Path:
    """The run folder for `docs` documents, written once: shards as workers write them."""
    root = workdir / f"run-{docs}"
    done = root / ".generated"
    if done.exists():
        return root
    rng = np.random.default_rng(docs)
    pool = pa.array(sentence_pool(rng), pa.string())
    shards = root / "generations"
    shards.mkdir(parents=True, exist_ok=True)
    (root / "spec.yaml").write_text(SPEC.format(name=f"bench-{docs}"))
    at, start, index = np.datetime64("2026-01-01T00:00:00", "ms"), 0, 0
    while start < docs:
        stop = min(docs, start + int(rng.integers(1_000, 5_001)))
        fresh = np.arange(start, stop)
        count = rng.binomial(len(fresh), DUPLICATE_SHARE) if start else 0
        again = rng.integers(0, start, size=count) if count else np.array([], dtype=np.int64)
        table = shard_table(fresh, again, pool, rng, at + np.timedelta64(index, "m"))
        pq.write_table(table, shards / f"generator-{index % 8}-{index:06d}.parquet", compression="zstd")
        start, index = stop, index + 1
    done.write_text(json.dumps({"docs": docs, "shards": index}))
    return root


def measure(stage: str, docs: int, command: list[str]) -> Measured:
    """Run one `cosmo` command as a child; its peak RSS as the kernel recorded it."""
    started = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{stage} at {docs} documents failed ({child.returncode}): {shlex.join(command)}")
    return Measured(stage, docs, usage.ru_maxrss / 1024, seconds)  # ru_maxrss: KiB on Linux


def compact(root: Path, workdir: Path, docs: int, extra: list[str]) -> Measured:
    return measure("compact", docs, [*COSMO, "compact", str(root), *extra])


def dedup(root: Path, workdir: Path, docs: int, extra: list[str]) -> Measured:
    out = workdir / f"dedup-{docs}"
    return measure("dedup", docs, [*COSMO, "dedup", str(root / "dataset"), "--out", str(out), *extra])


def decontaminate(root: Path, workdir: Path, docs: int, extra: list[str]) -> Measured:
    out = workdir / f"decontam-{docs}"
    command = [*COSMO, "decontaminate", str(root / "dataset"), "--out", str(out)]
    return measure("decontaminate", docs, [*command, "--benchmark", f"mmlu={BENCHMARK}", *extra])


def tokenize(root: Path, workdir: Path, docs: int, extra: list[str]) -> Measured:
    out = workdir / f"tokens-{docs}"
    command = [*COSMO, "tokenize", str(root / "dataset"), "--out", str(out), "--tokenizer", str(TOKENIZER)]
    return measure("tokenize", docs, [*command, "--overwrite", *extra])


def ranked(stage: str, docs: int, steps: list[tuple[str, list[list[str]]]]) -> Measured:
    """Each step's ranks one after another, each rank a process as each is a pod on a cluster.

    The peak is the largest one rank reached; the seconds are, step by step, those of the slowest
    rank: the wall time when a step's ranks run side by side on their own nodes.
    """
    peak = seconds = 0.0
    for step, commands in steps:
        runs = [measure(f"{stage} {step}", docs, command) for command in commands]
        slowest, largest = max(r.seconds for r in runs), max(r.peak_mb for r in runs)
        line = f"  {stage} {step}: {len(runs)} rank(s), largest {largest:.0f} MB, slowest {slowest:.1f} s"
        print(line, flush=True)
        peak, seconds = max(peak, largest), seconds + slowest
    return Measured(stage, docs, peak, seconds)


def dedup_ranks(root: Path, workdir: Path, docs: int, extra: list[str]) -> Measured:
    """`cosmo dedup --step` as the operator's Indexed Jobs run it, with `--ranks` ranks."""
    out = workdir / f"dedup-ranks-{docs}"
    shutil.rmtree(out, ignore_errors=True)
    base = [*COSMO, "dedup", str(root / "dataset"), "--out", str(out), *extra]
    # One buckets rank per MinHash band (`--buckets`, 14 unless --extra says otherwise).
    plan = [("signatures", RANKS), ("buckets", None), ("cluster", 1), ("filter", RANKS), ("finish", 1)]
    steps = []
    for step, world in plan:
        count = world or int(_flag(extra, "--buckets", "14"))
        sized = ["--world-size", str(world)] if world else []
        steps.append((step, [[*base, "--step", step, *sized, "--rank", str(r)] for r in range(count)]))
    return ranked("dedup-ranks", docs, steps)


def tokenize_ranks(root: Path, workdir: Path, docs: int, extra: list[str]) -> Measured:
    """`cosmo tokenize --step` as the operator's Indexed Job and merge Job run it."""
    out = workdir / f"tokens-ranks-{docs}"
    shutil.rmtree(out, ignore_errors=True)
    base = [*COSMO, "tokenize", str(root / "dataset"), "--out", str(out), "--tokenizer", str(TOKENIZER)]
    base += extra
    world = ["--world-size", str(RANKS)]
    ranks = [[*base, "--step", "tokenize", *world, "--rank", str(r)] for r in range(RANKS)]
    merge = [[*base, "--step", "merge", *world]]
    return ranked("tokenize-ranks", docs, [("tokenize", ranks), ("merge", merge)])


def _flag(flags: list[str], name: str, default: str) -> str:
    return flags[flags.index(name) + 1] if name in flags else default


RANKS = 4  # set by --ranks
STAGES: dict[str, Callable[[Path, Path, int, list[str]], Measured]] = {
    "compact": compact,
    "dedup": dedup,
    "dedup-ranks": dedup_ranks,
    "decontaminate": decontaminate,
    "tokenize": tokenize,
    "tokenize-ranks": tokenize_ranks,
}


def table(results: list[Measured]) -> str:
    lines = [f"{'stage':<14} {'docs':>9} {'peak RSS MB':>12} {'seconds':>9} {'docs/s':>9}"]
    for r in results:
        lines.append(
            f"{r.stage:<14} {r.docs:>9} {r.peak_mb:>12.0f} {r.seconds:>9.1f} {r.docs / r.seconds:>9.0f}"
        )
    lines.append("")
    for stage in dict.fromkeys(r.stage for r in results):
        runs = sorted((r for r in results if r.stage == stage), key=lambda r: r.docs)
        if len(runs) > 1:
            ratio = runs[-1].peak_mb / runs[0].peak_mb
            verdict = "ok" if ratio <= GOAL else "over the goal"
            sizes = f"peak({runs[-1].docs}) / peak({runs[0].docs})"
            lines.append(f"{stage}: {sizes} = {ratio:.2f} (goal <= {GOAL}: {verdict})")
    return "\n".join(lines)


def parse_extra(values: list[str]) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {}
    for value in values:
        stage, _, flags = value.partition("=")
        if stage not in STAGES:
            raise SystemExit(f"--extra {value!r}: unknown stage {stage!r} (one of {', '.join(STAGES)})")
        extra.setdefault(stage, []).extend(shlex.split(flags))
    return extra


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", default="100000,1000000", help="run sizes in documents, comma-separated")
    parser.add_argument("--stages", default="compact,dedup,decontaminate,tokenize")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cosmoforge-bench-scale",
        help="where generated runs are cached and stage outputs go",
    )
    parser.add_argument(
        "--extra", action="append", default=[], metavar="STAGE=FLAGS", help="more flags for a stage"
    )
    parser.add_argument("--ranks", type=int, default=4, help="ranks of dedup-ranks and tokenize-ranks")
    args = parser.parse_args()
    global RANKS
    RANKS = args.ranks
    sizes = sorted(int(n) for n in args.docs.split(","))
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stages {', '.join(unknown)} (known: {', '.join(STAGES)})")
    extra = parse_extra(args.extra)
    results = []
    for docs in sizes:
        started = time.perf_counter()
        root = make_run(args.workdir, docs)
        print(f"run of {docs} documents ready in {time.perf_counter() - started:.0f} s: {root}", flush=True)
        for stage in stages:
            results.append(STAGES[stage](root, args.workdir, docs, extra.get(stage, [])))
            print(table(results[-1:]).splitlines()[1], flush=True)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
