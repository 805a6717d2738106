"""MinHash dedup: recall and precision on planted near-duplicates, and the cost of our wrapping.

Run: `python benchmarks/bench_dedup.py [--base 1500] [--copies 100] [--workers 2] [--seed 0]
[--signature-docs 20000] [--no-pipeline]`

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

The signature stage alone compares, in this one process (one core each, the same documents,
start-up excluded: spaCy and the Unicode tables are loaded before the clock starts), datatrove's
`MinhashDedupSignature` with `cosmoforge.postprocess.minhash_signature.write_signatures` on
`--signature-docs` texts of 2-3 KB made of sentences drawn at random from the clean text (so
enough distinct documents exist, with the corpus's vocabulary). Both write the same files for
datatrove's later steps; the recall table above is then computed again for each signature path
(exact pass, our or datatrove's signatures, datatrove's buckets and clustering).
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))

from bench_decontam import clean_documents

from cosmoforge.cli.main import main as cosmo
from cosmoforge.postprocess.dedup import DedupConfig, deduplicate, exact_groups
from cosmoforge.postprocess.minhash_signature import write_signatures

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


# --- the signature stage alone -----------------------------------------------------------------


def signature_corpus(pool: list[str], count: int, rng: random.Random) -> list[str]:
    """`count` texts of 2-3 KB, each a run of sentences drawn at random from the clean text."""
    sentences = [s.strip() + "." for doc in pool for s in doc.split(". ") if len(s.split()) >= 4]
    docs = []
    for _ in range(count):
        target = rng.randint(2000, 3000)
        parts: list[str] = []
        size = 0
        while size < target:
            parts.append(rng.choice(sentences))
            size += len(parts[-1]) + 1
        docs.append(" ".join(parts))
    return docs


def datatrove_signer(config: Any) -> Callable[[list[str], Path, int], float]:
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    def sign(texts: list[str], folder: Path, rank: int) -> float:
        """Seconds the step takes on `texts`, written as `rank` of `folder`."""
        step = MinhashDedupSignature(output_folder=str(folder), config=config)
        step.word_tokenizer.word_tokenize("warm up")  # spaCy loads on first use: start-up, not work
        documents = [Document(text=text, id=str(row)) for row, text in enumerate(texts)]
        started = time.perf_counter()
        step.run(iter(documents), rank=rank, world_size=rank + 1)
        return time.perf_counter() - started

    return sign


def numpy_signer(config: Any) -> Callable[[list[str], Path, int], float]:
    write_signatures(["Warm up the Unicode tables, naïvely, with enough words."], tempfile.mkdtemp(), config)

    def sign(texts: list[str], folder: Path, rank: int) -> float:
        started = time.perf_counter()
        write_signatures(texts, folder, config, rank=rank)
        return time.perf_counter() - started

    return sign


def clusters_with(
    sign: Callable[[list[str], Path, int], float], docs: list[str], folder: Path, config: Any
) -> Any:
    """(removed, cluster label, kept row) per row: exact pass, `sign`, datatrove's buckets and clusters."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster
    from datatrove.utils.binaryio import read_tuples_from_file

    first = exact_groups(docs)
    reps = [row for row in range(len(docs)) if first[row] == row]
    sign([docs[row] for row in reps], folder / "sigs", 0)
    for bucket in range(config.num_buckets):
        MinhashDedupBuckets(str(folder / "sigs"), str(folder / "buckets"), config=config).run(
            None, rank=bucket, world_size=config.num_buckets
        )
    MinhashDedupCluster(
        str(folder / "buckets"), str(folder / "clusters"), config=config, save_cluster_id=True
    ).run(None, 0, 1)
    minhash_cluster: dict[int, int] = {}
    removed_reps: set[int] = set()
    if (folder / "clusters" / "000000.clusters").exists():
        with open(folder / "clusters" / "000000.clusters", "rb") as handle:
            minhash_cluster = {reps[doc]: cid for doc, cid in read_tuples_from_file(handle, "I", "I")}
    if (folder / "clusters" / "000000.remove").exists():
        with open(folder / "clusters" / "000000.remove", "rb") as handle:
            removed_reps = {reps[doc] for (doc,) in read_tuples_from_file(handle, "I")}
    label = [
        ("minhash", minhash_cluster[int(first[row])])
        if int(first[row]) in minhash_cluster
        else ("exact", first[row])
        for row in range(len(docs))
    ]
    removed = [first[row] != row or row in removed_reps for row in range(len(docs))]
    kept_of = {label[row]: row for row in range(len(docs)) if not removed[row]}
    return removed, label, [kept_of.get(label[row], row) for row in range(len(docs))]


