"""`cosmo cluster`: group a web corpus into topics, name them with a model, keep the useful ones.

Registration only builds the parser; torch, faiss and the model load inside the command, so
`cosmo --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cluster",
        help="cluster web seed documents into labelled, scored topics",
        description=(
            "Embed the documents of INPUT (parquet, jsonl or csv; any fsspec URI), cluster them with "
            "k-means, ask a chat model to name and score each cluster, and write topics.parquet, "
            "assignments/, topics.md and clusters.png under --out."
        ),
    )
    parser.add_argument("input", metavar="INPUT", help="parquet/jsonl/csv file or URI, or hf://datasets/<id>")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder or fsspec URI")
    parser.add_argument("--clusters", type=int, default=145, metavar="K", help="number of clusters (145)")
    parser.add_argument("--text-field", default="text", metavar="F", help="column with the text (text)")
    parser.add_argument(
        "--id-field", default=None, metavar="F", help="column with document ids (default: the row number)"
    )
    parser.add_argument(
        "--format",
        choices=("auto", "parquet", "jsonl", "csv", "hf"),
        default="auto",
        help="input format (auto)",
    )
    parser.add_argument("--no-label", action="store_true", help="skip labelling; every cluster is kept")
    parser.add_argument("--endpoint", metavar="URL", help="base URL of a TGI or OpenAI-compatible server")
    parser.add_argument("--engine", choices=("tgi", "openai"), default="tgi", help="server kind (tgi)")
    parser.add_argument("--model", default=None, help="model name sent to the server (tgi: ignored)")
    parser.add_argument("--seed", type=int, default=42, help="seed for sampling and k-means (42)")
    parser.add_argument(
        "--embedding-model",
        default="sentence-transformers/all-MiniLM-L6-v2",
        metavar="NAME",
        help="sentence-transformers name, model2vec:NAME or model2vec-distill:NAME",
    )
    parser.add_argument("--sample-size", type=int, default=100_000, metavar="N", help="documents for the fit")
    parser.add_argument("--samples-per-label", type=int, default=10, metavar="N", help="extracts per cluster")
    parser.add_argument("--min-score", type=float, default=3.0, help="lowest educational score kept (3)")
    parser.add_argument(
        "--exclude", action="append", default=None, metavar="PHRASE", help="topic to drop (repeatable)"
    )
    parser.add_argument("--cache", default=None, metavar="URI", help="embedding cache (default: DIR/cache)")
    parser.add_argument(
        "--restarts",
        type=int,
        default=5,
        metavar="N",
        help="k-means++ starts drawn; the cheapest is fitted (5)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from cosmoforge.clustering.embed import EmbeddingModelError
    from cosmoforge.clustering.kmeans import ClusteringInputError
    from cosmoforge.clustering.label import ChatClient, EndpointError
    from cosmoforge.clustering.pipeline import ClusterConfig, ClusterInput, run_clustering

    if args.clusters < 1:
        return _fail("--clusters must be at least 1")
    if args.restarts < 1:
        return _fail("--restarts must be at least 1")
    if not args.no_label and not args.endpoint:
        return _fail("labelling needs --endpoint URL of a chat server (or pass --no-label)")
    if args.engine == "openai" and not args.model and not args.no_label:
        return _fail("--engine openai needs --model")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # it announces every library it loads
    defaults = ClusterConfig()
    config = ClusterConfig(
        clusters=args.clusters,
        sample_size=args.sample_size,
        samples_per_label=args.samples_per_label,
        min_educational_score=args.min_score,
        exclude_topics=tuple(args.exclude) if args.exclude is not None else defaults.exclude_topics,
        seed=args.seed,
        embedding_model=args.embedding_model,
        kmeans_restarts=args.restarts,
    )
    client = None
    if not args.no_label:
        client = ChatClient(args.endpoint, model=args.model or "tgi", engine=args.engine, seed=args.seed)
    try:
        summary = run_clustering(
            ClusterInput(args.input, text_field=args.text_field, id_field=args.id_field, format=args.format),
            args.out,
            config,
            complete=client,
            cache_uri=args.cache,
        )
    except (ClusteringInputError, EmbeddingModelError) as error:
        return _fail(str(error))
    except EndpointError as error:
        return _fail(f"labelling stopped: {error}")
    finally:
        if client is not None:
            client.close()
    print(
        f"{summary.documents} documents ({summary.skipped_empty} empty skipped) -> "
        f"{summary.clusters} clusters; "
        f"kept {summary.kept_clusters} clusters / {summary.kept_documents} documents; "
        f"label failures: {summary.label_failures}"
    )
    for name, uri in summary.outputs.items():
        print(f"  {name}: {uri}")
    return 0


def _fail(message: str) -> int:
    print(f"cosmo cluster: {message}", file=sys.stderr)
    return 2
