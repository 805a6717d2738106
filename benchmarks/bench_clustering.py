"""Topic clustering, side by side: our faiss k-means vs a text-clustering-style UMAP + HDBSCAN.

Both sides cluster the same embeddings of a labelled corpus of real text, so the comparison is
about the clustering method: wall time, and agreement with the labels (NMI, purity). The
corpus is paragraphs of two real documentation sets that Debian packages
(`apt-get install python3.11-doc debian-handbook`), labelled by the chapter they come from:
the Python library reference (Text Processing, Concurrent Execution, Internet Protocols, ...)
and the Debian Administrator's Handbook (Packaging System, Security, Network Services, ...).
Without those packages the corpus falls back to the docstrings of the standard library,
labelled by top-level package (always there, but shorter and noisier texts).

It also measures the two embedding models (all-MiniLM-L6-v2 as the package ships it, and a
model2vec static model distilled from it on this machine) and the throughput of streaming
assignment: the stage's second pass, reading documents and cached vectors and writing
assignment shards.

Timing: both sides run warm (UMAP is run once on the full corpus before anything is timed:
its nearest-neighbour descent and layout are compiled by numba on first use, ~25 s, which a
run on a few hundred vectors does not trigger) and each is timed as the best of `--repeat`
runs, with the same thread limit for faiss, BLAS and numba (`--threads`, default 1: on a
machine shared with other work, one thread per side is what reproduces).

    .venv/bin/python benchmarks/bench_clustering.py [--per-label 120] [--stream-docs 49152]
        [--threads 1] [--repeat 2]
"""

from __future__ import annotations

import argparse
import collections
import html.parser
import importlib
import inspect
import json
import os
import pkgutil
import random
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cosmoforge.clustering.embed import (
    DEFAULT_MODEL,
    M2V_DISTILL_PREFIX,
    Embedder,
    EmbeddingCache,
    batch_key,
    embed_batch,
    load_embedder,
)
from cosmoforge.clustering.kmeans import Assigner, fit_centroids, fit_topic_centroids

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/library")
DEBIAN_HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")
# Chapters that gather unrelated modules or hold a page or two: no topic to find.
SKIP_CHAPTERS = {
    "Introduction",
    "Superseded Modules",
    "Security Considerations",
    "Custom Python Interpreters",
}
MIN_CHARS = 200


