"""`cosmo decontaminate`, `cosmo dedup` and `cosmo decontaminator`: post-processing from the shell.

The first two read a parquet/jsonl file or folder (local or any fsspec URI), write what they
keep and what they remove side by side under `--out`, and account for every row: nothing is
dropped without a row in `removed.parquet` saying why. The third serves the same check over
gRPC to documents as they are generated. A problem with the input or the settings is a
one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DEFAULT_GROUP_FIELD = "seed_source"  # repeated from cosmoforge.postprocess to keep --help import-light


def register(subparsers: Any) -> None:
    decontaminate = subparsers.add_parser(
        "decontaminate",
        help="remove documents that contain evaluation benchmark samples",
        description=(
            "Remove documents sharing an n-gram with a benchmark sample whose SequenceMatcher "
            "ratio exceeds the threshold; write kept.parquet, removed.parquet, report.json, report.md."
        ),
    )
    decontaminate.add_argument(
        "input", metavar="INPUT", help="parquet/jsonl file or folder, path or fsspec URI"
    )
    decontaminate.add_argument(
        "--benchmark",
        action="append",
        required=True,
        metavar="NAME|PATH|NAME=PATH",
        help="a known benchmark (mmlu, hellaswag, piqa, siqa, winogrande, openbookqa, arc_easy, "
        "arc_challenge, boolq), a local file, or NAME=PATH; repeat for several",
    )
    decontaminate.add_argument(
        "--out", required=True, metavar="DIR", help="output folder, path or fsspec URI"
    )
    decontaminate.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    decontaminate.add_argument(
        "--ngram", type=int, default=10, help="candidate n-gram size in words (default: 10)"
    )
    decontaminate.add_argument(
        "--threshold", type=float, default=0.5, help="remove when ratio > this (default: 0.5)"
    )
    decontaminate.add_argument(
        "--min-block-chars", type=int, default=5, help="count matching blocks longer than this (default: 5)"
    )
    decontaminate.add_argument(
        "--group-field",
        default=None,
        help=f"column naming each row's seed-data group (default: {DEFAULT_GROUP_FIELD}, if present)",
    )
    decontaminate.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    decontaminate.set_defaults(func=run_decontaminate)

    service = subparsers.add_parser(
        "decontaminator",
        help="serve benchmark decontamination over gRPC (Check a stream of documents, Report)",
        description="Build the benchmark index once, then serve the Decontaminator gRPC service "
        "and the gRPC health service until SIGTERM/SIGINT.",
    )
    service.add_argument("--port", type=int, default=50052, help="gRPC port (default: 50052; 0: any free)")
    service.add_argument("--host", default="0.0.0.0", help="address to listen on")
    service.add_argument(
        "--benchmark",
        action="append",
        required=True,
        metavar="NAME|PATH|NAME=PATH",
        help="as for decontaminate; repeat for several",
    )
    service.add_argument("--ngram", type=int, default=10, help="candidate n-gram size in words (default: 10)")
    service.add_argument(
        "--threshold", type=float, default=0.5, help="contaminated when ratio > this (default: 0.5)"
    )
    service.add_argument(
        "--min-block-chars", type=int, default=5, help="count matching blocks longer than this (default: 5)"
    )
    service.add_argument("--log-format", choices=("text", "json"), default="text")
    service.set_defaults(func=run_decontaminator)

    dedup = subparsers.add_parser(
        "dedup",
        help="remove exact and near duplicates (content hash + datatrove MinHash)",
        description="Remove exact duplicates, then near-duplicates with datatrove's MinHash; "
        "write kept.parquet, removed.parquet (with cluster ids) and counts.json.",
    )
    dedup.add_argument("input", metavar="INPUT", help="parquet/jsonl file or folder, path or fsspec URI")
    dedup.add_argument("--out", required=True, metavar="DIR", help="output folder, path or fsspec URI")
    dedup.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    dedup.add_argument("--ngram", type=int, default=5, help="MinHash word n-gram size (default: 5)")
    dedup.add_argument("--buckets", type=int, default=14, help="MinHash bands (default: 14)")
    dedup.add_argument("--hashes-per-bucket", type=int, default=8, help="hashes per band (default: 8)")
    dedup.add_argument("--workers", type=int, default=1, help="processes for the MinHash steps (default: 1)")
    dedup.add_argument("--no-exact", action="store_true", help="skip exact (content hash) dedup")
    dedup.set_defaults(func=run_dedup)


def _fail(command: str, error: Exception) -> int:
    print(f"cosmo {command}: error: {error}", file=sys.stderr)
    return 2


def run_decontaminate(args: argparse.Namespace) -> int:
    from cosmoforge import decontam
    from cosmoforge.postprocess import decontaminate_dataset

    try:
        config = decontam.Config(args.ngram, args.threshold, args.min_block_chars)
        if args.workers is not None and args.workers < 1:
            raise decontam.DecontamError(f"--workers must be at least 1, got {args.workers}")
        report = decontaminate_dataset(
            args.input, args.out, args.benchmark, config, args.text_field, args.group_field, args.workers
        )
    except (decontam.DecontamError, OSError) as error:
        return _fail("decontaminate", error)
    per_benchmark = ", ".join(
        f"{name} {entry['removed']} ({entry['unique_items']})" for name, entry in report["benchmarks"].items()
    )
    print(
        f"{report['documents']} documents: kept {report['documents_kept']}, "
        f"removed {report['documents_removed']} "
        f"[{per_benchmark}]; {report['near_miss_count']} near-misses; wrote {args.out}"
    )
    return 0


def run_decontaminator(args: argparse.Namespace) -> int:
    import asyncio

    from cosmoforge import decontam, decontam_service, logs

    logs.configure(args.log_format)
    try:
        config = decontam.Config(args.ngram, args.threshold, args.min_block_chars)
        index = decontam_service.build_index(args.benchmark, config)
        asyncio.run(decontam_service.serve(index, args.port, args.host))
    except (decontam.DecontamError, OSError) as error:  # a bad benchmark, setting or port
        return _fail("decontaminator", error)
    return 0


def run_dedup(args: argparse.Namespace) -> int:
    from cosmoforge import dedup
    from cosmoforge.decontam import DecontamError
    from cosmoforge.postprocess import dedup_dataset

    try:
        config = dedup.DedupConfig(
            ngram=args.ngram,
            buckets=args.buckets,
            hashes_per_bucket=args.hashes_per_bucket,
            exact=not args.no_exact,
        )
        if args.workers < 1:
            raise dedup.DedupError(f"--workers must be at least 1, got {args.workers}")
        counts = dedup_dataset(args.input, args.out, config, args.text_field, args.workers)
    except (DecontamError, dedup.DedupError, OSError) as error:
        return _fail("dedup", error)
    print(
        f"{counts['documents']} documents: kept {counts['kept']}, "
        f"removed {counts['removed_exact']} exact and "
        f"{counts['removed_minhash']} near duplicates in {counts['clusters']} clusters; wrote {args.out}"
    )
    return 0
