"""The clustering stage: web seed documents -> topics table + per-document assignments + plots.

Two streaming passes over the input, so memory holds one batch and two samples, never the
corpus: the first embeds every batch (into the cache) and keeps a seeded sample to fit k-means
on; the second reads the vectors back, assigns each document to its nearest centroid, writes
the assignments shard by shard and keeps a few random members per cluster for the labeller.
Then each cluster is named and scored, the spec's keep rule decides which topics seed prompts,
and a map and a table show the result.

Everything under `out` goes through fsspec, so `out` may be a local folder or object storage:

    topics.parquet            cluster_id, label, score, size, kept, reason, example_ids, ...
    assignments/part-*.parquet  <id column>, cluster_id, distance (1 - cosine)
    centroids.npy             k x dim unit vectors, to assign more documents later
    topics.md, clusters.png, clusters.html, summary.json
    cache/embeddings/...      vectors per batch (unless another cache is named)
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from cosmoforge.clustering.embed import DEFAULT_MODEL, Embedder, EmbeddingCache, embed_batch, load_embedder
from cosmoforge.clustering.kmeans import (
    Assigner,
    BottomKSample,
    ClusteringInputError,
    MembersSample,
    effective_k,
    fit_topic_centroids,
    hash_keys,
)
from cosmoforge.clustering.label import Complete, LabelResult, keep_decision, label_cluster
from cosmoforge.clustering.plot import cluster_map_html, cluster_map_png, markdown_table, project_2d
from cosmoforge.prompts.seeds import SeedCounts, SeedError, SeedRecord, read_seed
from cosmoforge.spec.model import ClusteringSpec, SeedKind, SeedSource
from cosmoforge.storage import RunStore

log = logging.getLogger(__name__)

TOPICS_FILE = "topics.parquet"
ASSIGNMENTS_DIR = "assignments"
ROW_ID_COLUMN = "row"
PLOT_POINTS = 5000

# Salts keep the fit sample and the labelling sample independent draws of one seed.
_FIT_SALT = 1
_LABEL_SALT = 2

TOPICS_SCHEMA = pa.schema(
    [
        ("cluster_id", pa.int32()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("size", pa.int64()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),
        ("example_ids", pa.list_(pa.string())),
        ("label_attempts", pa.int32()),
        ("label_error", pa.string()),
    ]
)


@dataclass(frozen=True)
class ClusterConfig:
    """What the stage needs from the spec, plus knobs a spec does not carry."""

    clusters: int = 145
    sample_size: int = 100_000
    samples_per_label: int = 10
    min_educational_score: float = 3.0
    exclude_topics: tuple[str, ...] = ("explicit adult content", "celebrity gossip", "obituaries")
    seed: int = 42
    embedding_model: str = DEFAULT_MODEL
    read_batch: int = 4096
    max_embed_chars: int = 2000
    label_chars: int = 500
    label_attempts: int = 3
    label_concurrency: int = 4
    label_wait_seconds: float = 1.0
    # Mutual nearest neighbours in the smoothing graph (0: fit on raw vectors); used only when
    # the sample holds at least (neighbours + 1) documents per cluster. Restarts: k-means++
    # starts drawn; Lloyd's iterations run from the cheapest.
    smoothing_neighbours: int = 15
    kmeans_restarts: int = 5

    @classmethod
    def from_spec(cls, spec: ClusteringSpec, **overrides: Any) -> ClusterConfig:
        values: dict[str, Any] = {
            "clusters": spec.clusters,
            "sample_size": spec.sample_size,
            "samples_per_label": spec.samples_per_label,
            "min_educational_score": spec.min_educational_score,
            "exclude_topics": tuple(spec.exclude_topics),
            "seed": spec.seed,
            "embedding_model": spec.embedding_model,
        }
        return cls(**{**values, **overrides})


@dataclass(frozen=True)
class ClusterInput:
    """Where the documents are: parquet, jsonl or csv through fsspec, or hf://datasets/<id>."""

    uri: str
    text_field: str = "text"
    id_field: str | None = None
    format: str = "auto"

    @property
    def id_column(self) -> str:
        """The assignments keep the input's id column; without one, the record's hash is the id."""
        return self.id_field or ROW_ID_COLUMN

    def source(self) -> SeedSource:
        return SeedSource(
            name="cluster-input",
            kind=SeedKind.web,
            uri=self.uri,
            format=self.format,  # type: ignore[arg-type]  # checked by SeedSource itself
            text_field=self.text_field,
            id_field=self.id_field,
            exclude_categories=[],
        )


