"""`cosmo decontaminate` and `cosmo dedup`: post-processing of a generated dataset from the shell.

Both read a parquet/jsonl file or folder (local or any fsspec URI), write what they keep and
what they remove side by side under `--out`, and account for every row: nothing is dropped
without a row in `removed.parquet` saying why. A problem with the input or the settings is a
one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DECONTAM_COLUMNS = (
    "decontam_benchmark",
    "decontam_item_index",
    "decontam_item_text",
    "decontam_ngram",
    "decontam_ratio",
)
DEDUP_COLUMNS = ("dedup_reason", "dedup_cluster", "dedup_kept_row")
DEFAULT_GROUP_FIELD = "seed_source"


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


def _groups(table: Any, field: str | None) -> list[str | None] | None:
    from cosmoforge.evalsets import InputError

    name = field or (DEFAULT_GROUP_FIELD if DEFAULT_GROUP_FIELD in table.column_names else None)
    if name is None:
        return None
    if name not in table.column_names:
        raise InputError(
            f"input has no column {name!r} for --group-field (columns: {', '.join(table.column_names)})"
        )
    return [None if value is None else str(value) for value in table.column(name).to_pylist()]


def _write_outputs(out: str, files: dict[str, bytes]) -> None:
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(f"{root.rstrip('/')}/{name}", data)


def _parquet(table: Any) -> bytes:
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def run_decontaminate(args: argparse.Namespace) -> int:
    import json

    import pyarrow as pa

    from cosmoforge import decontam, evalsets

    try:
        config = decontam.Config(args.ngram, args.threshold, args.min_block_chars)
        if args.workers is not None and args.workers < 1:
            raise decontam.DecontamError(f"--workers must be at least 1, got {args.workers}")
        table = evalsets.read_table(args.input)
        texts = evalsets.text_column(table, args.text_field)
        groups = _groups(table, args.group_field)
        clash = [c for c in DECONTAM_COLUMNS if c in table.column_names]
        if clash:
            raise evalsets.InputError(
                f"input already has column(s) {', '.join(clash)}; was it decontaminated before?"
            )
        index = decontam.build_index(evalsets.load_benchmarks(args.benchmark), config)
        verdicts = list(decontam.check_all(texts, index, workers=args.workers))
        report = decontam.build_report(
            verdicts, index, groups, empty_documents=sum(1 for text in texts if not text.strip())
        )
        removed_rows = [row for row, verdict in enumerate(verdicts) if verdict.contaminated]
        best = [verdicts[row].matches[0] for row in removed_rows]
        removed = table.take(pa.array(removed_rows, type=pa.int64()))
        extra = {
            "decontam_benchmark": pa.array([m.benchmark for m in best], type=pa.string()),
            "decontam_item_index": pa.array([m.item_index for m in best], type=pa.int64()),
            "decontam_item_text": pa.array([m.item_text for m in best], type=pa.string()),
            "decontam_ngram": pa.array([m.ngram for m in best], type=pa.string()),
            "decontam_ratio": pa.array([m.ratio for m in best], type=pa.float64()),
        }
        for name, column in extra.items():
            removed = removed.append_column(name, column)
        kept_rows = [row for row, verdict in enumerate(verdicts) if not verdict.contaminated]
        _write_outputs(
            args.out,
            {
                "kept.parquet": _parquet(table.take(pa.array(kept_rows, type=pa.int64()))),
                "removed.parquet": _parquet(removed),
                "report.json": json.dumps(report, indent=2).encode("utf-8"),
                "report.md": decontam.report_markdown(report).encode("utf-8"),
            },
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


def run_dedup(args: argparse.Namespace) -> int:
    import json

    import pyarrow as pa

    from cosmoforge import dedup, evalsets
    from cosmoforge.decontam import DecontamError

    try:
        config = dedup.DedupConfig(
            ngram=args.ngram,
            buckets=args.buckets,
            hashes_per_bucket=args.hashes_per_bucket,
            exact=not args.no_exact,
        )
        if args.workers < 1:
            raise dedup.DedupError(f"--workers must be at least 1, got {args.workers}")
        table = evalsets.read_table(args.input)
        texts = evalsets.text_column(table, args.text_field)
        clash = [c for c in DEDUP_COLUMNS if c in table.column_names]
        if clash:
            raise evalsets.InputError(
                f"input already has column(s) {', '.join(clash)}; was it deduplicated before?"
            )
        result = dedup.deduplicate(texts, config, workers=args.workers)
        removed_rows = pa.array([row for row in range(len(texts)) if not result.kept[row]], type=pa.int64())
        removed = table.take(removed_rows)
        rows = removed_rows.to_pylist()
        removed = removed.append_column(
            "dedup_reason", pa.array([result.reason[r] for r in rows], type=pa.string())
        )
        removed = removed.append_column("dedup_cluster", pa.array(result.cluster[rows], type=pa.int64()))
        removed = removed.append_column("dedup_kept_row", pa.array(result.kept_row[rows], type=pa.int64()))
        kept = table.filter(pa.array(result.kept))
        _write_outputs(
            args.out,
            {
                "kept.parquet": _parquet(kept),
                "removed.parquet": _parquet(removed),
                "counts.json": json.dumps(result.counts, indent=2).encode("utf-8"),
            },
        )
    except (DecontamError, dedup.DedupError, OSError) as error:
        return _fail("dedup", error)
    counts = result.counts
    print(
        f"{counts['documents']} documents: kept {counts['kept']}, "
        f"removed {counts['removed_exact']} exact and "
        f"{counts['removed_minhash']} near duplicates in {counts['clusters']} clusters; wrote {args.out}"
    )
    return 0
