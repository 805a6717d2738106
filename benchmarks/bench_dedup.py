"""MinHash dedup: recall and precision on planted near-duplicates, and the cost of our wrapping.

Run: `python benchmarks/bench_dedup.py [--base 1500] [--copies 100] [--workers 2] [--seed 0]`

The corpus is the clean text of `bench_decontam.py` (Wikipedia test articles from the gensim
wheel, Python's documentation and docstrings, news articles), first deduplicated so that no
two base documents are near-duplicates of each other. Copies of random base documents are
then planted at known word edit rates (each word replaced, deleted or followed by an inserted
word with that probability): recall is the share of copies removed, precision the share of
removals that are planted copies clustered with their own source.

Throughput compares, on the same documents and MinHash parameters (5-grams, 14 buckets x 8
hashes), `cosmo dedup` (parquet in, parquet out, exact pass included) against plain datatrove
as its documentation shows it: four `LocalPipelineExecutor` stages from a JSONL reader to
JSONL writers, with as many tasks and workers as ours.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))

from bench_decontam import clean_documents

from cosmoforge.cli.main import main as cosmo
from cosmoforge.postprocess.dedup import DedupConfig, deduplicate

RATES = (0.0, 0.02, 0.05, 0.10, 0.20, 0.30, 0.50)
INSERTS = "indeed also very quite rather simply just really".split()


def perturb(text: str, rate: float, rng: random.Random) -> str:
    out = []
    for word in text.split():
        roll = rng.random()
        if roll < rate / 3:
            out.append(rng.choice(INSERTS))  # replace
        elif roll < 2 * rate / 3:
            continue  # delete
        elif roll < rate:
            out += [word, rng.choice(INSERTS)]  # insert after
        else:
            out.append(word)
    return " ".join(out) if rate else text  # rate 0: a byte-identical copy


def build_corpus(
    base_count: int, copies: int, rng: random.Random, workers: int
) -> tuple[list[str], dict[int, tuple[float, int]]]:
    candidates = [doc for doc in clean_documents(rng) if len(doc.split()) >= 50][: base_count * 2]
    first_pass = deduplicate(candidates, DedupConfig(), workers=workers)
    base = [doc for doc, kept in zip(candidates, first_pass.kept.tolist(), strict=True) if kept][:base_count]
    docs = list(base)
    planted: dict[int, tuple[float, int]] = {}  # row -> (edit rate, source row)
    for rate in RATES:
        for _ in range(copies):
            source = rng.randrange(len(base))
            planted[len(docs)] = (rate, source)
            docs.append(perturb(base[source], rate, rng))
    order = list(range(len(docs)))
    rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    shuffled = [docs[old] for old in order]
    planted = {position[row]: (rate, position[source]) for row, (rate, source) in planted.items()}
    return shuffled, planted


def run_ours(docs: list[str], folder: Path, workers: int) -> tuple[float, list[int], list[int]]:
    source = folder / "input.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), source)
    started = time.perf_counter()
    code = cosmo(["dedup", str(source), "--out", str(folder / "ours"), "--workers", str(workers)])
    elapsed = time.perf_counter() - started
    assert code == 0
    removed = pq.read_table(folder / "ours" / "removed.parquet")
    return elapsed, removed.column("id").to_pylist(), removed.column("dedup_kept_row").to_pylist()


@contextlib.contextmanager
def silent_stderr() -> Iterator[None]:
    """datatrove's executors print per-task stats boxes to the process's stderr; hide them."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def run_plain_datatrove(docs: list[str], folder: Path, workers: int) -> tuple[float, list[int]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    shards = folder / "input"
    shards.mkdir()
    bounds = [len(docs) * rank // workers for rank in range(workers + 1)]
    for rank in range(workers):
        with open(shards / f"{rank:02d}.jsonl", "w", encoding="utf-8") as handle:
            for row in range(bounds[rank], bounds[rank + 1]):
                handle.write(json.dumps({"id": str(row), "text": docs[row]}) + "\n")
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    work = folder / "datatrove"
    started = time.perf_counter()
    stage1 = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(shards)),
            MinhashDedupSignature(output_folder=str(work / "sigs"), config=config),
        ],
        tasks=workers,
        workers=workers,
        logging_dir=str(work / "logs1"),
    )
    stage2 = LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)],
        tasks=config.num_buckets,
        workers=workers,
        logging_dir=str(work / "logs2"),
        depends=stage1,
    )
    stage3 = LocalPipelineExecutor(
        pipeline=[MinhashDedupCluster(str(work / "buckets"), str(work / "remove_ids"), config=config)],
        tasks=1,
        logging_dir=str(work / "logs3"),
        depends=stage2,
    )
    stage4 = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(shards)),
            MinhashDedupFilter(str(work / "remove_ids"), exclusion_writer=JsonlWriter(str(work / "removed"))),
            JsonlWriter(str(work / "kept")),
        ],
        tasks=workers,
        workers=workers,
        logging_dir=str(work / "logs4"),
        depends=stage3,
    )
    with silent_stderr():
        stage4.run()
    elapsed = time.perf_counter() - started
    removed = []
    for path in sorted((work / "removed").glob("*.jsonl*")):
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as handle:
            removed += [int(json.loads(line)["id"]) for line in handle]
    return elapsed, sorted(removed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=1500)
    parser.add_argument("--copies", type=int, default=100, help="planted copies per edit rate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each; the best counts")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    from datatrove.utils.logging import logger

    logger.disable("datatrove")  # keep the figures readable; datatrove logs every task at INFO

    docs, planted = build_corpus(args.base, args.copies, rng, args.workers)
    print(
        f"corpus: {len(docs)} documents ({len(docs) - len(planted)} base, {len(planted)} planted copies), "
        f"{sum(map(len, docs)) / 1e6:.1f} MB; machine: {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    ours_times, plain_times = [], []
    for _ in range(args.repeat):  # alternate, so a busy moment on the machine hits both
        folder = Path(tempfile.mkdtemp(prefix="cosmoforge-bench-dedup-"))
        try:
            ours_time, ours_removed, _ = run_ours(docs, folder, args.workers)
            plain_time, plain_removed = run_plain_datatrove(docs, folder, args.workers)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        ours_times.append(ours_time)
        plain_times.append(plain_time)
    ours_time, plain_time = min(ours_times), min(plain_times)

    # Metrics from the library call that `cosmo dedup` makes, which also gives the cluster of
    # every kept row. A copy counts as found when it shares a cluster with its source, whichever
    # of the two was kept (the corpus is shuffled, so the copy may come first).
    result = deduplicate(docs, DedupConfig(), workers=args.workers)
    assert sorted(ours_removed) == [row for row in range(len(docs)) if not result.kept[row]]
    source_of = {row: source for row, (_, source) in planted.items()}

    def family(row: int) -> int:
        return source_of.get(row, row)

    print()
    print("edit rate  copies  found  recall")
    for rate in RATES:
        rows = [row for row, (r, _) in planted.items() if r == rate]
        found = [
            r for r in rows if result.cluster[r] >= 0 and result.cluster[r] == result.cluster[source_of[r]]
        ]
        print(f"{rate:9.0%} {len(rows):7} {len(found):6} {len(found) / len(rows):7.1%}")
    removed = [row for row in range(len(docs)) if not result.kept[row]]
    correct = [row for row in removed if family(int(result.kept_row[row])) == family(row)]
    print(
        f"precision: {len(correct)} of {len(removed)} removed documents are a planted copy or its source, "
        f"clustered with its own family ({len(correct) / max(len(removed), 1):.1%})"
    )
    print(f"removed as: {dict(Counter(r for r in result.reason if r))}")

    print()
    best = f"best of {args.repeat}"
    print(
        f"plain datatrove ({args.workers} workers): {len(docs) / plain_time:7.0f} docs/s "
        f"({plain_time:.2f} s, {best})"
    )
    print(
        f"cosmo dedup ({args.workers} workers):     {len(docs) / ours_time:7.0f} docs/s "
        f"({ours_time:.2f} s, {best})"
    )
    print(f"ratio (ours / plain): {plain_time / ours_time:.2f}x")
    differing = set(ours_removed) ^ set(plain_removed)
    # The exact pass removes identical texts before MinHash, which changes union-find's sizes and
    # so, at times, which member of a cluster datatrove keeps; the clusters are the same.
    exact_clusters = {int(result.cluster[row]) for row in range(len(docs)) if result.reason[row] == "exact"}
    explained = [row for row in differing if int(result.cluster[row]) in exact_clusters]
    print(
        f"removed: ours {len(ours_removed)}, plain datatrove {len(plain_removed)}; they differ on "
        f"{len(differing)} documents, {len(explained)} of them in clusters where the exact pass removed "
        "a copy first (another member is kept)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
