"""Seed readers: stream records from parquet, jsonl, csv (any table `cosmoforge.tables` reads)
or a Hugging Face dataset.

Readers never hold a whole source in memory, so a source of any size feeds the prompt builder.
Rows with empty text are skipped and counted; malformed files raise `SeedError` naming the file,
the row and the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cosmoforge import tables
from cosmoforge.spec.model import SeedSource
from cosmoforge.tables import TableError


class SeedError(TableError):
    """A seed file that cannot be read as the spec says."""


@dataclass(frozen=True)
class SeedRecord:
    source: str
    kind: str
    id: str
    text: str
    topic: str | None = None
    category: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class SeedCounts:
    read: int = 0
    skipped_empty: int = 0
    excluded: int = 0


def detect_format(source: SeedSource) -> str:
    """ "hf" for a Hub dataset, else the table format (`cosmoforge.tables`), named or from the URI."""
    if source.format == "hf" or (
        source.format == "auto"
        and source.uri.startswith("hf://datasets/")
        and "." not in source.uri.rsplit("/", 1)[-1]
    ):
        return "hf"
    try:
        return tables.detect_format(source.uri, source.format)
    except TableError as error:
        raise SeedError(f"{error}; or set seeds[].format") from None


def _rows_hf(uri: str, split: str) -> Iterator[dict[str, Any]]:
    import datasets  # heavy import, only for Hub sources

    name = uri.removeprefix("hf://datasets/")
    yield from datasets.load_dataset(name, split=split, streaming=True)


def iter_rows(source: SeedSource) -> Iterator[dict[str, Any]]:
    kind = detect_format(source)
    if kind == "hf":
        yield from _rows_hf(source.uri, source.split)
        return
    try:
        yield from tables.iter_rows(source.uri, kind)
    except SeedError:
        raise
    except TableError as error:  # callers handle SeedError
        raise SeedError(str(error)) from None


def read_seed(source: SeedSource, counts: SeedCounts | None = None) -> Iterator[SeedRecord]:
    """Records of one seed source, in file order, up to `source.limit`."""
    counts = counts if counts is not None else SeedCounts()
    excluded = {category.lower() for category in source.exclude_categories}
    emitted = 0
    for row_number, row in enumerate(iter_rows(source)):
        if source.limit is not None and emitted >= source.limit:
            return
        if source.text_field not in row:
            raise SeedError(
                f"{source.uri}: row {row_number}: field {source.text_field!r} missing "
                f"(columns: {', '.join(sorted(row))})"
            )
        text = row[source.text_field]
        if text is None or (isinstance(text, str) and not text.strip()):
            counts.skipped_empty += 1
            continue
        if not isinstance(text, str):
            raise SeedError(f"{source.uri}: row {row_number}: field {source.text_field!r} is not text")
        category = _optional(row, source.category_field, source.uri, row_number)
        if category is not None and category.lower() in excluded:
            counts.excluded += 1
            continue
        record_id = _optional(row, source.id_field, source.uri, row_number) if source.id_field else None
        counts.read += 1
        emitted += 1
        yield SeedRecord(
            source=source.name,
            kind=source.kind,
            id=record_id if record_id is not None else str(row_number),
            text=text,
            topic=_optional(row, source.topic_field, source.uri, row_number),
            category=category,
            fields={key: value for key, value in row.items() if key != source.text_field},
        )


def _optional(row: dict[str, Any], name: str | None, uri: str, row_number: int) -> str | None:
    if name is None:
        return None
    if name not in row:
        raise SeedError(f"{uri}: row {row_number}: field {name!r} missing")
    value = row[name]
    return None if value is None or value == "" else str(value)


def read_all(sources: Iterable[SeedSource]) -> dict[str, Iterator[SeedRecord]]:
    return {source.name: read_seed(source) for source in sources}
