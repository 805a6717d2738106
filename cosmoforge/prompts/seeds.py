"""Seed readers: stream records from parquet, jsonl, csv (any table `cosmoforge.tables` reads)
or a Hugging Face Hub dataset.

Readers never hold a whole source in memory, so a source of any size feeds the prompt builder.
Each field a source names is a field path (`cosmoforge.prompts.fields`), so nested datasets
such as OpenHermes-2.5's conversations need no preprocessing. Rows with empty text are skipped
and counted, rows filtered out by `include`/`exclude`/`excludeCategories` or `sample` are
counted. Every problem is a `SeedError` whose message is one line: the seed, its URI and what
is wrong (a missing field with the fields that exist; a missing config or split with those
that exist; credentials, not found or unreachable for a seed that cannot be read at all).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from cosmoforge import tables
from cosmoforge.prompts.fields import FieldMissing, FieldPath, parse, resolve
from cosmoforge.spec.model import SeedSource
from cosmoforge.tables import TableError

# A Hub dataset as a whole (`hf://datasets/owner/name`, optionally `@revision`); a longer path
# names a file inside the repository, which fsspec reads like any other file.
HUB_DATASET = re.compile(r"^hf://datasets/(?P<repo>[^/@]+(?:/[^/@]+)?)(?:@(?P<revision>[^/]+))?/?$")
RECORD_ID_CHARS = 16


class SeedError(TableError):
    """A seed source that cannot be read as the spec says; the message is one line."""


@dataclass(frozen=True)
class SeedRecord:
    source: str
    kind: str
    id: str
    text: str
    topic: str | None = None
    category: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    audience: str | None = None  # from audienceField: fixes the pair, or is lineage of a prompt
    style: str | None = None


@dataclass
class SeedCounts:
    read: int = 0
    skipped_empty: int = 0
    excluded: int = 0
    sampled_out: int = 0


def detect_format(source: SeedSource) -> str:
    """ "hf" for a Hub dataset, else the table format (`cosmoforge.tables`), named or from the URI."""
    if source.format == "hf" or (source.format == "auto" and HUB_DATASET.match(source.uri)):
        return "hf"
    try:
        return tables.detect_format(source.uri, source.format)
    except TableError as error:
        raise SeedError(f"seed {source.name!r}: {error}; or set seeds[].format") from None


# --- reading rows ---------------------------------------------------------------------------


def iter_rows(source: SeedSource) -> Iterator[dict[str, Any]]:
    """The raw rows of a source, streamed; any failure to read becomes a one-line SeedError."""
    try:
        kind = detect_format(source)
        rows = _rows_hf(source) if kind == "hf" else tables.iter_rows(source.uri, kind)
        yield from rows
    except SeedError:
        raise
    except TableError as error:
        raise SeedError(f"seed {source.name!r}: {error}") from None
    except Exception as error:  # storage and Hub clients raise many types; the user needs one line
        raise SeedError(f"seed {source.name!r} ({source.uri}): {unreadable_reason(error)}") from None


def _rows_hf(source: SeedSource) -> Iterator[dict[str, Any]]:
    import datasets  # heavy import, only for Hub sources

    match = HUB_DATASET.match(source.uri)
    repo = match.group("repo") if match else source.uri.removeprefix("hf://datasets/").strip("/")
    revision = source.revision or (match.group("revision") if match else None)
    if not os.path.isdir(repo):  # `datasets` reads a local folder of that name instead, as here
        # One metadata request first: it fails at once when the Hub cannot be reached, where the
        # dataset loaders would retry for half a minute and log every retry.
        from huggingface_hub import HfApi

        HfApi().dataset_info(repo, revision=revision)
    configs = datasets.get_dataset_config_names(repo, revision=revision)
    config = source.config
    if config is None and len(configs) > 1 and "default" not in configs:
        raise SeedError(
            f"seed {source.name!r} ({source.uri}): the dataset has several configs, set seeds[].config "
            f"to one of: {', '.join(configs)}"
        )
    if config is not None and config not in configs:
        raise SeedError(
            f"seed {source.name!r} ({source.uri}): no config {config!r}; configs: {', '.join(configs)}"
        )
    splits = datasets.get_dataset_split_names(repo, config, revision=revision)
    if source.split not in splits:
        raise SeedError(
            f"seed {source.name!r} ({source.uri}): no split {source.split!r}"
            f"{f' in config {config!r}' if config else ''}; splits: {', '.join(splits)}"
        )
    yield from datasets.load_dataset(repo, config, split=source.split, revision=revision, streaming=True)


_NO_ACCESS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "GatedRepoError",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
}
_NOT_FOUND = {
    "DatasetNotFoundError",
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "EntryNotFoundError",
    "NoSuchBucket",
    "NoSuchKey",
}
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectError",
    "ConnectionError",  # requests' own, which is not the builtin one
    "ConnectTimeout",
    "ReadTimeout",
    "OfflineModeIsEnabled",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "NameResolutionError",
    "MaxRetryError",
}
# A status code as a word: "port=40191" in a refused connection's message is not a 401.
_DENIED_STATUS = re.compile(r"\b(401|403)\b")


def unreadable_reason(error: BaseException) -> str:
    """Why a seed cannot be read, in the user's terms, with the first line of the cause."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    names = {cls.__name__ for exc in chain for cls in type(exc).__mro__}
    texts = " ".join(str(exc) for exc in chain)
    if (
        names & _NO_ACCESS
        or any(isinstance(e, PermissionError) for e in chain)
        or _DENIED_STATUS.search(texts)
    ):
        reason = "no credentials or access denied"
    elif names & _UNREACHABLE or any(isinstance(e, ConnectionError | TimeoutError) for e in chain):
        reason = "unreachable"
    elif names & _NOT_FOUND or any(isinstance(e, FileNotFoundError) for e in chain):
        reason = "not found"
    else:
        reason = "cannot read"
    detail = next((line for line in str(error).splitlines() if line.strip()), "").strip()
    detail = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    return f"{reason} ({detail[:300]})"


