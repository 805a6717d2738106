"""Cluster labelling on real text through the embedded model server: does every cluster get a
label and a score, and would a reader accept them?

The corpus is the one `bench_clustering.py` builds (paragraphs of the Python library reference
and the Debian Administrator's Handbook, labelled by chapter; the standard library's docstrings
when those packages are missing). The stage runs end to end (embedding, k-means, labelling)
with `ChatClient` against SmolLM2-135M-Instruct on llama.cpp behind the embedded server's HTTP
API, once per mode:

- `structured`: the label schema goes out as `response_format`; the server decodes under it.
- `prompt`: the same conversation without it (what a server without structured output gives).

For each mode it prints how many clusters got a label and a score, how long labelling took,
and a table of label, score and the cluster's majority chapter, for a reader to judge.

    .venv/bin/python benchmarks/bench_labelling.py [--clusters 20] [--modes structured,prompt]
        [--endpoint URL]   # an already running server (TGI, vLLM, ...) instead of the embedded one
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_clustering import build_corpus  # noqa: E402  (a sibling script, not a package)

from cosmoforge.clustering.label import ChatClient  # noqa: E402
from cosmoforge.clustering.pipeline import (  # noqa: E402
    ClusterConfig,
    ClusterInput,
    read_assignments,
    read_topics,
    run_clustering,
)


def write_corpus(texts: list[str], folder: Path) -> Path:
    path = folder / "corpus.jsonl"
    with path.open("w") as handle:
        for number, text in enumerate(texts):
            handle.write(json.dumps({"id": str(number), "text": text}) + "\n")
    return path


def majority_chapters(out: str, labels: list[str]) -> dict[int, tuple[str, float]]:
    """Cluster -> (its most common true chapter, that chapter's share of the cluster)."""
    counts: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for shard in read_assignments(out):
        ids = shard.column("id").to_pylist()
        for doc_id, cluster in zip(ids, shard.column("cluster_id").to_pylist(), strict=True):
            counts[cluster][labels[int(doc_id)]] += 1
    majority = {}
    for cluster, counter in counts.items():
        chapter, count = counter.most_common(1)[0]
        majority[cluster] = (chapter, count / sum(counter.values()))
    return majority


def run_mode(
    mode: str, corpus: Path, labels: list[str], endpoint: str, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    client = ChatClient(endpoint) if mode == "structured" else ChatClient(endpoint, structured_output=False)
    out = str(work / mode)
    config = ClusterConfig(clusters=args.clusters, seed=args.seed, label_wait_seconds=0.5)
    try:
        summary = run_clustering(
            ClusterInput(str(corpus), id_field="id"),
            out,
            config,
            complete=client,
            cache_uri=os.path.join(args.cache, "embeddings"),
        )
    finally:
        client.close()
    majority = majority_chapters(out, labels)
    rows = sorted(read_topics(out).to_pylist(), key=lambda row: -row["size"])
    with_score = [row for row in rows if row["label"] is not None and row["score"] is not None]
    table = [
        "| size | label | score | kept | majority chapter (share of the cluster) |",
        "|---:|---|---:|---|---|",
    ]
    for row in rows:
        chapter, share = majority.get(row["cluster_id"], ("-", 0.0))
        label = row["label"] if row["label"] is not None else f"*label failed* ({row['label_error']})"
        score = f"{row['score']:g}" if row["score"] is not None else "-"
        kept = "yes" if row["kept"] else f"no: {row['reason']}"
        table.append(f"| {row['size']} | {label} | {score} | {kept} | {chapter} ({share:.0%}) |")
    attempts = sum(row["label_attempts"] for row in rows)
    return {
        "mode": mode,
        "clusters": len(rows),
        "labelled": len(with_score),
        "distinct_labels": len({row["label"].lower() for row in with_score}),
        "requests": attempts,
        "label_seconds": summary.seconds["label"],
        "seconds_per_cluster": summary.seconds["label"] / max(1, len(rows)),
        "label_output": getattr(summary, "label_output", None),  # absent before structured output
        "scores": collections.Counter(int(row["score"]) for row in with_score),
        "table": "\n".join(table),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clusters", type=int, default=20, help="k (20)")
    parser.add_argument("--per-label", type=int, default=120, help="paragraphs per chapter (120)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--modes", default="structured,prompt", help="structured,prompt")
    parser.add_argument("--endpoint", help="a running chat server; default: start the embedded one")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "cosmoforge-bench-cache"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    texts, labels, corpus_name = build_corpus(args.per_label, args.seed)
    print(f"corpus: {corpus_name}: {len(texts)} paragraphs, {len(set(labels))} chapters; k={args.clusters}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    server = None
    if args.endpoint is None:
        from cosmoforge.cli.embedded import ModelServer

        started = time.perf_counter()
        server = ModelServer().start()
        print(f"embedded model server up in {time.perf_counter() - started:.1f} s at {server.url}")
    endpoint = args.endpoint or (server.url if server else "")
    results = []
    try:
        with tempfile.TemporaryDirectory() as work:
            corpus = write_corpus(texts, Path(work))
            for mode in args.modes.split(","):
                result = run_mode(mode.strip(), corpus, labels, endpoint, args, Path(work))
                results.append(result)
                print(
                    f"\n## {result['mode']}: {result['labelled']} of {result['clusters']} clusters "
                    f"labelled with a score ({result['distinct_labels']} distinct labels), "
                    f"{result['requests']} requests, labelling {result['label_seconds']:.1f} s "
                    f"({result['seconds_per_cluster']:.1f} s per cluster, "
                    f"load average {os.getloadavg()[0]:.1f}); asked as: {result['label_output']}; "
                    f"scores: {dict(sorted(result['scores'].items()))}\n"
                )
                print(result["table"])
    finally:
        if server is not None:
            server.stop()
    print("\n" + json.dumps([{k: v for k, v in r.items() if k != "table"} for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
