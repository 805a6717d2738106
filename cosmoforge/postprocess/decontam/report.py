"""The decontamination report: removed documents and unique items per benchmark and group.

Reports of consecutive parts of a corpus merge, so workers that each check a part make one
report equal to the one-process report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cosmoforge.postprocess.decontam.index import Index
from cosmoforge.postprocess.decontam.model import DecontamError, Verdict

NO_GROUP = "(none)"
NEAR_MISS_LIMIT = 1000


@dataclass
class Tally:
    removed: int = 0
    items: set[int] = field(default_factory=set)

    def add(self, removed: int, item_ids: Iterable[int]) -> None:
        self.removed += removed
        self.items.update(item_ids)

    def as_dict(self) -> dict[str, int]:
        return {"removed": self.removed, "unique_items": len(self.items)}


def _near_key(entry: dict[str, Any]) -> tuple[float, str, int, int]:
    return (-entry["ratio"], entry["benchmark"], entry["item_index"], entry["row"])


@dataclass
class Report:
    """The blog's table (removed documents and, apart, the unique items behind them) and more,
    counted document by document. Reports of consecutive parts of a corpus merge into the
    report of the whole, which is how workers that each check a part make one report.

    A removed document corresponds to its best-matching item in each benchmark it matches, and
    counts once under each of those benchmarks, as separate per-benchmark runs would count it;
    `documents_removed` counts it once. Near-misses are the candidates at or under the threshold
    in the documents that were kept: what an auditor would want to look at.
    """

    facts: dict[str, Any]  # the index's settings and sizes, which the report states
    grouped: bool = False  # whether documents carry a seed-data group
    documents: int = 0
    removed: int = 0
    empty: int = 0
    not_scored: int = 0
    totals: dict[str, Tally] = field(default_factory=dict)
    by_group: dict[str, dict[str, Tally]] = field(default_factory=dict)
    groups: set[str] = field(default_factory=set)
    near: list[dict[str, Any]] = field(default_factory=list)  # the best, exact ratios
    near_count: int = 0

    @classmethod
    def of(cls, index: Index, grouped: bool = False) -> Report:
        sizes = index.items_per_benchmark()
        config = index.config
        facts = {
            "config": {
                "ngram": config.ngram,
                "threshold": config.threshold,
                "min_block_chars": config.min_block_chars,
            },
            "benchmark_items": len(index.items),
            "unmatchable_items": len(index.unmatchable),
            "items": {name: sizes.get(name, 0) for name in index.benchmarks},
        }
        return cls(facts, grouped)

    def add(
        self, verdict: Verdict, group: str | None = None, empty: bool = False, doc_id: str | None = None
    ) -> None:
        row = self.documents
        self.documents += 1
        self.removed += verdict.contaminated
        self.empty += empty
        self.not_scored += verdict.skipped
        group = group or NO_GROUP
        if self.grouped:
            self.groups.add(group)
        if not verdict.matches and not verdict.near_misses:
            return  # most documents: nothing more to count
        best_of: dict[str, int] = {}
        for match in verdict.matches:  # best first: one item per benchmark
            best_of.setdefault(match.benchmark, match.item_id)
        for benchmark, item_id in best_of.items():
            self.totals.setdefault(benchmark, Tally()).add(1, (item_id,))
            if self.grouped:
                self.by_group.setdefault(benchmark, {}).setdefault(group, Tally()).add(1, (item_id,))
        if not verdict.contaminated:
            for match in verdict.near_misses:
                entry = {"row": row, **({"id": doc_id} if doc_id is not None else {})}
                entry.update(benchmark=match.benchmark, item_index=match.item_index, ratio=match.ratio)
                self._near([{**entry, "ngram": match.ngram}])

    def _near(self, entries: list[dict[str, Any]]) -> None:
        self.near_count += len(entries)
        self.near += entries
        if len(self.near) > 2 * NEAR_MISS_LIMIT:
            self.near = sorted(self.near, key=_near_key)[:NEAR_MISS_LIMIT]

    def merge(self, other: Report) -> None:
        """Append the report of the documents that follow this report's documents."""
        if other.facts != self.facts:
            raise DecontamError("parts were checked against different benchmark indexes")
        offset = self.documents
        self.grouped |= other.grouped
        self.documents += other.documents
        self.removed += other.removed
        self.empty += other.empty
        self.not_scored += other.not_scored
        self.groups |= other.groups
        for benchmark, tally in other.totals.items():
            self.totals.setdefault(benchmark, Tally()).add(tally.removed, tally.items)
        for benchmark, per_group in other.by_group.items():
            for group, tally in per_group.items():
                self.by_group.setdefault(benchmark, {}).setdefault(group, Tally()).add(
                    tally.removed, tally.items
                )
        count = self.near_count + other.near_count
        self._near([{**entry, "row": entry["row"] + offset} for entry in other.near])
        self.near_count = count

    def to_json(self) -> dict[str, Any]:
        """Everything merging needs (item ids, exact ratios), as JSON values."""

        def tally(t: Tally) -> dict[str, Any]:
            return {"removed": t.removed, "items": sorted(t.items)}

        return {
            "facts": self.facts,
            "grouped": self.grouped,
            "documents": self.documents,
            "removed": self.removed,
            "empty": self.empty,
            "not_scored": self.not_scored,
            "totals": {name: tally(t) for name, t in self.totals.items()},
            "by_group": {name: {g: tally(t) for g, t in per.items()} for name, per in self.by_group.items()},
            "groups": sorted(self.groups),
            "near": sorted(self.near, key=_near_key)[:NEAR_MISS_LIMIT],
            "near_count": self.near_count,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        def tally(t: dict[str, Any]) -> Tally:
            return Tally(t["removed"], set(t["items"]))

        return cls(
            facts=data["facts"],
            grouped=data["grouped"],
            documents=data["documents"],
            removed=data["removed"],
            empty=data["empty"],
            not_scored=data["not_scored"],
            totals={name: tally(t) for name, t in data["totals"].items()},
            by_group={name: {g: tally(t) for g, t in per.items()} for name, per in data["by_group"].items()},
            groups=set(data["groups"]),
            near=list(data["near"]),
            near_count=data["near_count"],
        )

    def as_dict(self) -> dict[str, Any]:
        """The report as report.json holds it."""
        facts, groups = self.facts, sorted(self.groups)
        return {
            "config": facts["config"],
            "documents": self.documents,
            "documents_kept": self.documents - self.removed,
            "documents_removed": self.removed,
            "empty_documents": self.empty,
            "benchmark_items": facts["benchmark_items"],
            "unmatchable_items": facts["unmatchable_items"],
            "groups": groups,
            "benchmarks": {
                name: {
                    "items": size,
                    **self.totals.get(name, Tally()).as_dict(),
                    "groups": {g: self.by_group.get(name, {}).get(g, Tally()).as_dict() for g in groups},
                }
                for name, size in facts["items"].items()
            },
            "candidates_not_scored": self.not_scored,
            "near_miss_count": self.near_count,
            "near_misses": [
                {**entry, "ratio": round(entry["ratio"], 4)}
                for entry in sorted(self.near, key=_near_key)[:NEAR_MISS_LIMIT]
            ],
        }


def build_report(
    verdicts: Sequence[Verdict],
    index: Index,
    groups: Sequence[str | None] | None = None,
    empty_documents: int = 0,
) -> dict[str, Any]:
    """`Report` over a whole corpus at once; `empty_documents` is stated as given."""
    report = Report.of(index, grouped=groups is not None)
    for row, verdict in enumerate(verdicts):
        report.add(verdict, groups[row] if groups is not None else None)
    report.empty = empty_documents
    return report.as_dict()


def _cell(entry: dict[str, int]) -> str:
    return f"{entry['removed']} ({entry['unique_items']})"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a person reads it: the blog's "removed (unique items)" table first."""
    names = list(report["benchmarks"])
    config = report["config"]
    lines = [
        "# Decontamination report",
        "",
        f"{report['documents']} documents checked: {report['documents_removed']} removed, "
        f"{report['documents_kept']} kept (of which {report['empty_documents']} empty).",
        f"Candidates share a {config['ngram']}-gram with a benchmark item; removed when the "
        f"SequenceMatcher blocks longer than {config['min_block_chars']} characters cover more than "
        f"{config['threshold']} of the item.",
        "",
        "Removed documents per benchmark; in brackets, the unique benchmark items they correspond to.",
        "",
        "| group | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for group in report["groups"]:
        cells = [_cell(report["benchmarks"][name]["groups"][group]) for name in names]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(_cell(report["benchmarks"][name]) for name in names) + " |")
    lines += ["", "| benchmark | items indexed |", "|---|---|"]
    lines += [f"| {name} | {report['benchmarks'][name]['items']} |" for name in names]
    if report["unmatchable_items"]:
        lines += [
            "",
            f"{report['unmatchable_items']} items normalize to {config['min_block_chars']} characters or "
            "fewer and can never exceed the threshold.",
        ]
    lines += [
        "",
        f"## Near-misses: {report['near_miss_count']} candidates at or under the threshold in kept documents",
        "",
    ]
    if report["near_misses"]:
        lines += ["| row | benchmark | item | ratio | shared n-gram |", "|---|---|---|---|---|"]
        for miss in report["near_misses"][:50]:
            ngram = miss["ngram"].replace("|", "\\|")
            cells = [
                str(miss["row"]),
                miss["benchmark"],
                str(miss["item_index"]),
                f"{miss['ratio']:.3f}",
                ngram,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if report["near_miss_count"] > 50:
            lines.append("")
            lines.append("The 50 highest are shown; report.json holds up to 1000.")
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"