class _Paragraphs(html.parser.HTMLParser):
    """Text of each paragraph in a page: Sphinx writes <p>, DocBook writes <div class="para">."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[tuple[str, bool]] = []  # (tag, is a paragraph) for open <p> and <div>
        self.current: list[str] = []
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("p", "div"):
            classes = (dict(attrs).get("class") or "").split()
            self.open.append((tag, tag == "p" or "para" in classes))

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("p", "div"):
            return
        while self.open:
            open_tag, is_paragraph = self.open.pop()
            if is_paragraph and not any(para for _, para in self.open):
                self.found.append(" ".join("".join(self.current).split()))
                self.current = []
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if any(para for _, para in self.open):
            self.current.append(data)


def paragraphs(path: Path) -> list[str]:
    parser = _Paragraphs()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return [text for text in parser.found if len(text) >= MIN_CHARS]


def python_docs() -> list[tuple[str, str]]:
    link = r'toctree-l1"><a class="reference internal" href="([^"#]*)"'
    index = (PYTHON_DOCS / "index.html").read_text()
    docs: list[tuple[str, str]] = []
    for href, title in re.findall(link + r">([^<]*)", index):
        if title in SKIP_CHAPTERS:
            continue
        pages = {href}
        for module in re.findall(link, (PYTHON_DOCS / href).read_text()):
            pages.add(module)
            # Packages document their parts on sub-pages (asyncio-task.html, email.parser.html).
            pages.update(re.findall(link, (PYTHON_DOCS / module).read_text()))
        for page in sorted(pages):
            docs += [(text, f"python: {title}") for text in paragraphs(PYTHON_DOCS / page)]
    return docs


def debian_handbook() -> list[tuple[str, str]]:
    pages: dict[str, tuple[str | None, str]] = {}  # page -> (parent page, title)
    for page in sorted(DEBIAN_HANDBOOK.glob("*.html")):
        text = page.read_text(encoding="utf-8", errors="replace")
        up = re.search(r'<link rel="up" href="([^"]*)"', text)
        title = re.search(r"<title[^>]*>([^<]*)</title>", text)
        pages[page.name] = (up.group(1) if up else None, title.group(1).strip() if title else "")

    def chapter(name: str) -> str | None:
        seen = set()
        while name in pages and name not in seen:
            seen.add(name)
            parent, title = pages[name]
            if title.startswith("Chapter"):
                return " ".join(title.split()).split(". ", 1)[-1]
            name = parent or ""
        return None  # preface, appendices, index

    docs: list[tuple[str, str]] = []
    for name in pages:
        label = chapter(name)
        if label is not None:
            docs += [(paragraph, f"debian: {label}") for paragraph in paragraphs(DEBIAN_HANDBOOK / name)]
    return docs


def stdlib_docstrings() -> list[tuple[str, str]]:
    """Docstrings of public functions and classes, labelled by top-level stdlib package."""
    docs: list[tuple[str, str]] = []
    packages = ["asyncio", "email", "xml", "http", "unittest", "json", "logging", "sqlite3"]
    packages += ["multiprocessing", "concurrent", "importlib", "urllib", "tkinter", "ctypes", "curses"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for package in packages:
            try:
                root = importlib.import_module(package)
            except ImportError:
                continue
            found = pkgutil.walk_packages(getattr(root, "__path__", []), package + ".")
            names = [package, *(module.name for module in found)]
            for name in names:
                try:
                    module = importlib.import_module(name)
                except Exception:  # platform-specific modules fail to import: skip them
                    continue
                for _, member in inspect.getmembers(module, _function_or_class):
                    doc = inspect.getdoc(member) or ""
                    if getattr(member, "__module__", "") == name and len(doc) >= MIN_CHARS:
                        docs.append((doc[:2000], package))
    return docs


def _function_or_class(member: object) -> bool:
    return inspect.isfunction(member) or inspect.isclass(member)


def build_corpus(per_label: int, seed: int) -> tuple[list[str], list[str], str]:
    if PYTHON_DOCS.exists() and DEBIAN_HANDBOOK.exists():
        docs = python_docs() + debian_handbook()
        name = "Python library reference + Debian handbook, by chapter"
    else:
        docs, name = stdlib_docstrings(), "standard library docstrings, by package"
    by_label: dict[str, list[str]] = collections.defaultdict(list)
    for text, label in docs:
        by_label[label].append(text)
    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[str] = []
    for label in sorted(by_label):
        unique = sorted(set(by_label[label]))
        if len(unique) < 30:
            continue
        chosen = rng.sample(unique, min(per_label, len(unique)))
        texts += chosen
        labels += [label] * len(chosen)
    return texts, labels, name


# --- measures -----------------------------------------------------------------------------------------


def purity(labels: Sequence[str], clusters: np.ndarray) -> float:
    counts: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for label, cluster in zip(labels, clusters.tolist(), strict=True):
        counts[cluster][label] += 1
    return sum(c.most_common(1)[0][1] for c in counts.values()) / len(labels)


def quality(labels: Sequence[str], clusters: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import normalized_mutual_info_score

    return {"nmi": normalized_mutual_info_score(labels, clusters), "purity": purity(labels, clusters)}


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def embed_all(embedder: Embedder, texts: Sequence[str], cache: EmbeddingCache) -> np.ndarray:
    batches = [texts[start : start + 512] for start in range(0, len(texts), 512)]
    return np.concatenate([embed_batch(embedder, batch, cache) for batch in batches])


def ours(vectors: np.ndarray, k: int, seed: int, *, neighbours: int, restarts: int) -> np.ndarray:
    """What the stage does: neighbour-graph smoothing and k-means on the sample, then assignment."""
    centroids = fit_topic_centroids(vectors, k, seed, neighbours=neighbours, restarts=restarts)
    clusters, _ = Assigner(centroids).assign(vectors)
    return clusters


def best_time(function: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    """The first run's result and the shortest of `repeat` runs' times (others' load only adds)."""
    result, seconds = timed(function)
    for _ in range(repeat - 1):
        seconds = min(seconds, timed(function)[1])
    return result, seconds


def nearest_centroid(vectors: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """A partition redrawn as nearest centroid (its clusters' mean vectors): what streaming keeps.

    The stage assigns millions of documents one batch at a time, so a topic must be a region
    around a centroid. This shows how much of the baseline's quality survives that constraint.
    """
    from cosmoforge.clustering.kmeans import member_means

    k = int(clusters.max() + 1)
    centroids = member_means(vectors, clusters, np.zeros((k, vectors.shape[1]), dtype=np.float32))
    return Assigner(centroids).assign(vectors)[0]


def limit_threads(threads: int) -> Any:
    """faiss, BLAS, scikit-learn's OpenMP and numba (UMAP) held to `threads` until restored.

    threadpoolctl only reaches libraries already loaded, so the clustering libraries are
    imported first (the embedding model's torch keeps its own threads: it is not timed here).
    """
    import faiss
    import numba
    import sklearn.cluster
    import umap
    from threadpoolctl import threadpool_limits

    del sklearn.cluster, umap  # imported for their native libraries only
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    faiss.omp_set_num_threads(threads)
    return threadpool_limits(limits=threads)


def search_all(assigner: Assigner, vectors: np.ndarray, batch: int = 8192) -> None:
    for start in range(0, len(vectors), batch):
        assigner.assign(vectors[start : start + batch])


def umap_2d(vectors: np.ndarray) -> np.ndarray:
    import umap

    # As text-clustering does: cosine UMAP to 2-D; no random_state, which would forbid threads.
    reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=15, min_dist=0.0)
    return np.asarray(reducer.fit_transform(vectors))


def hdbscan(points: np.ndarray, min_cluster_size: int) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    return np.asarray(HDBSCAN(min_cluster_size=min_cluster_size).fit_predict(points))


def cover_noise(points: np.ndarray, found: np.ndarray) -> np.ndarray:
    """HDBSCAN's noise given the label of its nearest clustered neighbour in the 2-D map.

    text-clustering leaves noise without a topic; a run that conditions every web prompt on a
    topic needs one, so this is the baseline made to cover every document.
    """
    from sklearn.neighbors import KNeighborsClassifier

    noise = found < 0
    if noise.all() or not noise.any():
        return found
    covered = found.copy()
    covered[noise] = (
        KNeighborsClassifier(n_neighbors=1).fit(points[~noise], found[~noise]).predict(points[noise])
    )
    return covered


def dbscan(points: np.ndarray) -> np.ndarray:
    from sklearn.cluster import DBSCAN

    return np.asarray(DBSCAN(eps=0.08, min_samples=50).fit_predict(points))


def row(name: str, seconds: float, scores: dict[str, float], extra: str = "") -> str:
    return f"| {name} | {seconds:.2f} | {scores['nmi']:.3f} | {scores['purity']:.3f} | {extra} |"


def streaming_pass(
    texts: Sequence[str], vectors: np.ndarray, embedder: Embedder, docs: int, cache_dir: str
) -> dict[str, float]:
    """The stage's second pass over `docs` documents whose vectors are cached: documents/s."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cosmoforge.clustering.pipeline import ClusterConfig, ClusterInput, run_clustering

    picks = np.arange(4096) % len(texts)
    block = [texts[int(i)] for i in picks]
    # The vectors of these texts are known already: seed the cache so no pass embeds again.
    config = ClusterConfig(clusters=145, read_batch=4096, sample_size=20_000)
    key_texts = [text[: config.max_embed_chars] for text in block]
    EmbeddingCache.open(cache_dir).put(embedder.name, batch_key(embedder.name, key_texts), vectors[picks])
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "stream.parquet"
        writer = pq.ParquetWriter(source, pa.schema([("id", pa.string()), ("text", pa.string())]))
        for start in range(0, docs, 4096):  # every batch has the same texts: one cached vector file
            ids = [f"doc-{start + i}" for i in range(4096)]
            writer.write_table(pa.table({"id": ids, "text": block}))
        writer.close()
        data = ClusterInput(str(source), id_field="id")
        summary = run_clustering(
            data, str(Path(work) / "out"), config, embedder=embedder, cache_uri=cache_dir
        )
    assert summary.embedded_batches == 0
    return {
        "documents": summary.documents,
        "pass2_seconds": summary.seconds["assign"],
        "pass2_docs_per_s": summary.documents / summary.seconds["assign"],
        "pass1_docs_per_s_cached": summary.documents / summary.seconds["embed"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-label", type=int, default=120, help="paragraphs per label (120)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--stream-docs", type=int, default=49_152, help="documents in the streaming pass")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "cosmoforge-bench-cache"))
    parser.add_argument("--skip-model2vec", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="threads for both sides (1); 0: libraries' defaults"
    )
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per side, best kept (2)")
    parser.add_argument("--neighbours", type=int, help="smoothing neighbours (default: the stage's)")
    parser.add_argument("--restarts", type=int, help="k-means++ starts (default: the stage's)")
    args = parser.parse_args(argv)
    from cosmoforge.clustering.pipeline import ClusterConfig

    stage = ClusterConfig()
    neighbours = stage.smoothing_neighbours if args.neighbours is None else args.neighbours
    restarts = stage.kmeans_restarts if args.restarts is None else args.restarts
    fit = partial(ours, neighbours=neighbours, restarts=restarts)
    warnings.filterwarnings("ignore")
    limiter = limit_threads(args.threads) if args.threads > 0 else None
    cache = EmbeddingCache.open(os.path.join(args.cache, "embeddings"))

    texts, labels, corpus = build_corpus(args.per_label, args.seed)
    k = len(set(labels))
    median = int(np.median([len(text) for text in texts]))
    print(f"corpus: {corpus}: {len(texts)} paragraphs, {k} labels, median {median} chars")
    threads = {name: os.environ.get(name, "unset") for name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, {threads}, "
        f"--threads {args.threads or 'library defaults'}, best of {args.repeat} runs; "
        f"ours with {neighbours} smoothing neighbours, {restarts} k-means++ starts"
    )

    minilm = load_embedder(DEFAULT_MODEL)
    probe = texts[:512]
    _, minilm_probe = timed(lambda: minilm.encode(probe))
    vectors = embed_all(minilm, texts, cache)
    print(f"all-MiniLM-L6-v2: {len(probe) / minilm_probe:.0f} documents/s (512-document probe, no cache)")

    # Compile numba's kernels outside the timing, on the full corpus: below 4,096 vectors UMAP
    # takes exact neighbours and never compiles the nearest-neighbour descent it uses here.
    umap_2d(vectors)
    points, umap_seconds = best_time(lambda: umap_2d(vectors), args.repeat)
    lines = [
        "| clusters | method (same MiniLM vectors) | seconds | NMI | purity | unassigned "
        "| NMI of assigned only |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    pairs: list[dict[str, float]] = []
    for size in (5, 10, 25):
        found, seconds = best_time(partial(hdbscan, points, size), args.repeat)
        base_seconds, clusters = umap_seconds + seconds, int(found.max() + 1)
        base, noise = quality(labels, found), float((found < 0).mean())  # noise counts as one cluster
        kept = found >= 0
        assigned = quality([label for label, keep in zip(labels, kept, strict=True) if keep], found[kept])
        covered, cover_seconds = timed(partial(cover_noise, points, found))
        covered_scores = quality(labels, covered)
        streamable = quality(labels, nearest_centroid(vectors, covered))
        mine, mine_seconds = best_time(partial(fit, vectors, clusters, args.seed), args.repeat)
        scores = quality(labels, mine)
        lines.append(
            f"| {clusters} | UMAP 2-D + HDBSCAN(min_cluster_size={size}) | {base_seconds:.2f} | "
            f"{base['nmi']:.3f} | {base['purity']:.3f} | {noise:.0%} | {assigned['nmi']:.3f} |"
        )
        lines.append(
            f"| {clusters} | the same, noise moved to the nearest cluster | "
            f"{base_seconds + cover_seconds:.2f} | {covered_scores['nmi']:.3f} | "
            f"{covered_scores['purity']:.3f} | 0% | {covered_scores['nmi']:.3f} |"
        )
        lines.append(
            f"| {clusters} | the same, redrawn as nearest centroid (streamable) | - | "
            f"{streamable['nmi']:.3f} | {streamable['purity']:.3f} | 0% | {streamable['nmi']:.3f} |"
        )
        lines.append(
            f"| {clusters} | ours: smoothing + spherical k-means, k={clusters} | {mine_seconds:.2f} | "
            f"{scores['nmi']:.3f} | {scores['purity']:.3f} | 0% | {scores['nmi']:.3f} |"
        )
        pairs.append(
            {
                "k": clusters,
                "speedup": base_seconds / mine_seconds,
                "ours_seconds": mine_seconds,
                "baseline_seconds": base_seconds,
                "nmi": scores["nmi"],
                "baseline_nmi": base["nmi"],
                "covered_nmi": covered_scores["nmi"],
                "purity": scores["purity"],
                "baseline_purity": base["purity"],
                "covered_purity": covered_scores["purity"],
                "streamable_nmi": streamable["nmi"],
                "streamable_purity": streamable["purity"],
            }
        )
    found, seconds = timed(lambda: dbscan(points))
    text_clustering = quality(labels, found)
    lines.append(
        f"| {int(found.max() + 1)} | UMAP 2-D + DBSCAN(eps=0.08, min_samples=50) | "
        f"{umap_seconds + seconds:.2f} | {text_clustering['nmi']:.3f} | {text_clustering['purity']:.3f} | "
        f"{(found < 0).mean():.0%} | - |"
    )
    ours_clusters, ours_seconds = best_time(lambda: fit(vectors, k, args.seed), args.repeat)
    ours_scores = quality(labels, ours_clusters)
    lines.append(
        f"| {k} | ours: smoothing + spherical k-means, k = number of labels | {ours_seconds:.2f} | "
        f"{ours_scores['nmi']:.3f} | {ours_scores['purity']:.3f} | 0% | {ours_scores['nmi']:.3f} |"
    )
    print()
    print("\n".join(lines))
    print()
    for pair in pairs:
        print(
            f"k={pair['k']:.0f}: ours {pair['speedup']:.1f}x faster "
            f"({pair['ours_seconds']:.2f} s vs {pair['baseline_seconds']:.2f} s), "
            f"NMI {pair['nmi']:.3f} vs {pair['baseline_nmi']:.3f}, "
            f"purity {pair['purity']:.3f} vs {pair['baseline_purity']:.3f} "
            f"(baseline with its noise covered: NMI {pair['covered_nmi']:.3f}, "
            f"purity {pair['covered_purity']:.3f}; that, as nearest centroid: NMI "
            f"{pair['streamable_nmi']:.3f}, purity {pair['streamable_purity']:.3f})"
        )

    results: dict[str, Any] = {"corpus": corpus, "documents": len(texts), "labels": k}
    if not args.skip_model2vec:
        static, distill_seconds = timed(lambda: load_embedder(M2V_DISTILL_PREFIX + DEFAULT_MODEL))
        static_vectors, static_all = timed(lambda: static.encode(texts))
        static_scores = quality(labels, fit(static_vectors, k, args.seed))
        print(
            f"\nembedding models, our k-means on each (k={k}):\n"
            f"| model | documents/s | NMI | purity |\n|---|---:|---:|---:|\n"
            f"| all-MiniLM-L6-v2 (shipped package) | {len(probe) / minilm_probe:.0f} | "
            f"{ours_scores['nmi']:.3f} | {ours_scores['purity']:.3f} |\n"
            f"| model2vec distilled from it (256-d) | {len(texts) / static_all:.0f} | "
            f"{static_scores['nmi']:.3f} | {static_scores['purity']:.3f} |\n"
            f"(model2vec distillation: {distill_seconds:.1f} s once, or a cached load)"
        )
        results["model2vec"] = {"docs_per_s": len(texts) / static_all, **static_scores}

    stream = streaming_pass(texts, vectors, minilm, args.stream_docs, os.path.join(args.cache, "embeddings"))
    print(
        f"\nstreaming assignment, k=145, {stream['documents']} documents from parquet with cached vectors: "
        f"{stream['pass2_docs_per_s']:.0f} documents/s (read + nearest centroid + write shards)"
    )
    assigner = Assigner(fit_centroids(vectors, min(145, len(vectors)), args.seed, restarts=1))
    tiled = np.tile(vectors, (max(1, 200_000 // len(vectors)), 1))
    _, search_seconds = timed(lambda: search_all(assigner, tiled))
    print(f"nearest-centroid search alone, k=145: {len(tiled) / search_seconds:.0f} documents/s")
    results.update(pairs=pairs, ours_k_labels=ours_scores, stream=stream)
    print("\n" + json.dumps(results, default=float))
    if limiter is not None:
        limiter.restore_original_limits()
    return 0


if __name__ == "__main__":
    sys.exit(main())
