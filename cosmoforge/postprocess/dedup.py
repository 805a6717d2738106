"""Deduplication: exact duplicates by content hash, near-duplicates by datatrove's MinHash.

Generated text repeats itself: the same prompt retried, two seeds that differ by a word, a
model that falls back on the same paragraph. Cosmopedia removes those with datatrove's MinHash
pipeline; this module runs it on a table and says, row by row, what was removed and why:

1. exact: rows whose text has the same xxh3-128 hash of its UTF-8 bytes form one group; the
   first row is kept (empty texts are one such group, like any other identical text);
2. MinHash on the first row of every group, with datatrove 0.9's four steps: signatures
   (word 5-grams after datatrove's text simplification, which lowercases, drops punctuation
   and turns every number into 0; 14 buckets x 8 hashes; written in datatrove's files by
   `minhash_signature`, vectorized, in place of datatrove's per-shingle loop), buckets (rows sharing
   a whole bucket are duplicate pairs), clusters (union-find over the pairs) and filter (one
   row per cluster is kept, the cluster's root). A text with fewer words than the n-gram has
   no signature and is only ever an exact duplicate.

The steps run in this process (workers=1), or as datatrove ranks in forked worker processes:
signatures and filtering split the rows into `workers` shards, buckets run one task per
bucket; clustering is one task, as datatrove requires. Forking needs no `__main__` guard, so
the same call works from the CLI, from tests and from a service.

For inputs that do not fit one machine, `dedup_ranks` runs the same steps as ranks of
Kubernetes Indexed Jobs (`cosmo dedup --step`).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

NGRAM = 5
BUCKETS = 14
HASHES_PER_BUCKET = 8

EXACT = "exact"
MINHASH = "minhash"
COLUMNS = ("dedup_reason", "dedup_cluster", "dedup_kept_row")  # what dedup adds to removed rows


class DedupError(ValueError):
    """A problem with the user's settings; the CLI prints it as one line."""


@dataclass(frozen=True)
class DedupConfig:
    ngram: int = NGRAM
    buckets: int = BUCKETS
    hashes_per_bucket: int = HASHES_PER_BUCKET
    exact: bool = True
    minhash: bool = True
    seed: int = 1  # datatrove's permutation seed; the same seed gives the same signatures

    def __post_init__(self) -> None:
        for name in ("ngram", "buckets", "hashes_per_bucket"):
            if getattr(self, name) < 1:
                raise DedupError(f"{name} must be at least 1, got {getattr(self, name)}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "ngram": self.ngram,
            "buckets": self.buckets,
            "hashes_per_bucket": self.hashes_per_bucket,
            "exact": self.exact,
            "minhash": self.minhash,
        }


@dataclass(frozen=True)
class DedupResult:
    """Per row: kept or not, why, its cluster and the row kept for that cluster."""

    kept: np.ndarray  # bool
    reason: list[str | None]  # None for kept rows, else EXACT or MINHASH
    cluster: np.ndarray  # int64 cluster id, -1 for a row that has no duplicate
    kept_row: np.ndarray  # int64 row kept for this row's cluster (itself when kept)
    counts: dict[str, Any] = field(default_factory=dict)


def content_hash(text: str) -> bytes:
    return xxhash.xxh3_128_digest(text.encode("utf-8", errors="surrogatepass"))


def exact_groups(texts: Sequence[str]) -> np.ndarray:
    """For each row, the first row with the same text (itself when it is the first)."""
    first: dict[bytes, int] = {}
    return np.array(
        [first.setdefault(content_hash(text), row) for row, text in enumerate(texts)], dtype=np.int64
    )


# --- MinHash through datatrove's steps -------------------------------------------------------


def minhash_config(config: DedupConfig) -> Any:
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    return MinhashConfig(
        n_grams=config.ngram,
        num_buckets=config.buckets,
        hashes_per_bucket=config.hashes_per_bucket,
        seed=config.seed,
    )


def signature_step(output_folder: str, config: DedupConfig) -> Any:
    """The step that writes MinHash signature files, one `.run(documents, rank, world_size)` away.

    The one place that names the implementation, so that a faster writer of the same files can
    take datatrove's place for every caller at once: `minhash_signature` writes datatrove's
    files with vectorized shingling and hashing, many times datatrove's documents/s at the same
    recall (benchmarks/bench_dedup.py)."""
    from cosmoforge.postprocess.minhash_signature import MinhashSignatureStep

    return MinhashSignatureStep(output_folder, minhash_config(config))


def _shards(rows: int, workers: int) -> list[range]:
    """Contiguous row ranges, one per rank, so a rank's document ids are stable."""
    bounds = np.linspace(0, rows, workers + 1).astype(int)
    return [range(int(a), int(b)) for a, b in itertools.pairwise(bounds.tolist())]


def _documents(texts: Sequence[str], rows: range) -> Iterator[Any]:
    from datatrove.data import Document

    for row in rows:
        yield Document(text=texts[row], id=str(row))


# Forked workers read the job from here instead of receiving it pickled.
_job: dict[str, Any] = {}


def _run_in_workers(task: Callable[[int], Any], count: int, workers: int) -> list[Any]:
    if workers <= 1 or count <= 1:
        return [task(number) for number in range(count)]
    context = multiprocessing.get_context("fork")
    _job["task"] = task
    try:
        with context.Pool(min(workers, count)) as pool:
            return pool.map(_call_job, range(count), chunksize=1)
    finally:
        _job.clear()


def _call_job(number: int) -> Any:
    return _job["task"](number)