def recall_table(docs: list[str], planted: dict[int, tuple[float, int]], outcome: Any) -> list[str]:
    """Per edit rate the copies found (same cluster as their source), then precision, as cells."""
    removed, label, kept_row = outcome
    source_of = {row: source for row, (_, source) in planted.items()}
    cells = []
    for rate in RATES:
        rows = [row for row, (r, _) in planted.items() if r == rate]
        found = [r for r in rows if label[r] == label[source_of[r]]]
        cells.append(f"{len(found):4} {len(found) / len(rows):6.1%}")
    gone = [row for row in range(len(docs)) if removed[row]]
    correct = [row for row in gone if source_of.get(kept_row[row], kept_row[row]) == source_of.get(row, row)]
    cells.append(f"{len(correct)}/{len(gone)}")
    return cells


def compare_signatures(
    docs: list[str], planted: dict[int, tuple[float, int]], count: int, seeds: list[int], rng: random.Random
) -> None:
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.logging import logger

    logger.disable("datatrove")  # `deduplicate` enables it again on its way out
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1)
    signers = {"datatrove": datatrove_signer(config), "ours": numpy_signer(config)}
    texts = signature_corpus(clean_documents(random.Random(rng.random())), count, rng)
    print()
    print(
        f"signature stage: {len(texts)} documents, {sum(map(len, texts)) / len(texts) / 1e3:.1f} KB "
        f"on average, one core each, load average {os.getloadavg()[0]:.1f}"
    )
    # Slices of 1,000 documents, each signed by both in turn (as one more rank of their folder),
    # so that a busy spell on the shared machine slows both alike.
    elapsed = dict.fromkeys(signers, 0.0)
    folder = Path(tempfile.mkdtemp(prefix="cosmoforge-bench-sig-"))
    try:
        for rank, start in enumerate(range(0, len(texts), 1000)):
            order = list(signers) if rank % 2 == 0 else list(reversed(signers))
            for name in order:
                elapsed[name] += signers[name](texts[start : start + 1000], folder / name, rank)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rates = {name: len(texts) / seconds for name, seconds in elapsed.items()}
    for name in signers:
        print(f"{name:>10}: {rates[name]:8.0f} docs/s ({elapsed[name]:.1f} s)")
    print(f"ratio (ours / datatrove): {rates['ours'] / rates['datatrove']:.2f}x")

    # Another permutation seed draws other hash functions: the spread between seeds of one path
    # is the noise that a difference between the paths should be judged against.
    columns = {}
    for seed in seeds:
        seeded = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=seed)
        for name, make in (("datatrove", datatrove_signer), ("ours", numpy_signer)):
            folder = Path(tempfile.mkdtemp(prefix="cosmoforge-bench-sig-"))
            try:
                with silent_stderr():  # datatrove's progress bars
                    outcome = clusters_with(make(seeded), docs, folder, seeded)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            columns[f"{name} s{seed}"] = recall_table(docs, planted, outcome)
    print()
    print(
        "copies found by signature path and seed (exact pass, signatures, datatrove's buckets and clusters)"
    )
    print("edit rate  copies" + "".join(f"  {title:>12}" for title in columns))
    for row, rate in enumerate(RATES):
        copies = sum(1 for r, _ in planted.values() if r == rate)
        print(f"{rate:9.0%} {copies:7}" + "".join(f"  {cells[row]:>12}" for cells in columns.values()))
    print(f"{'precision':>17}" + "".join(f"  {cells[-1]:>12}" for cells in columns.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=1500)
    parser.add_argument("--copies", type=int, default=100, help="planted copies per edit rate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each; the best counts")
    parser.add_argument("--signature-docs", type=int, default=20000, help="0 skips the signature stage")
    parser.add_argument(
        "--recall-seeds", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2], help="e.g. 1,2"
    )
    parser.add_argument("--no-pipeline", action="store_true", help="skip the end-to-end comparison")
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
    for _ in range(0 if args.no_pipeline else args.repeat):  # alternate, so a busy moment hits both
        folder = Path(tempfile.mkdtemp(prefix="cosmoforge-bench-dedup-"))
        try:
            ours_time, ours_removed, _ = run_ours(docs, folder, args.workers)
            plain_time, plain_removed = run_plain_datatrove(docs, folder, args.workers)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        ours_times.append(ours_time)
        plain_times.append(plain_time)

    # Metrics from the library call that `cosmo dedup` makes, which also gives the cluster of
    # every kept row. A copy counts as found when it shares a cluster with its source, whichever
    # of the two was kept (the corpus is shuffled, so the copy may come first).
    result = deduplicate(docs, DedupConfig(), workers=args.workers)
    if not args.no_pipeline:
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

    if args.signature_docs:
        compare_signatures(docs, planted, args.signature_docs, args.recall_seeds, rng)
    if args.no_pipeline:
        return 0
    ours_time, plain_time = min(ours_times), min(plain_times)
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
