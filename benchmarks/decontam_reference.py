"""The decontamination recipe's definition, transcribed plainly: the bench's judge of correctness.

`cosmoforge.postprocess.decontam` takes many shortcuts for speed (hashes, Bloom filters, shorter
strings for SequenceMatcher, whole copies settling a benchmark). None may change which documents
are removed, and this module is what they are checked against: the definition read word for
word, with no shortcut at all, in pure Python and the standard library's `difflib`.

1. Tokens: Unicode NFD, characters of general category M dropped, lowercase, `\\w+`; the
   normalized text is the tokens joined by single spaces.
2. Candidates: every item sharing a word 10-gram with the document (every owner of every
   n-gram, not the first hit, not the last item written to a dict); an item shorter than 10
   tokens is a candidate when the document holds its whole token sequence.
3. Every candidate is verified: `SequenceMatcher(None, doc, item, autojunk=False)` on the
   normalized texts, blocks longer than 5 characters, ratio =
   len(" ".join("".join(blocks).split())) / len(item); removed when a ratio is above 0.5.

It is slow (minutes for tens of thousands of documents), so `removed_ids` computes it once per
corpus and benchmark set, on every core, and keeps the answer in a cache file named by the
digest of both inputs, the settings and this module's version.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import multiprocessing
import re
import time
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

VERSION = 1  # bump when the transcription changes: cached verdicts are then recomputed
NGRAM, MIN_BLOCK_CHARS, THRESHOLD = 10, 5, 0.5


def tokens_of(text: str) -> list[str]:
    text = unicodedata.normalize("NFD", text)
    text = "".join(c for c in text if not unicodedata.category(c).startswith("M"))
    return re.findall(r"\w+", text.lower())


def ratio(doc: str, item: str) -> float:
    blocks = difflib.SequenceMatcher(None, doc, item, autojunk=False).get_matching_blocks()
    kept = "".join(item[b.b : b.b + b.size] for b in blocks if b.size > MIN_BLOCK_CHARS)
    return len(" ".join(kept.split())) / len(item)


class Definition:
    """Every n-gram of every item with all its owners; short items by their whole token tuple."""

    def __init__(self, item_texts: list[str]) -> None:
        self.items: list[str] = []
        self.grams: dict[tuple[str, ...], set[int]] = defaultdict(set)
        self.short: dict[int, dict[tuple[str, ...], set[int]]] = defaultdict(lambda: defaultdict(set))
        for number, text in enumerate(item_texts):
            tokens = tokens_of(text)
            self.items.append(" ".join(tokens))
            if len(tokens) >= NGRAM:
                for start in range(len(tokens) - NGRAM + 1):
                    self.grams[tuple(tokens[start : start + NGRAM])].add(number)
            elif tokens:
                self.short[len(tokens)][tuple(tokens)].add(number)

    def candidates(self, tokens: list[str]) -> set[int]:
        found: set[int] = set()
        for size, table in [(NGRAM, self.grams), *self.short.items()]:
            for start in range(len(tokens) - size + 1):
                found |= table.get(tuple(tokens[start : start + size]), set())
        return found

    def removed(self, text: str) -> bool:
        tokens = tokens_of(text)
        doc = " ".join(tokens)
        return any(ratio(doc, self.items[number]) > THRESHOLD for number in sorted(self.candidates(tokens)))


# --- Cosmopedia's script, for timing ----------------------------------------------------------------
#
# The published scripts index n-grams in a dict (the last item written wins each n-gram), verify
# only the first hit, and skip items shorter than 10 words: less work than the definition, so the
# faster reference to compare speed with. It is not the judge of which documents to remove.

RefResult = tuple[bool, int | None, float, tuple[str, ...] | None]


class Reference:
    """10-gram tuples in a dict, first hit only, difflib on the whole document."""

    def __init__(self, items: list[Any], config: Any) -> None:
        self.config = config
        self.lookup: dict[tuple[str, ...], int] = {}
        self.normalized = []
        for item_id, item in enumerate(items):
            tokens = tokens_of(item.text)
            self.normalized.append(" ".join(tokens))
            for gram in zip(*(tokens[k:] for k in range(config.ngram)), strict=False):
                self.lookup[gram] = item_id

    def check(self, doc: str) -> RefResult:
        tokens = tokens_of(doc)
        for gram in zip(*(tokens[k:] for k in range(self.config.ngram)), strict=False):
            if gram in self.lookup:
                item_id = self.lookup[gram]
                item = self.normalized[item_id]
                matcher = difflib.SequenceMatcher(None, " ".join(tokens), item, autojunk=False)
                blocks = [
                    item[b.b : b.b + b.size]
                    for b in matcher.get_matching_blocks()
                    if b.size > self.config.min_block_chars
                ]
                ratio = len(" ".join("".join(blocks).split())) / len(item) if item else 0.0
                return ratio > self.config.threshold, item_id, ratio, gram
        return False, None, 0.0, None


_definition: Definition | None = None


def _removed(text: str) -> bool:
    assert _definition is not None
    return _definition.removed(text)


def digest(corpus: Path, items: Path) -> str:
    hashed = hashlib.sha256(f"{VERSION} {NGRAM} {MIN_BLOCK_CHARS} {THRESHOLD}".encode())
    for path in (corpus, items):
        hashed.update(path.read_bytes())
    return hashed.hexdigest()[:32]


def removed_ids(corpus: Path, items: Path, cache: Path, workers: int) -> tuple[list[int], float, bool]:
    """(ids of the removed documents, seconds it took to compute them, whether from the cache)."""
    global _definition
    path = cache / "reference" / f"{digest(corpus, items)}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return saved["removed"], saved["seconds"], True
    started = time.perf_counter()
    table = pq.read_table(corpus, columns=["id", "text"])
    rows = [json.loads(line) for line in items.open(encoding="utf-8")]
    _definition = Definition([row["text"] for row in rows])
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        verdicts = pool.map(_removed, table.column("text").to_pylist(), chunksize=64)
    ids = table.column("id").to_pylist()
    removed = [ids[row] for row, verdict in enumerate(verdicts) if verdict]
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"removed": removed, "seconds": seconds}))
    return removed, seconds, False