def minhash_clusters(
    texts: Sequence[str], config: DedupConfig, workdir: str, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(removed, cluster id) per row of `texts`, from datatrove's four MinHash steps."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter

    minhash = minhash_config(config)
    shards = _shards(len(texts), max(1, min(workers, len(texts))))
    signatures, buckets, clusters = (
        os.path.join(workdir, name) for name in ("signatures", "buckets", "clusters")
    )

    signer = signature_step(signatures, config)

    def sign(rank: int) -> None:
        signer.run(_documents(texts, shards[rank]), rank=rank, world_size=len(shards))

    def bucket(rank: int) -> None:
        MinhashDedupBuckets(input_folder=signatures, output_folder=buckets, config=minhash).run(
            None, rank=rank, world_size=config.buckets
        )

    def filtered(rank: int) -> list[int]:
        step = MinhashDedupFilter(input_folder=clusters)
        documents = list(_documents(texts, shards[rank]))
        kept = {doc.id for doc in step.run(iter(documents), rank=rank, world_size=len(shards))}
        return [int(doc.id) for doc in documents if doc.id not in kept]

    with quiet():
        _run_in_workers(sign, len(shards), workers)
        _run_in_workers(bucket, config.buckets, workers)
        MinhashDedupCluster(
            input_folder=buckets, output_folder=clusters, config=minhash, save_cluster_id=True
        ).run(None, 0, 1)
        removed = np.zeros(len(texts), dtype=bool)
        for rows in _run_in_workers(filtered, len(shards), workers):
            removed[rows] = True
    return removed, _cluster_ids(clusters, shards, len(texts))


def _cluster_ids(folder: str, shards: list[range], rows: int) -> np.ndarray:
    """Cluster id per row from the cluster step's `<rank>.clusters` files ((doc, cluster) pairs).

    Read here rather than through the filter step, which skips a rank that has cluster members
    but nothing to remove (a cluster's kept root may sit in another rank than its copies).
    """
    from datatrove.utils.binaryio import read_tuples_from_file

    cluster = np.full(rows, -1, dtype=np.int64)
    for rank, shard in enumerate(shards):
        path = os.path.join(folder, f"{rank:06d}.clusters")
        if os.path.exists(path):
            with open(path, "rb") as handle:
                for doc, cluster_id in read_tuples_from_file(handle, "I", "I"):
                    cluster[shard.start + doc] = cluster_id
    return cluster


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence datatrove's per-step INFO logs and progress bars; results are returned instead."""
    from datatrove.utils.logging import logger

    logger.disable("datatrove")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.enable("datatrove")


# --- both together -----------------------------------------------------------------------------


def _first_kept(members: np.ndarray, kept: np.ndarray) -> int:
    survivors = members[kept[members]]
    return int(survivors[0]) if survivors.size else int(members[0])


def deduplicate(
    texts: Sequence[str], config: DedupConfig | None = None, workers: int = 1, workdir: str | None = None
) -> DedupResult:
    """Exact groups first, then MinHash over one row per group; the same answer for any `workers`."""
    config = config or DedupConfig()
    rows = len(texts)
    first = exact_groups(texts) if config.exact else np.arange(rows, dtype=np.int64)
    representatives = np.flatnonzero(first == np.arange(rows))
    removed_minhash = np.zeros(rows, dtype=bool)
    minhash_cluster = np.full(rows, -1, dtype=np.int64)
    if config.minhash and representatives.size > 1:
        with tempfile.TemporaryDirectory(prefix="cosmoforge-dedup-", dir=workdir) as scratch:
            unique = [texts[row] for row in representatives.tolist()]
            removed, cluster = minhash_clusters(unique, config, scratch, workers)
        removed_minhash[representatives] = removed
        minhash_cluster[representatives] = cluster

    # One cluster id per group of rows that are duplicates of each other, exact or near.
    cluster = minhash_cluster[first]
    exact_sizes = np.bincount(first, minlength=rows)
    in_exact_group = exact_sizes[first] > 1
    next_id = int(minhash_cluster.max()) + 1 if rows else 0
    lone = np.flatnonzero((cluster < 0) & in_exact_group & (first == np.arange(rows)))
    exact_ids = np.full(rows, -1, dtype=np.int64)
    exact_ids[lone] = np.arange(next_id, next_id + lone.size)
    cluster = np.where((cluster < 0) & in_exact_group, exact_ids[first], cluster)

    kept = (first == np.arange(rows)) & ~removed_minhash
    reason: list[str | None] = [None] * rows
    for row in np.flatnonzero(~kept).tolist():
        reason[row] = EXACT if first[row] != row else MINHASH
    kept_row = np.arange(rows, dtype=np.int64)
    if rows:
        order = np.argsort(cluster, kind="stable")
        boundaries = np.flatnonzero(np.diff(cluster[order])) + 1
        for members in np.split(order, boundaries):
            if cluster[members[0]] >= 0:
                kept_row[members] = _first_kept(members, kept)
    counts = {
        "documents": rows,
        "kept": int(kept.sum()),
        "removed": int((~kept).sum()),
        "removed_exact": sum(1 for r in reason if r == EXACT),
        "removed_minhash": sum(1 for r in reason if r == MINHASH),
        "clusters": int(np.unique(cluster[cluster >= 0]).size),
        "empty_documents": sum(1 for text in texts if not text.strip()),
        "config": config.as_dict(),
    }
    return DedupResult(kept=kept, reason=reason, cluster=cluster, kept_row=kept_row, counts=counts)
