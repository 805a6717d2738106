"""What a run's page shows, read from the run's own files: the numbers are the files' numbers.

One pass over the documents builds every counter (distributions, tokens over time, the sample's
candidates); memory is bound by the counters, not by the run's size. The sample is the
documents with the smallest prompt ids: prompt ids are content hashes, so that is a uniform
random sample that stays the same from one report to the next.

A compacted run (`dataset/`) is read exactly; a run still generating is read from its shards
(`generations/`), where a prompt delivered twice may be counted twice until compaction.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from cosmoforge.generation.compact import FAILED_TABLE
from cosmoforge.storage import DATASET, FAILURES, GENERATIONS, PROMPTS, RunStore

LINEAGE = ("seed_source", "seed_kind", "audience", "style", "topic", "template_id", "model")
DISTRIBUTIONS = ("seed_source", "audience", "style", "topic")
COUNTED = (*LINEAGE, "completion_tokens", "prompt_tokens", "finished_at", "prompt_id")
SAMPLED = ("prompt_id", *LINEAGE, "completion_tokens", "prompt", "text")
TOP_VALUES = 40  # values per distribution before the rest are summed as "(other)"
EXAMPLES_PER_KIND = 3
BIN_SECONDS = 10  # the resolution tokens are counted at; charts rebin to about 120 points
CHART_POINTS = 120
TEXT_CHARS = 20_000  # a sampled document is cut here, so one huge document cannot bloat the page


@dataclass
class Counters:
    documents: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    values: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: {name: collections.Counter() for name in LINEAGE}
    )
    tokens_per_bin: collections.Counter[int] = field(default_factory=collections.Counter)
    documents_per_bin: collections.Counter[int] = field(default_factory=collections.Counter)
    sample_ids: list[str] = field(default_factory=list)  # the smallest prompt ids so far, sorted

    def add(self, table: pa.Table, sample_size: int) -> None:
        self.documents += table.num_rows
        for name in ("completion_tokens", "prompt_tokens"):
            if name in table.column_names:
                total = pc.sum(table.column(name)).as_py() or 0
                setattr(self, name, getattr(self, name) + int(total))
        for name in LINEAGE:
            if name in table.column_names:
                counts = pc.value_counts(table.column(name).fill_null("(none)"))
                for entry in counts.to_pylist():
                    self.values[name][str(entry["values"])] += int(entry["counts"])
        if "finished_at" in table.column_names:
            self._add_times(table)
        self._add_ids(table.column("prompt_id"), sample_size)

    def _add_times(self, table: pa.Table) -> None:
        seconds = pc.divide(pc.cast(table.column("finished_at"), pa.int64()), 1000)
        bins = pc.multiply(pc.divide(seconds, BIN_SECONDS), BIN_SECONDS)
        tokens = table.column("completion_tokens").fill_null(0)
        grouped = (
            pa.table({"bin": bins, "tokens": tokens})
            .group_by("bin")
            .aggregate([("tokens", "sum"), ("tokens", "count")])
        )
        for row in grouped.to_pylist():
            if row["bin"] is not None:
                self.tokens_per_bin[int(row["bin"])] += int(row["tokens_sum"] or 0)
                self.documents_per_bin[int(row["bin"])] += int(row["tokens_count"] or 0)

    def _add_ids(self, ids: pa.ChunkedArray, sample_size: int) -> None:
        # Only this file's smallest ids can enter the run's smallest `sample_size`.
        ids = ids.drop_null()
        order = pc.select_k_unstable(ids, k=min(sample_size, len(ids)), sort_keys=[("", "ascending")])
        merged = set(self.sample_ids) | set(pc.take(ids, order).to_pylist())
        self.sample_ids = sorted(merged)[:sample_size]


def _files(store: RunStore, folder: str) -> list[str]:
    files = store.list_parquet(folder)
    if folder == DATASET:  # failed.parquet and other tables may sit beside the data files
        files = [f for f in files if f.rsplit("/", 1)[-1].startswith("data-")]
    return files


def _read(store: RunStore, path: str, columns: tuple[str, ...]) -> pa.Table:
    with store.fs.open(path, "rb") as handle:
        schema = pq.read_schema(handle)
        handle.seek(0)
        return pq.read_table(handle, columns=[c for c in columns if c in schema.names])


def documents_folder(store: RunStore) -> tuple[str, bool]:
    """Where the documents are, and whether that is the compacted (exact) dataset."""
    return (DATASET, True) if _files(store, DATASET) else (GENERATIONS, False)


def count_documents(store: RunStore, folder: str, sample_size: int) -> Counters:
    counters = Counters()
    for path in _files(store, folder):
        counters.add(_read(store, path, COUNTED), sample_size)
    return counters


def sample_rows(store: RunStore, folder: str, ids: set[str]) -> list[dict[str, Any]]:
    """The sampled documents with their prompts, in prompt-id order."""
    rows: dict[str, dict[str, Any]] = {}
    wanted = pa.array(sorted(ids), type=pa.string())
    for path in _files(store, folder):
        table = _read(store, path, SAMPLED)
        table = table.filter(pc.is_in(table.column("prompt_id"), value_set=wanted))
        for row in table.to_pylist():
            row["text"] = (row.get("text") or "")[:TEXT_CHARS]
            rows.setdefault(row["prompt_id"], row)
    return [rows[key] for key in sorted(rows)]


def manifest_size(store: RunStore) -> int:
    total = 0
    for path in store.list_parquet(PROMPTS):
        with store.fs.open(path, "rb") as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def failures(store: RunStore) -> dict[str, Any]:
    """Failures by kind with a few examples: the compacted table when there is one, else the shards."""
    compacted = store.path(FAILED_TABLE)
    if store.fs.exists(compacted):
        with store.fs.open(compacted, "rb") as handle:
            tables: Iterator[pa.Table] = iter([pq.read_table(handle)])
    else:
        tables = store.read_tables(FAILURES)
    kinds: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for table in tables:
        for row in table.select(["prompt_id", "error_kind", "error"]).to_pylist():
            if row["prompt_id"] in seen:
                continue
            seen.add(row["prompt_id"])
            kind = kinds.setdefault(row["error_kind"] or "unknown", {"count": 0, "examples": []})
            kind["count"] += 1
            if len(kind["examples"]) < EXAMPLES_PER_KIND:
                kind["examples"].append({"prompt_id": row["prompt_id"], "error": (row["error"] or "")[:500]})
    return {"total": len(seen), "kinds": dict(sorted(kinds.items(), key=lambda item: -item[1]["count"]))}


def top(counter: collections.Counter[str], limit: int = TOP_VALUES) -> dict[str, int]:
    common = counter.most_common(limit)
    rest = sum(counter.values()) - sum(count for _, count in common)
    return dict(common) | ({"(other)": rest} if rest else {})


def throughput(counters: Counters, points: int = CHART_POINTS) -> dict[str, list[float]]:
    """Tokens/s and documents done over time, rebinned to about `points` points."""
    if not counters.tokens_per_bin:
        return {"time": [], "tokens_per_second": [], "documents": []}
    start, end = min(counters.tokens_per_bin), max(counters.tokens_per_bin) + BIN_SECONDS
    width = max(BIN_SECONDS, -(-(end - start) // points // BIN_SECONDS) * BIN_SECONDS)
    times, rates, done = [], [], []
    cumulative = 0
    for left in range(start, end, width):
        bins = range(left, left + width, BIN_SECONDS)
        tokens = sum(counters.tokens_per_bin.get(b, 0) for b in bins)
        cumulative += sum(counters.documents_per_bin.get(b, 0) for b in bins)
        times.append(float(left))
        rates.append(tokens / width)
        done.append(float(cumulative))
    return {"time": times, "tokens_per_second": rates, "documents": done}


def _json(store: RunStore, relative: str) -> Any:
    text = store.read_text(relative)
    return json.loads(text) if text else None


def clusters(store: RunStore) -> list[dict[str, Any]]:
    """Clustering summaries of web sources, with the cluster map image when it was drawn."""
    import base64

    found: list[dict[str, Any]] = []
    topics = store.path("topics")
    if not store.fs.exists(topics):
        return found
    for folder in sorted(store.fs.ls(topics, detail=False)):
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        summary = _json(store, f"topics/{name}/summary.json")
        if summary is None:
            continue
        image = store.path("topics", name, "clusters.png")
        png = base64.b64encode(store.fs.cat_file(image)).decode() if store.fs.exists(image) else None
        found.append({"source": name, "summary": summary, "map_png": png})
    return found


def _gpus(generation: dict[str, Any]) -> int:
    replicas = (generation.get("replicas") or {}).get("max", 1)
    return int(replicas) * max(1, int(generation.get("gpusPerReplica", 1)))


def estimate(
    progress: dict[str, Any], chart: dict[str, list[float]], gpus: int, gpu_hour_price: float | None
) -> dict[str, Any]:
    """ETA from the recent pace, and the cost so far and at the end when a GPU-hour price is given.

    The pace is the documents finished in the last quarter of the run's time so far, so a slow
    start (servers loading) does not stretch the ETA.
    """
    times, done = chart["time"], chart["documents"]
    elapsed = (times[-1] - times[0] + BIN_SECONDS) if times else 0.0
    pace = 0.0
    if times:
        cut = len(times) * 3 // 4
        before = done[cut - 1] if cut > 0 else 0.0
        window = times[-1] - (times[cut - 1] if cut > 0 else times[0] - BIN_SECONDS)
        pace = (done[-1] - before) / max(BIN_SECONDS, window)
    remaining = progress["remaining"]
    eta = 0.0 if remaining == 0 else (remaining / pace if pace > 0 else None)
    gpu_hours = elapsed / 3600 * gpus
    cost = gpu_hours * gpu_hour_price if gpu_hour_price is not None else None
    share = progress["generated"] / max(1, progress["generated"] + remaining)
    return {
        "elapsed_seconds": elapsed,
        "documents_per_second": pace,
        "eta_seconds": eta,
        "gpus": gpus,
        "gpu_hours": gpu_hours,
        "gpu_hour_price": gpu_hour_price,
        "cost": cost,
        "expected_cost": cost / share if cost is not None and share > 0 else None,
    }


def collect(
    store: RunStore,
    samples: int = 300,
    live: dict[str, Any] | None = None,
    gpu_hour_price: float | None = None,
) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data; `live` adds the dispatcher's own counts."""
    folder, exact = documents_folder(store)
    counters = count_documents(store, folder, samples)
    spec_text = store.read_text("spec.yaml") or ""
    spec = yaml.safe_load(spec_text) if spec_text else {}
    failed = failures(store)
    prompts = manifest_size(store)
    chart = throughput(counters)
    started, finished = (chart["time"][0], chart["time"][-1]) if chart["time"] else (None, None)
    progress = {
        "prompts": prompts,
        "generated": counters.documents,
        "failed": failed["total"],
        "remaining": max(0, prompts - counters.documents - failed["total"]),
        "completion_tokens": counters.completion_tokens,
        "prompt_tokens": counters.prompt_tokens,
        "exact": exact,
        "first_bin": started,
        "last_bin": finished,
    }
    if live:
        progress |= {k: live[k] for k in ("prompts", "generated", "failed", "remaining") if k in live}
    generation = ((spec.get("spec") or {}).get("generation")) or {}
    if gpu_hour_price is None:  # the flag first, then the spec's own price
        gpu_hour_price = (((spec.get("spec") or {}).get("cost")) or {}).get("gpuHourPrice")
    return {
        "run": (spec.get("metadata") or {}).get("name") or store.uri.rsplit("/", 1)[-1],
        "uri": store.uri,
        "spec": spec_text,
        "generation": generation,
        "progress": progress,
        "estimate": estimate(progress, chart, _gpus(generation), gpu_hour_price),
        "throughput": chart,
        "distributions": {name: top(counters.values[name]) for name in DISTRIBUTIONS},
        "models": top(counters.values["model"]),
        "failures": failed,
        "quality": _json(store, "metrics/stats.json"),
        "dedup": _json(store, "dedup/counts.json"),
        "decontamination": _json(store, "decontam/report.json"),
        "clusters": clusters(store),
        "lineage_fields": list(LINEAGE),
        "samples": sample_rows(store, folder, set(counters.sample_ids)),
    }
