"""The published dataset's card (its README.md): a pure function of what was counted and read.

The Hub reads the YAML front matter (configs and their data files, tags); people read the rest:
how to load each config, what each source contributed (documents, tokens, audiences, styles),
the columns that carry every document's lineage, the spec that reproduces the run, and what
dedup and decontamination removed, as those stages reported it. Nothing in it depends on when
or by whom it was rendered, so a rerun of a push renders the same bytes and uploads nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from cosmoforge.publish.files import SPLIT, ConfigData, config_glob
from cosmoforge.report.data import top

# What each column of a run's documents means; a column not listed is shown with its type only.
COLUMN_NOTES = {
    "prompt_id": "hash of the rendered prompt and the settings that change a completion",
    "run": "the GenerationRun that made the document",
    "seed_source": "the seed source (this config)",
    "seed_kind": "outline, wikihow, web, math, instruction or prompt",
    "seed_id": "the seed record",
    "audience": "the reader the prompt asked for",
    "style": "textbook, blog post, wikiHow article or story",
    "topic": "the cluster topic the prompt was conditioned on, if any",
    "template_id": "the prompt template",
    "template_version": "the template's version",
    "prompt": "the prompt sent to the model",
    "text": "the generated document",
    "model": "the model that wrote it",
    "engine": "the inference server",
    "sampling": "sampling settings, as JSON",
    "prompt_tokens": "tokens in the prompt",
    "completion_tokens": "tokens in the document",
    "finish_reason": "why generation stopped",
    "started_at": "when the request started",
    "finished_at": "when the document was done",
    "worker": "the generator worker",
    "attempt": "the delivery that produced it",
}


@dataclass(frozen=True)
class Card:
    """Everything the card shows; `dedup` is dedup's counts.json, `decontamination` its report.md."""

    repo: str
    run: str
    spec_yaml: str
    configs: list[ConfigData]
    columns: list[tuple[str, str]]
    dedup: Mapping[str, Any] | None = None
    decontamination: str | None = None


def front_matter(card: Card) -> dict[str, Any]:
    """The card's metadata: one config per seed source, each a `train` split over its files."""
    documents = sum(config.counters.documents for config in card.configs)
    return {
        "configs": [
            {"config_name": c.name, "data_files": [{"split": SPLIT, "path": config_glob(c.name)}]}
            for c in card.configs
        ],
        "language": ["en"],
        "task_categories": ["text-generation"],
        "size_categories": [_size_category(documents)],
        "tags": ["synthetic", "cosmoforge", "cosmopedia"],
    }


def _size_category(rows: int) -> str:
    # The Hub's buckets for the size filter.
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if rows < bound:
            return name
    for bound, name in ((1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if rows < bound:
            return name
    return "100M<n<1B"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _by_config(configs: list[ConfigData], field: str) -> list[str]:
    """A table of one lineage field's values (rows) by config (columns)."""
    counts = {c.name: top(c.counters.values[field]) for c in configs}
    values = sorted({value for by_value in counts.values() for value in by_value})
    rows = [[value, *(counts[c.name].get(value, 0) for c in configs)] for value in values]
    return _table([field, *(c.name for c in configs)], rows)


def _demoted(markdown: str, levels: int = 2) -> list[str]:
    """A report's markdown under one of the card's sections: its headings moved down."""
    return ["#" * levels + line if line.startswith("#") else line for line in markdown.rstrip().splitlines()]


def _dedup_section(dedup: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Dedup", ""]
    if dedup is None:
        return [*lines, "Dedup did not run on this dataset."]
    scalars = [[k, v] for k, v in dedup.items() if not isinstance(v, dict | list)]
    lines += [
        "Exact and MinHash near-duplicates removed before publishing:",
        "",
        *_table(["", "count"], scalars),
    ]
    settings = dedup.get("config")
    if isinstance(settings, dict):
        lines += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + "."]
    return lines


def render_card(card: Card) -> str:
    configs = card.configs
    total = {
        "documents": sum(c.counters.documents for c in configs),
        "completion": sum(c.counters.completion_tokens for c in configs),
        "prompt": sum(c.counters.prompt_tokens for c in configs),
    }
    models = sorted({m for c in configs for m in c.counters.values["model"]})
    first = configs[0].name
    lines = [
        "---",
        yaml.safe_dump(front_matter(card), sort_keys=False).rstrip(),
        "---",
        f"# {card.repo}",
        "",
        f"Synthetic documents made by cosmoforge after the Cosmopedia recipe: the run `{card.run}`, "
        f"{total['documents']:,} documents and {total['completion']:,} generated tokens written by "
        f"{', '.join(f'`{m}`' for m in models) or 'no model'} from seed data, one config per seed source. "
        "The spec below reproduces it.",
        "",
        "```python",
        "import datasets",
        "",
        f'ds = datasets.load_dataset("{card.repo}", "{first}", split="{SPLIT}")',
        "```",
        "",
        "## Configs",
        "",
        *_table(
            ["config", "seed kind", "documents", "generated tokens", "prompt tokens", "files"],
            [
                [
                    c.name,
                    ", ".join(sorted(c.counters.values["seed_kind"])) or "-",
                    c.counters.documents,
                    c.counters.completion_tokens,
                    c.counters.prompt_tokens,
                    len(c.files),
                ]
                for c in configs
            ]
            + [["**total**", "", total["documents"], total["completion"], total["prompt"], ""]],
        ),
        "",
        "## Audiences and styles",
        "",
        "Documents per audience and per style the prompts asked for, by config.",
        "",
        *_by_config(configs, "audience"),
        "",
        *_by_config(configs, "style"),
        "",
        "## Columns",
        "",
        "Every row is one prompt's completion and carries its lineage:",
        "",
        *_table(
            ["column", "type", "what it holds"], [[n, t, COLUMN_NOTES.get(n, "")] for n, t in card.columns]
        ),
        "",
    ]
    lines += _dedup_section(card.dedup)
    lines += ["", "## Decontamination", ""]
    if card.decontamination is None:
        lines.append("Decontamination did not run on this dataset.")
    else:
        lines += _demoted(card.decontamination)
    lines += ["", "## Spec", "", "```yaml", card.spec_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
