"""k-means topics with faiss: fit centroids on a sample, then assign documents batch by batch.

Fitting needs a representative sample, not the corpus: a hundred thousand documents pin down
145 centroids as well as millions do, and they fit in memory. The sample is drawn by a seeded
hash of each document's position ("bottom-k" sampling), so it is the same for every run with the
same seed however the input is batched, and it never needs the corpus in memory. Assignment is
a nearest-centroid search per batch, so any number of documents streams through.

Centroids start from k-means++ (seeded) rather than faiss's random pick, and the best of a
few restarts is kept: with few clusters a bad start puts two centroids in one subject and
merges two others for good. Before the fit, each sample vector is averaged with its nearest
neighbours, which lets k-means follow the local structure that UMAP + HDBSCAN pipelines rely
on (see docs/clustering.md for the figures) without their cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class ClusteringInputError(ValueError):
    """Input that k-means cannot work with (no documents, no distinct documents)."""


def hash_keys(positions: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """A uniform pseudo-random uint64 per position (splitmix64): seeded, order independent."""
    with np.errstate(over="ignore"):
        z = positions.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + salt) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK64


@dataclass
class BottomKSample:
    """The `size` rows with the smallest keys seen so far: a uniform sample of a stream."""

    size: int
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    rows: np.ndarray | None = None

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        if len(self.keys) >= self.size:
            # Once full, only rows that beat the current largest key can enter: copying the
            # whole sample for every batch would dominate the pass on large samples.
            entering = keys < self.keys.max()
            keys, rows = keys[entering], rows[entering]
            if not len(keys):
                return
        merged_keys = np.concatenate([self.keys, keys])
        merged_rows = rows if self.rows is None else np.concatenate([self.rows, rows])
        if len(merged_keys) > self.size:
            keep = np.argpartition(merged_keys, self.size - 1)[: self.size]
            merged_keys, merged_rows = merged_keys[keep], merged_rows[keep]
        self.keys, self.rows = merged_keys, merged_rows

    def sorted_rows(self) -> np.ndarray:
        """Rows in key order, so the fit sees the same matrix whatever the batching was."""
        if self.rows is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self.rows[np.argsort(self.keys, kind="stable")]


def distinct_rows(vectors: np.ndarray) -> int:
    return 0 if len(vectors) == 0 else len(np.unique(vectors, axis=0))


def effective_k(requested: int, sample: np.ndarray) -> int:
    """k, lowered when the sample has fewer distinct documents than clusters.

    faiss aborts when asked for more centroids than points, and duplicates would only give
    empty clusters; one cluster per distinct document is the most the data can support.
    """
    if len(sample) == 0:
        raise ClusteringInputError("no documents to cluster")
    return min(requested, distinct_rows(sample))


def smooth_by_neighbours(vectors: np.ndarray, neighbours: int, batch: int = 8192) -> np.ndarray:
    """Each vector averaged with its `neighbours` nearest others, then made unit length again.

    k-means in the raw embedding space cuts through the thin, curved regions where one
    subject's documents lie; averaging over nearest neighbours pulls each document towards its
    subject's core first (the local structure UMAP exploits, at the price of one k-NN search).
    Up to 20,000 vectors the search is exact; above, an inverted-file index keeps it near linear.
    """
    import faiss

    data = np.ascontiguousarray(vectors, dtype=np.float32)
    count = len(data)
    if neighbours <= 0 or count <= neighbours:
        return data
    index: Any
    if count <= 20_000:
        index = faiss.IndexFlatIP(data.shape[1])
    else:
        lists = int(4 * np.sqrt(count))
        index = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(data.shape[1]), data.shape[1], lists, faiss.METRIC_INNER_PRODUCT
        )
        index.train(data)
        index.nprobe = 8
    index.add(data)
    smoothed = np.empty_like(data)
    for start in range(0, count, batch):
        rows = data[start : start + batch]
        _, nearest = index.search(rows, neighbours + 1)  # the first hit is the vector itself
        # An approximate search can come back short (-1); the vector stands in for the gap.
        own = np.arange(start, start + len(rows))[:, None]
        nearest = np.where(nearest < 0, own, nearest)
        smoothed[start : start + len(rows)] = data[nearest].mean(axis=1)
    norms = np.linalg.norm(smoothed, axis=1, keepdims=True)
    return np.ascontiguousarray(smoothed / np.maximum(norms, 1e-12), dtype=np.float32)


def kmeans_plus_plus(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeding on unit vectors: each new centroid drawn in proportion to squared distance."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    chosen = [int(rng.integers(n))]
    nearest = np.maximum(2.0 - 2.0 * (vectors @ vectors[chosen[0]]), 0.0)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total <= 0.0:
            # Every point already coincides with a centroid: take any unused one.
            unused = np.setdiff1d(np.arange(n), chosen)
            pick = int(unused[0])
        else:
            pick = int(np.searchsorted(np.cumsum(nearest), rng.random() * total))
            pick = min(pick, n - 1)
        chosen.append(pick)
        nearest = np.minimum(nearest, np.maximum(2.0 - 2.0 * (vectors @ vectors[pick]), 0.0))
    return np.ascontiguousarray(vectors[chosen], dtype=np.float32)


def fit_centroids(
    sample: np.ndarray, k: int, seed: int, *, iterations: int = 25, restarts: int = 5
) -> np.ndarray:
    """Unit-length centroids of spherical k-means on unit vectors (cosine geometry).

    Lloyd's iterations stop in the nearest local optimum, and on small or tight samples a bad
    start splits one subject and merges two others; the best of `restarts` seeded starts (by
    total similarity of points to their centroid) is kept. A fit is seconds next to the hours
    of embedding that feed it, so the restarts are cheap insurance.
    """
    import faiss  # native library: import on use so the CLI starts fast

    data = np.ascontiguousarray(sample, dtype=np.float32)
    if len(data) < k:
        raise ClusteringInputError(f"{len(data)} documents cannot make {k} clusters")
    best: np.ndarray | None = None
    best_similarity = -np.inf
    for restart in range(max(1, restarts)):
        kmeans = faiss.Kmeans(
            data.shape[1],
            k,
            niter=iterations,
            seed=seed + restart,
            spherical=True,
            # faiss would subsample to 256 points per centroid; the sample is already chosen.
            max_points_per_centroid=max(256, -(-len(data) // k)),
            min_points_per_centroid=1,
            verbose=False,
        )
        start = kmeans_plus_plus(data, k, int(np.random.SeedSequence([seed, restart]).generate_state(1)[0]))
        kmeans.train(data, init_centroids=start)
        centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        similarity = float(Assigner(centroids).similarity(data).sum())
        if similarity > best_similarity:
            best, best_similarity = centroids, similarity
    assert best is not None
    return best


def fit_topic_centroids(
    sample: np.ndarray, k: int, seed: int, *, neighbours: int = 5, restarts: int = 5
) -> np.ndarray:
    """The stage's fit: neighbour smoothing when the sample is big enough, then k-means.

    Smoothing needs a neighbourhood per cluster: with fewer than (neighbours + 1) documents per
    cluster it would blend different subjects, so small samples are fitted as they are.
    Documents are later assigned by their raw vectors; the centroids sit where smoothed
    documents of a subject gather, which is where raw ones are nearest too.
    """
    smooth = neighbours > 0 and len(sample) >= (neighbours + 1) * k
    fit_on = smooth_by_neighbours(sample, neighbours) if smooth else sample
    return fit_centroids(fit_on, k, seed, restarts=restarts)


class Assigner:
    """Nearest centroid by cosine; `distance` is 1 - cosine similarity."""

    def __init__(self, centroids: np.ndarray):
        import faiss

        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.index = faiss.IndexFlatIP(self.centroids.shape[1])
        self.index.add(self.centroids)

    @property
    def k(self) -> int:
        return len(self.centroids)

    def similarity(self, vectors: np.ndarray) -> np.ndarray:
        """Cosine similarity of each vector to its nearest centroid."""
        similarity, _ = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
        return similarity[:, 0]

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(vectors) == 0:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
        similarity, nearest = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
        return nearest[:, 0].astype(np.int32), (1.0 - similarity[:, 0]).astype(np.float32)


@dataclass
class MembersSample:
    """Up to `per_cluster` random members of each cluster (smallest keys), for labelling."""

    per_cluster: int
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    clusters: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def add(self, keys: np.ndarray, clusters: np.ndarray, ids: Sequence[str], texts: Sequence[str]) -> None:
        all_keys = np.concatenate([self.keys, keys])
        all_clusters = np.concatenate([self.clusters, clusters.astype(np.int32)])
        all_ids = [*self.ids, *ids]
        all_texts = [*self.texts, *texts]
        order = np.lexsort((all_keys, all_clusters))
        ordered_clusters = all_clusters[order]
        starts = np.searchsorted(ordered_clusters, ordered_clusters, side="left")
        rank = np.arange(len(order)) - starts
        keep = order[rank < self.per_cluster]
        self.keys, self.clusters = all_keys[keep], all_clusters[keep]
        self.ids = [all_ids[i] for i in keep]
        self.texts = [all_texts[i] for i in keep]

    def members(self, cluster: int) -> list[tuple[str, str]]:
        """(id, text) pairs of one cluster, in key order."""
        return [(self.ids[i], self.texts[i]) for i in np.flatnonzero(self.clusters == cluster)]