@dataclass
class ClusteringSummary:
    input: str
    out: str
    embedding_model: str
    documents: int = 0
    skipped_empty: int = 0
    requested_clusters: int = 0
    clusters: int = 0
    sample: int = 0
    embedded_batches: int = 0
    cached_batches: int = 0
    labelled: int = 0
    label_failures: int = 0
    # How the labeller asked (a `ChatClient`'s `output_format`: "json_schema", or "prompt" and
    # why, when the endpoint refused structured output); None for other callables.
    label_output: str | None = None
    kept_clusters: int = 0
    kept_documents: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Batch:
    ids: list[str]
    texts: list[str]
    start: int  # position of the first document among all non-empty documents


def open_store(uri: str) -> RunStore:
    if "://" not in uri:
        uri = os.path.abspath(uri)
    fs, root = url_to_fs(uri)
    return RunStore(fs, root.rstrip("/"), uri.rstrip("/"))


def _batches(data: ClusterInput, size: int, counts: SeedCounts) -> Iterator[_Batch]:
    """Documents with text, in file order, `size` at a time; `counts` tallies skipped ones."""
    start = 0
    records: Iterator[SeedRecord] = read_seed(data.source(), counts)
    try:
        while chunk := list(itertools.islice(records, size)):
            yield _Batch([r.id for r in chunk], [r.text for r in chunk], start)
            start += len(chunk)
    except SeedError as error:
        raise ClusteringInputError(str(error)) from None


def _positions(batch: _Batch) -> np.ndarray:
    return np.arange(batch.start, batch.start + len(batch.ids))


def _embed_pass(
    data: ClusterInput, embedder: Embedder, cache: EmbeddingCache | None, config: ClusterConfig
) -> tuple[int, int, np.ndarray]:
    """Pass 1: embed every batch (filling the cache); return counts and the fit sample."""
    counts = SeedCounts()
    sample = BottomKSample(config.sample_size)
    documents = 0
    for batch in _batches(data, config.read_batch, counts):
        vectors = embed_batch(embedder, _embed_texts(batch, config), cache)
        sample.add(hash_keys(_positions(batch), config.seed, _FIT_SALT), vectors)
        documents += len(batch.ids)
    return documents, counts.skipped_empty, sample.sorted_rows()


def _assign_pass(
    data: ClusterInput,
    store: RunStore,
    embedder: Embedder,
    cache: EmbeddingCache | None,
    assigner: Assigner,
    config: ClusterConfig,
) -> tuple[np.ndarray, MembersSample]:
    """Pass 2: nearest centroid per document, one shard per batch; cluster sizes and members."""
    store.remove(ASSIGNMENTS_DIR)  # shards of an earlier run may be more than this one writes
    sizes = np.zeros(assigner.k, dtype=np.int64)
    members = MembersSample(config.samples_per_label)
    for number, batch in enumerate(_batches(data, config.read_batch, SeedCounts())):
        vectors = embed_batch(embedder, _embed_texts(batch, config), cache)
        clusters, distances = assigner.assign(vectors)
        sizes += np.bincount(clusters, minlength=assigner.k)
        members.add(
            hash_keys(_positions(batch), config.seed, _LABEL_SALT),
            clusters,
            batch.ids,
            [text[: config.label_chars] for text in batch.texts],
        )
        shard = pa.table(
            {
                data.id_column: pa.array(batch.ids, pa.string()),
                "cluster_id": pa.array(clusters, pa.int32()),
                "distance": pa.array(distances, pa.float32()),
            }
        )
        store.write_table(f"{ASSIGNMENTS_DIR}/part-{number:05d}.parquet", shard)
    return sizes, members


