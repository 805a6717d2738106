"""k-means topics with faiss: fit centroids on a sample, then assign documents batch by batch.

Fitting needs a representative sample, not the corpus: a hundred thousand documents pin down
145 centroids as well as millions do, and they fit in memory. The sample is drawn by a seeded
hash of each document's position ("bottom-k" sampling), so it is the same for every run with the
same seed however the input is batched, and it never needs the corpus in memory. Assignment is
a nearest-centroid search per batch, so any number of documents streams through.

Before the fit, each sample vector is averaged with its mutual nearest neighbours, three
times over: a few steps of diffusion on the neighbour graph, which lets k-means follow the
local structure that UMAP + HDBSCAN pipelines rely on without their cost. k-means starts from
the cheapest of a few seeded k-means++ starts rather than faiss's random pick (with few
clusters a bad start puts two centroids in one subject and merges two others for good), and
each centroid finally moves to the mean of its members' raw vectors, the space documents are
assigned in. docs/clustering.md has the figures against UMAP + HDBSCAN.
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


def _matrix(sample: np.ndarray) -> np.ndarray:
    """The sample as a contiguous float32 matrix, or ClusteringInputError saying why not.

    faiss aborts the process or raises an opaque RuntimeError on NaN, infinities or a ragged
    input; a clear error at the boundary names the problem instead.
    """
    try:
        data = np.ascontiguousarray(sample, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ClusteringInputError(f"vectors are not a numeric matrix: {error}") from error
    if data.ndim != 2 or data.shape[1] == 0:
        raise ClusteringInputError(f"vectors must be a 2-D matrix with columns, not shape {data.shape}")
    if len(data) == 0:
        raise ClusteringInputError("no documents to cluster")
    if not np.isfinite(data).all():
        raise ClusteringInputError("vectors contain NaN or infinite values")
    return data


def neighbour_graph(vectors: np.ndarray, neighbours: int, batch: int = 8192) -> Any:
    """Mutual k-nearest-neighbour graph with self-loops, as a scipy CSR matrix of 0/1 weights.

    Two documents are linked when each is among the other's `neighbours` nearest (cosine). A
    document between two subjects is often a neighbour of both sides without either taking it
    as theirs; keeping only mutual links keeps averaging inside a subject. Up to 20,000 vectors
    the search is exact; above, an inverted-file index searches an eighth of its lists.
    """
    import faiss
    import scipy.sparse

    data = np.ascontiguousarray(vectors, dtype=np.float32)
    count = len(data)
    index: Any
    if count <= 20_000:
        index = faiss.IndexFlatIP(data.shape[1])
    else:
        lists = int(4 * np.sqrt(count))
        index = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(data.shape[1]), data.shape[1], lists, faiss.METRIC_INNER_PRODUCT
        )
        index.train(data)
        # An eighth of the lists: 97% of the true 15 nearest on MiniLM vectors, where 8 lists
        # found 85% (and half on harder data); each missed neighbour is a lost mutual link.
        index.nprobe = max(8, lists // 8)
    index.add(data)
    hits = min(neighbours + 1, count)  # the first hit is normally the vector itself
    nearest = np.empty((count, hits), dtype=np.int64)
    for start in range(0, count, batch):
        _, found = index.search(data[start : start + batch], hits)
        nearest[start : start + len(found)] = found
    own = np.repeat(np.arange(count), hits)
    others = nearest.ravel()
    # An approximate search can come back short (-1), and duplicates can push a vector out of
    # its own list: drop both; the diagonal is added once below.
    keep = (others >= 0) & (others != own)
    links = scipy.sparse.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (own[keep], others[keep])), shape=(count, count)
    )
    links.data[:] = 1.0  # a repeated hit is still one link
    mutual = links.multiply(links.T)
    return (mutual + scipy.sparse.identity(count, dtype=np.float32, format="csr")).tocsr()


def smooth_by_neighbours(
    vectors: np.ndarray, neighbours: int, *, rounds: int = 3, batch: int = 8192
) -> np.ndarray:
    """Each vector replaced by the mean of itself and its mutual nearest neighbours, `rounds` times.

    k-means in the raw embedding space cuts through the thin, curved regions where one
    subject's documents lie. Averaging over the neighbour graph (a few steps of diffusion, the
    local structure UMAP exploits) pulls each document towards its subject's core first, at
    the price of one k-NN search. Vectors come back unit length.
    """
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    if neighbours <= 0 or rounds <= 0 or len(data) <= neighbours:
        return data
    graph = neighbour_graph(data, neighbours, batch)
    smoothed = data
    for _ in range(rounds):
        smoothed = np.asarray(graph @ smoothed, dtype=np.float32)
        smoothed /= np.maximum(np.linalg.norm(smoothed, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(smoothed, dtype=np.float32)


def kmeans_plus_plus(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeding on unit vectors: each new centroid drawn in proportion to squared distance."""
    return seed_centroids(vectors, k, seed)[0]