# --- rows to records ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Paths:
    """The source's field paths, parsed once."""

    text: FieldPath
    id: FieldPath | None
    topic: FieldPath | None
    category: FieldPath | None
    audience: FieldPath | None
    style: FieldPath | None
    include: tuple[tuple[FieldPath, frozenset[str]], ...]
    exclude: tuple[tuple[FieldPath, frozenset[str]], ...]

    @classmethod
    def of(cls, source: SeedSource) -> _Paths:
        def optional(path: str | None) -> FieldPath | None:
            return parse(path) if path is not None else None

        def filters(spec: Mapping[str, list[Any]]) -> tuple[tuple[FieldPath, frozenset[str]], ...]:
            return tuple((parse(path), frozenset(_text(v) for v in values)) for path, values in spec.items())

        return cls(
            parse(source.text_field),
            optional(source.id_field),
            optional(source.topic_field),
            optional(source.category_field),
            optional(source.audience_field),
            optional(source.style_field),
            filters(source.include),
            filters(source.exclude),
        )


def _text(value: Any) -> str:
    """A scalar as the text filters and ids compare: true/false as YAML writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def record_hash(row: Mapping[str, Any]) -> str:
    """The id of a record without an id column: a hash of every field, so it follows content."""
    options = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
    return hashlib.sha256(orjson.dumps(row, option=options, default=str)).hexdigest()[:RECORD_ID_CHARS]


def sampled(record_id: str, share: float, seed: int) -> bool:
    """Whether a record is in a `share` sample: decided by its id alone, so a changed row
    elsewhere never changes which records are in."""
    digest = hashlib.sha256(f"{seed}\x1f{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


def read_seed(source: SeedSource, counts: SeedCounts | None = None) -> Iterator[SeedRecord]:
    """Records of one seed source, in file order, filtered and sampled, up to `source.limit`."""
    counts = counts if counts is not None else SeedCounts()
    paths = _Paths.of(source)
    excluded_categories = {category.lower() for category in source.exclude_categories}
    emitted = 0
    for row_number, row in enumerate(iter_rows(source)):
        if source.limit is not None and emitted >= source.limit:
            return

        def value(path: FieldPath | None, row: dict[str, Any] = row, number: int = row_number) -> Any:
            if path is None:
                return None
            try:
                return resolve(path, row)
            except FieldMissing as error:
                raise SeedError(f"seed {source.name!r}: {source.uri}: row {number}: {error}") from None

        text = value(paths.text)
        if text is None or (isinstance(text, str) and not text.strip()):
            counts.skipped_empty += 1
            continue
        if not isinstance(text, str):
            hint = "; name an item, e.g. [0]" if isinstance(text, list | tuple) else ""
            raise SeedError(
                f"seed {source.name!r}: {source.uri}: row {row_number}: field {source.text_field!r} "
                f"is not text ({type(text).__name__}){hint}"
            )
        if not _kept(paths, value):
            counts.excluded += 1
            continue
        category = _scalar(value(paths.category))
        if category is not None and category.lower() in excluded_categories:
            counts.excluded += 1
            continue
        record_id = _scalar(value(paths.id)) if paths.id is not None else None
        record_id = record_id if record_id is not None else record_hash(row)
        if source.sample is not None and not sampled(record_id, source.sample, source.sample_seed):
            counts.sampled_out += 1
            continue
        audience, style = _scalar(value(paths.audience)), _scalar(value(paths.style))
        counts.read += 1
        emitted += 1
        yield SeedRecord(
            source=source.name,
            kind=source.kind,
            id=record_id,
            text=text,
            topic=_scalar(value(paths.topic)),
            category=category,
            fields={
                key: v for key, v in row.items() if not (paths.text.is_column and key == paths.text.column)
            },
            audience=source.audience_map.get(audience, audience) if audience is not None else None,
            style=source.style_map.get(style, style) if style is not None else None,
        )


def _kept(paths: _Paths, value: Any) -> bool:
    for path, wanted in paths.include:
        found = value(path)
        if found is None or _text(found) not in wanted:
            return False
    for path, unwanted in paths.exclude:
        found = value(path)
        # A record without the value is never excluded: "not from a dropped source" holds for it.
        if found is not None and _text(found) in unwanted:
            return False
    return True


def _scalar(value: Any) -> str | None:
    return None if value is None or value == "" else _text(value)


def read_all(sources: Iterable[SeedSource]) -> dict[str, Iterator[SeedRecord]]:
    return {source.name: read_seed(source) for source in sources}