def _embed_texts(batch: _Batch, config: ClusterConfig) -> list[str]:
    # Both passes must cut texts the same way: the cut texts are the cache key.
    return [text[: config.max_embed_chars] for text in batch.texts]


def run_clustering(
    data: ClusterInput,
    out: str,
    config: ClusterConfig,
    *,
    embedder: Embedder | None = None,
    complete: Complete | None = None,
    cache_uri: str | None = None,
    use_cache: bool = True,
) -> ClusteringSummary:
    """Cluster, label and judge the documents of `data`; write everything under `out`.

    `complete=None` skips labelling: every non-empty cluster is kept. Raises
    `ClusteringInputError` for input that cannot be clustered (missing file or field, no
    document with text); fewer distinct documents than clusters lowers k with a warning.
    """
    store = open_store(out)
    embedder = embedder or load_embedder(config.embedding_model)
    cache = EmbeddingCache.open(cache_uri or store.url("cache", "embeddings")) if use_cache else None
    summary = ClusteringSummary(data.uri, store.uri, embedder.name, requested_clusters=config.clusters)

    clock = time.perf_counter()
    summary.documents, summary.skipped_empty, sample = _embed_pass(data, embedder, cache, config)
    if summary.documents == 0:
        raise ClusteringInputError(
            f"{data.uri}: no document has text in field {data.text_field!r}"
            + (f" ({summary.skipped_empty} rows with empty text)" if summary.skipped_empty else "")
        )
    summary.seconds["embed"] = time.perf_counter() - clock

    clock = time.perf_counter()
    summary.sample = len(sample)
    k = summary.clusters = effective_k(config.clusters, sample)
    if k < config.clusters:
        message = f"only {k} distinct documents in the sample for {config.clusters} clusters: using k={k}"
        log.warning("%s", message)
        warnings.warn(message, UserWarning, stacklevel=2)
    centroids = fit_topic_centroids(
        sample, k, config.seed, neighbours=config.smoothing_neighbours, restarts=config.kmeans_restarts
    )
    assigner = Assigner(centroids)
    summary.seconds["fit"] = time.perf_counter() - clock

    clock = time.perf_counter()
    sizes, members = _assign_pass(data, store, embedder, cache, assigner, config)
    summary.seconds["assign"] = time.perf_counter() - clock
    if cache is not None:
        summary.embedded_batches, summary.cached_batches = cache.misses, cache.hits

    clock = time.perf_counter()
    results = _label_all(members, sizes, complete, config) if complete is not None else None
    summary.seconds["label"] = time.perf_counter() - clock
    if results is not None:
        summary.labelled = sum(1 for result in results.values() if result.ok)
        summary.label_failures = len(results) - summary.labelled
        output_format = getattr(complete, "output_format", None)
        summary.label_output = output_format if isinstance(output_format, str) else None

    topics = topics_table(sizes, members, results, config)
    kept = np.asarray(topics.column("kept").to_pylist(), dtype=bool)
    summary.kept_clusters = int(kept.sum())
    summary.kept_documents = int(sizes[kept].sum())

    _write_outputs(store, topics, centroids, sample, assigner)
    summary.outputs = {
        "topics": store.url(TOPICS_FILE),
        "assignments": store.url(ASSIGNMENTS_DIR),
        "table": store.url("topics.md"),
        "map": store.url("clusters.png"),
        "html": store.url("clusters.html"),
    }
    store.write_text("summary.json", json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def _label_all(
    members: MembersSample, sizes: np.ndarray, complete: Complete, config: ClusterConfig
) -> dict[int, LabelResult]:
    """Label every non-empty cluster, a few at a time; an `EndpointError` stops all of them."""
    clusters = [c for c in range(len(sizes)) if sizes[c] > 0]

    def one(cluster: int) -> LabelResult:
        extracts = [text for _, text in members.members(cluster)]
        return label_cluster(
            extracts,
            complete,
            attempts=config.label_attempts,
            max_chars=config.label_chars,
            wait_seconds=config.label_wait_seconds,
        )

    results: dict[int, LabelResult] = {}
    with ThreadPoolExecutor(max_workers=max(1, config.label_concurrency)) as pool:
        futures: dict[int, Future[LabelResult]] = {c: pool.submit(one, c) for c in clusters}
        try:
            for cluster, future in futures.items():
                results[cluster] = future.result()
                result = results[cluster]
                if result.ok:
                    log.info("cluster %d: %s (score %g)", cluster, result.topic, result.score)
                else:
                    log.warning(
                        "cluster %d: no label after %d tries: %s", cluster, result.attempts, result.error
                    )
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


def topics_table(
    sizes: np.ndarray,
    members: MembersSample,
    results: dict[int, LabelResult] | None,
    config: ClusterConfig,
) -> pa.Table:
    """One row per cluster; `results=None` means the run was not labelled."""
    rows = []
    for cluster, size in enumerate(sizes.tolist()):
        result = results.get(cluster) if results is not None else None
        judged = None if results is None else result or LabelResult(None, None, 0, "not labelled")
        reason: str | None
        if size == 0:
            kept, reason = False, "empty"
        else:
            kept, reason = keep_decision(judged, config.min_educational_score, config.exclude_topics)
        rows.append(
            {
                "cluster_id": cluster,
                "label": result.topic if result else None,
                "score": result.score if result else None,
                "size": size,
                "kept": kept,
                "reason": reason,
                "example_ids": [doc_id for doc_id, _ in members.members(cluster)],
                "label_attempts": result.attempts if result else 0,
                "label_error": result.error if result else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=TOPICS_SCHEMA)


def _write_outputs(
    store: RunStore,
    topics: pa.Table,
    centroids: np.ndarray,
    sample: np.ndarray,
    assigner: Assigner,
) -> None:
    store.write_table(TOPICS_FILE, topics)
    buffer = io.BytesIO()
    np.save(buffer, centroids, allow_pickle=False)
    store.write_bytes("centroids.npy", buffer.getvalue())
    rows = topics.to_pylist()
    store.write_text("topics.md", markdown_table(rows))
    shown = sample[:PLOT_POINTS]  # the sample is in random (key) order: any prefix is random too
    point_clusters, _ = assigner.assign(shown)
    points, centres = project_2d(shown, centroids)
    store.write_bytes("clusters.png", cluster_map_png(points, point_clusters, centres, rows))
    store.write_text("clusters.html", cluster_map_html(points, point_clusters, centres, rows))


# --- readers for later stages ---------------------------------------------------------------------


def read_topics(out: str) -> pa.Table:
    store = open_store(out)
    with store.fs.open(store.path(TOPICS_FILE), "rb") as handle:
        return pq.read_table(handle)


def read_assignments(out: str) -> Iterator[pa.Table]:
    """Assignment shards one at a time, in document order."""
    yield from open_store(out).read_tables(ASSIGNMENTS_DIR)


def document_topics(out: str, id_column: str | None = None) -> dict[str, str | None]:
    """Document id -> topic label for documents in kept, labelled clusters (what prompts use), and
    -> None for documents of clusters the keep rule dropped (which seed no prompt by default).

    A kept cluster without a label (labelling off) names no topic, so its documents are not here.
    """
    topics = read_topics(out).to_pylist()
    labels = {row["cluster_id"]: row["label"] for row in topics if row["kept"] and row["label"] is not None}
    dropped = {row["cluster_id"] for row in topics if not row["kept"]}
    mapping: dict[str, str | None] = {}
    for shard in read_assignments(out):
        column = id_column or shard.column_names[0]
        ids = shard.column(column).to_pylist()
        for doc_id, cluster in zip(ids, shard.column("cluster_id").to_pylist(), strict=True):
            if cluster in dropped:
                mapping[doc_id] = None
            elif (label := labels.get(cluster)) is not None:
                mapping[doc_id] = label
    return mapping