def seed_centroids(vectors: np.ndarray, k: int, seed: int, *, trials: int = 1) -> tuple[np.ndarray, float]:
    """k-means++ centroids and their cost: the points' total squared distance to the nearest one.

    With `trials` > 1 this is greedy k-means++ (scikit-learn's default seeding, with 2 + ln k
    trials): each step draws that many candidates and keeps the one that lowers the cost most.
    It rarely puts two centroids in one small subject, at `trials` times the work. The cost
    comes free with the seeding (it is what the next draw is weighted by), and on unit vectors
    it is 2 * (points - total cosine similarity), the k-means objective of the start.
    """
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
            nearest = np.minimum(nearest, np.maximum(2.0 - 2.0 * (vectors @ vectors[pick]), 0.0))
        else:
            draws = np.searchsorted(np.cumsum(nearest), rng.random(max(1, trials)) * total)
            candidates = np.minimum(draws, n - 1)
            after = np.minimum(nearest, np.maximum(2.0 - 2.0 * (vectors[candidates] @ vectors.T), 0.0))
            best = int(np.argmin(after.sum(axis=1)))
            pick, nearest = int(candidates[best]), after[best]
        chosen.append(pick)
    return np.ascontiguousarray(vectors[chosen], dtype=np.float32), float(nearest.sum())


def fit_centroids(
    sample: np.ndarray,
    k: int,
    seed: int,
    *,
    iterations: int = 25,
    restarts: int = 5,
    finalists: int = 1,
    trials: int = 1,
) -> np.ndarray:
    """Unit-length centroids of spherical k-means on unit vectors (cosine geometry).

    Lloyd's iterations stop in the nearest local optimum, and with few clusters a bad start
    puts two centroids in one subject and merges two others for good. `restarts` seeded
    k-means++ starts are drawn and Lloyd's iterations run from the `finalists` with the lowest
    cost (the k-means objective, which the seeding computes anyway); of those, the run ending
    with the highest total similarity wins. A start costs about one iteration, so picking the
    cheapest buys most of what full restarts would at a fraction of their time
    (docs/clustering.md has the figures); `finalists=restarts` is the classic n_init.
    `trials` > 1 seeds with greedy k-means++ (see `seed_centroids`).
    """
    import faiss  # native library: import on use so the CLI starts fast

    data = _matrix(sample)
    if k < 1:
        raise ClusteringInputError(f"cannot make {k} clusters")
    if len(data) < k:
        raise ClusteringInputError(f"{len(data)} documents cannot make {k} clusters")
    starts = [
        seed_centroids(
            data, k, int(np.random.SeedSequence([seed, restart]).generate_state(1)[0]), trials=trials
        )
        for restart in range(max(1, restarts))
    ]
    order = np.argsort([cost for _, cost in starts], kind="stable")
    best: np.ndarray | None = None
    best_similarity = -np.inf
    for chosen in order[: max(1, finalists)]:
        kmeans = faiss.Kmeans(
            data.shape[1],
            k,
            niter=iterations,
            seed=seed,
            spherical=True,
            # faiss would subsample to 256 points per centroid; the sample is already chosen.
            max_points_per_centroid=max(256, -(-len(data) // k)),
            min_points_per_centroid=1,
            verbose=False,
        )
        kmeans.train(data, init_centroids=starts[int(chosen)][0])
        centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        similarity = float(Assigner(centroids).similarity(data).sum()) if finalists > 1 else 0.0
        if best is None or similarity > best_similarity:
            best, best_similarity = centroids, similarity
    assert best is not None
    return best


def member_means(vectors: np.ndarray, clusters: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Unit mean vector of each cluster's members; `fallback`'s row for a cluster with none."""
    import scipy.sparse

    k = len(fallback)
    membership = scipy.sparse.csr_matrix(
        (np.ones(len(clusters), dtype=np.float32), (clusters, np.arange(len(clusters)))),
        shape=(k, len(clusters)),
    )
    sums = np.asarray(membership @ vectors, dtype=np.float32)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    means = np.where(norms > 0, sums / np.maximum(norms, 1e-12), fallback)
    return np.ascontiguousarray(means, dtype=np.float32)


def fit_topic_centroids(
    sample: np.ndarray,
    k: int,
    seed: int,
    *,
    neighbours: int = 15,
    restarts: int = 5,
    rounds: int = 3,
) -> np.ndarray:
    """The stage's fit: neighbour smoothing when the sample is big enough, k-means, raw means.

    Smoothing needs a neighbourhood per cluster: with fewer than (neighbours + 1) documents per
    cluster it would blend different subjects, so small samples are fitted as they are. After
    k-means on the smoothed vectors, each centroid is moved to the mean of its members' raw
    vectors: documents are assigned by their raw vectors, so that is where the centroid serves
    them best. Deterministic for a seed.
    """
    data = _matrix(sample)
    if k < 1:
        raise ClusteringInputError(f"cannot make {k} clusters")
    if len(data) < k:
        raise ClusteringInputError(f"{len(data)} documents cannot make {k} clusters")
    smooth = neighbours > 0 and rounds > 0 and len(data) >= (neighbours + 1) * k
    if not smooth:
        # A sample this small is cheap to fit thoroughly, and needs it: with a handful of
        # documents per subject, plain k-means++ often seeds one subject twice, and Lloyd's
        # iterations rarely undo that (8 subjects of 5-10 separated documents: 15% of seeds
        # mixed two). Greedy seeding and Lloyd from every start: none in 120.
        trials = 2 + int(np.log(k))
        return fit_centroids(data, k, seed, restarts=restarts, finalists=restarts, trials=trials)
    smoothed = smooth_by_neighbours(data, neighbours, rounds=rounds)
    centroids = fit_centroids(smoothed, k, seed, restarts=restarts)
    clusters, _ = Assigner(centroids).assign(smoothed)
    return member_means(data, clusters, centroids)


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
