"""Post-processing stages of a run: dedup and benchmark decontamination over a parquet dataset.

Each stage reads a parquet/jsonl file or folder (local or any fsspec URI) and writes, under its
output folder, what it keeps (`kept.parquet`) and what it removes (`removed.parquet`, with the
reason for every row), plus its counts or report. The CLI commands and the embedded run call
the same functions, so a stage behaves the same from the shell, in a run and in a Job.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cosmoforge import tables
from cosmoforge.postprocess import decontam, dedup, evalsets
from cosmoforge.storage import KEPT

DECONTAM_COLUMNS = (
    "decontam_benchmark",
    "decontam_item_index",
    "decontam_item_text",
    "decontam_ngram",
    "decontam_ratio",
)
DEDUP_COLUMNS = dedup.COLUMNS
DEFAULT_GROUP_FIELD = "seed_source"
REMOVED = "removed.parquet"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def group_column(columns: list[str], field: str | None) -> str | None:
    """The column naming each row's seed-data group: `field`, else `seed_source` when present."""
    name = field or (DEFAULT_GROUP_FIELD if DEFAULT_GROUP_FIELD in columns else None)
    if name is not None and name not in columns:
        raise evalsets.InputError(
            f"input has no column {name!r} for --group-field (columns: {', '.join(columns)})"
        )
    return name


def groups_of(table: Any, column: str | None) -> list[str | None] | None:
    """Each row's group (None for a null), or None when there is no group column at all."""
    if column is None:
        return None
    if column not in table.column_names:  # a file of a folder without the column: all null
        return [None] * table.num_rows
    return [None if value is None else str(value) for value in table.column(column).to_pylist()]


def _groups(table: Any, field: str | None) -> list[str | None] | None:
    return groups_of(table, group_column(table.column_names, field))


def check_not_decontaminated(columns: list[str]) -> None:
    clash = [c for c in DECONTAM_COLUMNS if c in columns]
    if clash:
        raise evalsets.InputError(
            f"input already has column(s) {', '.join(clash)}; was it decontaminated before?"
        )


def split_by_verdict(table: Any, verdicts: list[decontam.Verdict]) -> tuple[Any, Any]:
    """(kept rows unchanged, removed rows with the decontam_* columns of their best match)."""
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
    return table.take(pa.array(kept_rows, type=pa.int64())), removed


def _write_outputs(out: str, files: dict[str, bytes]) -> None:
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(f"{root.rstrip('/')}/{name}", data)


def _parquet(table: Any) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def decontaminate_dataset(
    input_uri: str,
    out: str,
    benchmarks: list[str],
    config: decontam.Config,
    text_field: str = "text",
    group_field: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write kept/removed rows and report.json/report.md under `out`; returns the report.

    The input is streamed (`decontam.dataset`), the benchmark index comes from the cache of
    indexes (`decontam.cache`) when these benchmarks were indexed before."""
    from fsspec.core import url_to_fs

    from cosmoforge.postprocess.decontam import cache, dataset

    with evalsets.input_errors():
        schema, batches = tables.scan(input_uri)
        tables.text_type(schema, text_field)  # an unusable column fails before any work
    group = group_column(schema.names, group_field)
    check_not_decontaminated(schema.names)
    index = cache.index_for(
        lambda: evalsets.load_benchmarks(benchmarks), config, evalsets.fingerprint(benchmarks)
    )
    fs, root = url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    outputs = dataset.Outputs(fs, root, KEPT, REMOVED, REPORT_JSON, REPORT_MD)
    with evalsets.input_errors():
        report = dataset.decontaminate(
            schema, batches, (text_field, group), index, outputs, workers
        ).as_dict()
    _write_outputs(
        out, {REPORT_JSON: report_json(report), REPORT_MD: decontam.report_markdown(report).encode("utf-8")}
    )
    return report


def report_json(report: dict[str, Any]) -> bytes:
    """report.json's bytes: the same for one process and for merged batch-worker partials."""
    return json.dumps(report, indent=2).encode("utf-8")


def dedup_dataset(
    input_uri: str, out: str, config: dedup.DedupConfig, text_field: str = "text", workers: int = 1
) -> dict[str, Any]:
    """Write kept/removed rows (with cluster ids) and counts.json under `out`; returns the counts.

    An unreadable or unusable input is a `tables.TableError`: dedup knows nothing of decontamination.
    The whole input is read here; `dedup_ranks.run_step` gives the same files from ranks of Jobs that each
    hold one batch of it.
    """
    table = tables.read_table(input_uri)
    texts = tables.text_column(table, text_field)
    clash = [c for c in DEDUP_COLUMNS if c in table.column_names]
    if clash:
        raise tables.TableError(
            f"input already has column(s) {', '.join(clash)}; was it deduplicated before?"
        )
    result = dedup.deduplicate(texts, config, workers=workers)
    # filter, not take: take concatenates a string column's chunks, past 2 GB an offset overflow.
    removed = table.filter(pa.array(~result.kept))
    rows = np.flatnonzero(~result.kept)
    removed = removed.append_column(
        "dedup_reason", pa.array([result.reason[r] for r in rows], type=pa.string())
    )
    removed = removed.append_column("dedup_cluster", pa.array(result.cluster[rows], type=pa.int64()))
    removed = removed.append_column("dedup_kept_row", pa.array(result.kept_row[rows], type=pa.int64()))
    kept = table.filter(pa.array(result.kept))
    _write_outputs(
        out,
        {
            "kept.parquet": _parquet(kept),
            "removed.parquet": _parquet(removed),
            "counts.json": json.dumps(result.counts, indent=2).encode("utf-8"),
        },
    )
    return dict(result.counts)
