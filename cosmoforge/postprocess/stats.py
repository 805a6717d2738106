"""Measured diversity: distributions of prompts, and duplication and openings of documents.

Cosmopedia's claim of "< 1 % duplicates" and its fight with stock openings ("Once upon a
time") are only claims unless every run measures them; these functions make them numbers in
each run's summary.
"""

from __future__ import annotations

import collections
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from cosmoforge.spec.model import Dedup

PROMPT_DIMENSIONS = ("seed_source", "seed_kind", "style", "audience", "template_id")
OPENING_WORDS = 5


def distribution(values: Iterable[str | None]) -> dict[str, int]:
    counts = collections.Counter("(none)" if value is None else value for value in values)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def prompt_stats(prompts: pa.Table) -> dict[str, Any]:
    """Counts per seed source, kind, style, audience and template, and the topic-conditioned share."""
    stats: dict[str, Any] = {"prompts": prompts.num_rows}
    for dimension in PROMPT_DIMENSIONS:
        stats[dimension] = distribution(prompts.column(dimension).to_pylist())
    topics = prompts.column("topic").to_pylist()
    stats["topic_conditioned_share"] = sum(t is not None for t in topics) / max(1, len(topics))
    stats["distinct_topics"] = len({t for t in topics if t is not None})
    return stats


def _normalized(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"\s+", " ", text).strip()


def opening(text: str, words: int = OPENING_WORDS) -> str:
    return " ".join(re.findall(r"\w+", _normalized(text))[:words])


def exact_duplicates(texts: Iterable[str]) -> int:
    """Documents whose normalized text equals an earlier document's."""
    seen: set[bytes] = set()
    duplicates = 0
    for text in texts:
        digest = hashlib.blake2b(_normalized(text).encode(), digest_size=16).digest()
        duplicates += digest in seen
        seen.add(digest)
    return duplicates


def opening_concentration(texts: list[str], top: int = 10) -> dict[str, Any]:
    """The most common first-five-word openings and the share of documents they start."""
    counts = collections.Counter(opening(text) for text in texts)
    total = max(1, len(texts))
    common = counts.most_common(top)
    return {
        "top": [{"opening": phrase, "documents": n, "share": n / total} for phrase, n in common],
        "top_share": sum(n for _, n in common) / total,
        "most_common_share": common[0][1] / total if common else 0.0,
        "distinct_openings": len(counts),
    }


def grouped_openings(texts: list[str], groups: list[str], top: int = 3) -> dict[str, Any]:
    by_group: dict[str, list[str]] = collections.defaultdict(list)
    for text, group in zip(texts, groups, strict=True):
        by_group[group].append(text)
    return {group: opening_concentration(members, top) for group, members in sorted(by_group.items())}


def near_duplicates(texts: list[str], dedup: Dedup) -> int:
    """Documents the dedup stage would drop as near (not exact) duplicates, with its parameters."""
    from cosmoforge.postprocess.dedup import DedupConfig, deduplicate

    config = DedupConfig(ngram=dedup.ngram, buckets=dedup.buckets, hashes_per_bucket=dedup.hashes_per_bucket)
    return int(deduplicate(texts, config).counts["removed_minhash"])


def document_stats(table: pa.Table, dedup: Dedup | None = None) -> dict[str, Any]:
    """Duplication and opening concentration of generated documents, overall and per style/audience.

    Near duplicates use the MinHash parameters of `dedup` (the spec's dedup stage; its defaults
    when None), so this number predicts what that stage will remove.
    """
    texts = [t or "" for t in table.column("text").to_pylist()]
    stats: dict[str, Any] = {
        "documents": len(texts),
        "exact_duplicates": exact_duplicates(texts),
        "openings": opening_concentration(texts),
    }
    stats["exact_duplicate_rate"] = stats["exact_duplicates"] / max(1, len(texts))
    stats["near_duplicates"] = near_duplicates(texts, dedup or Dedup())
    stats["near_duplicate_rate"] = stats["near_duplicates"] / max(1, len(texts))
    for dimension in ("style", "audience"):
        if dimension in table.column_names:
            stats[f"openings_by_{dimension}"] = grouped_openings(texts, table.column(dimension).to_pylist())
    return stats


def plot_distributions(stats: Mapping[str, Any], path: str) -> None:
    """Bar charts of seed source, style and audience, like Cosmopedia's figure 5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dimensions = ("seed_source", "style", "audience")
    figure, axes = plt.subplots(1, len(dimensions), figsize=(5 * len(dimensions), 4))
    for axis, dimension in zip(axes, dimensions, strict=True):
        counts = stats[dimension]
        axis.barh(list(counts)[::-1], list(counts.values())[::-1], color="#4c72b0")
        axis.set_title(dimension.replace("_", " "))
        axis.set_xlabel("prompts")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class StatsError(Exception):
    """A dataset that cannot be measured as asked."""


def read_documents(uri: str, text_field: str = "text") -> pa.Table:
    """Parquet documents from a dataset folder, a run folder (its `dataset/`) or a single file."""
    import os

    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(uri if "://" in uri else os.path.abspath(uri))
    if not fs.exists(path):
        raise StatsError(f"{uri}: no such file or folder")
    if fs.isdir(path) and fs.exists(f"{path}/dataset"):
        path = f"{path}/dataset"
    files = (
        [path]
        if fs.isfile(path)
        else sorted(fs.glob(f"{path}/data-*.parquet") or fs.glob(f"{path}/*.parquet"))
    )
    if not files:
        raise StatsError(f"{uri}: no parquet files")
    tables = []
    for name in files:
        with fs.open(name, "rb") as handle:
            tables.append(pq.read_table(handle))
    table = pa.concat_tables(tables, promote_options="default")
    if text_field not in table.column_names:
        raise StatsError(f"{uri}: no column {text_field!r} (columns: {', '.join(table.column_names)})")
    return table.rename_columns(["text" if c == text_field else c for c in table.column_names])


def dataset_stats(uri: str, text_field: str = "text") -> dict[str, Any]:
    return document_stats(read_documents(uri, text_field))


def stats_table(stats: Mapping[str, Any], title: str = "documents") -> Any:
    from rich.table import Table

    table = Table(title=f"diversity of {title}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("documents", str(stats["documents"]))
    table.add_row(
        "near duplicates (MinHash)", f"{stats['near_duplicates']} ({stats['near_duplicate_rate']:.2%})"
    )
    table.add_row("exact duplicates", f"{stats['exact_duplicates']} ({stats['exact_duplicate_rate']:.2%})")
    openings = stats["openings"]
    table.add_row("distinct openings (first 5 words)", str(openings["distinct_openings"]))
    table.add_row("share of the 10 most common openings", f"{openings['top_share']:.1%}")
    if openings["top"]:
        first = openings["top"][0]
        table.add_row("most common opening", f"{first['opening']!r} ({first['share']:.1%})")
    return table
