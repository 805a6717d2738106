"""Verification: the recipe's ratio for each candidate item, and the verdict of each document.

The ratio is the published one: the blocks of `SequenceMatcher(None, doc, item,
autojunk=False)` longer than `min_block_chars`, taken from the item and concatenated, with runs
of whitespace collapsed to one space and the ends stripped (`" ".join("".join(blocks).split())`),
over the length of the item. Blocks that meet at a space therefore count that space once, and a
block's leading or trailing space not at all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from cosmoforge.postprocess.decontam.candidates import Hits, batch_hits
from cosmoforge.postprocess.decontam.hashing import GOLDEN, tokens_of
from cosmoforge.postprocess.decontam.index import Index
from cosmoforge.postprocess.decontam.model import MIN_BLOCK_CHARS, Match, Verdict


def _sequence_matcher() -> Callable[..., Any]:
    # cydifflib is a C++ port of difflib that returns the same blocks, many times faster.
    try:
        return importlib.import_module("cydifflib").SequenceMatcher
    except ImportError:
        return importlib.import_module("difflib").SequenceMatcher


SequenceMatcher = _sequence_matcher()


# SequenceMatcher's cost grows with the document's length times the item's, and it is run for
# every candidate item, so it is fed shorter strings that provably give the same ratio. Only
# blocks longer than `min_block_chars` (m) count. A character that lies in no common substring
# of length m + 1 or more can only ever be part of shorter blocks, so every such run in either
# text is replaced by one separator that the other text lacks. That keeps every counting common
# substring, in the same order, and creates none (none can cross a separator); find_longest_match
# picks the longest block, first in the document, then in the item, and order is kept, so the
# counting blocks and their recursion are unchanged, and so is the text of each (the ratio
# joins their text, not only their sizes). A sub-range whose longest block is at most
# m chars adds nothing in either version. Positions are found by hashing every (m+1)-character
# window and looking each one up in a table of flags set by the other text's windows; a hash
# collision can only keep extra characters, never drop a needed one.

_CHAR_MULTIPLIER = np.uint64(0x100000001B3)
_DOC_SEPARATOR = 0x0  # neither occurs in normalized text (word characters and spaces only)
_ITEM_SEPARATOR = 0x1
_SLOTS_PER_WINDOW = 4  # 16 to 32 flags per window in each of two tables
_CACHED_SLOTS = 1 << 16  # windows of a document whose slots are kept for the next item
_ENCODING = {True: "ascii", False: "utf-32-le"}  # by whether the text is ASCII
_CODE = {True: np.uint8, False: np.uint32}


@dataclass(frozen=True)
class _Side:
    """A normalized text, the hash of each of its (m+1)-character windows, and two flag tables.

    Every window sets one flag in each table, picked by two different bit ranges of its hash.
    A window of the other text is looked up in both: about 5 % of absent windows pass one
    table, 0.2 % pass both. Each that passes keeps a few extra characters, and those cost
    SequenceMatcher far more than the second lookup does.
    """

    text: str
    codes: np.ndarray  # code points: uint8 for ASCII text, uint32 otherwise
    width: int
    windows: np.ndarray  # uint64 hash of the window starting at each position
    tables: tuple[np.ndarray, np.ndarray]  # bool, 2**bits flags each
    bits: int

    @classmethod
    def of(cls, text: str, width: int) -> _Side:
        # Normalized text is mostly ASCII: one byte per character is less to copy and decode.
        codes = np.frombuffer(text.encode(_ENCODING[text.isascii()]), dtype=_CODE[text.isascii()])
        count = max(codes.size - width + 1, 0)
        wide = codes.astype(np.uint64)
        windows = wide[:count].copy()
        for offset in range(1, width):
            windows *= _CHAR_MULTIPLIER
            windows += wide[offset : offset + count]
        windows *= GOLDEN  # the flags come from the top bits: spread them
        bits = min(24, count.bit_length() + _SLOTS_PER_WINDOW)
        side = cls(text, codes, width, windows, (np.zeros(1 << bits, bool), np.zeros(1 << bits, bool)), bits)
        for table, slots in zip(side.tables, side.slots(bits), strict=True):
            table[slots] = True
        return side

    def slots(self, bits: int) -> tuple[np.ndarray, np.ndarray]:
        """Where this text's windows fall in tables of 2**bits flags."""
        high = self.windows >> np.uint64(64 - 2 * bits)
        return (high >> np.uint64(bits)).astype(np.intp), (high & np.uint64((1 << bits) - 1)).astype(np.intp)

    def starts_in(self, other: _Side, slots: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Whether each window of this text may occur in `other` (false only when it does not)."""
        first, second = slots or self.slots(other.bits)
        return other.tables[0][first] & other.tables[1][second]

    def covered(self, starts: np.ndarray) -> np.ndarray:
        """Positions inside a window starting at a marked start."""
        covered = np.zeros(self.codes.size, dtype=bool)
        covered[: starts.size] = starts
        span = 1  # covered[i]: a start within the `span` positions up to i
        while span < self.width:
            step = min(span, self.width - span)
            covered[step:] |= covered[:-step]
            span += step
        return covered

    def collapse(self, covered: np.ndarray, separator: int) -> str:
        """The text with each run of characters outside `covered` replaced by one separator."""
        if covered.all():
            return self.text
        kept = np.empty(covered.size, dtype=bool)
        kept[0] = True
        np.logical_or(covered[1:], covered[:-1], out=kept[1:])  # and the first of each run outside
        codes = np.where(covered, self.codes, self.codes.dtype.type(separator))[kept]
        return codes.tobytes().decode(_ENCODING[self.codes.dtype == np.uint8])


def published_length(text: str) -> int:
    """The length of `text` with each run of whitespace made one space and the ends stripped."""
    return len(" ".join(text.split()))


def _matched_chars(doc: str, item: str, min_block_chars: int) -> int:
    """The ratio's numerator: the item's blocks longer than `min_block_chars`, concatenated in
    order, with whitespace collapsed as the published formula does."""
    blocks = SequenceMatcher(None, doc, item, autojunk=False).get_matching_blocks()
    return published_length(
        "".join(item[start : start + size] for _, start, size in blocks if size > min_block_chars)
    )


class _Document:
    """A candidate document; its windows are hashed only once SequenceMatcher must run."""

    def __init__(self, text: str, width: int) -> None:
        self.text = text
        self._width = width
        self._side: _Side | None = None
        self._slots: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def side(self) -> _Side:
        if self._side is None:
            self._side = _Side.of(self.text, self._width)
        return self._side

    def starts_in(self, item: _Side) -> np.ndarray:
        """`side.starts_in(item)`. A document meets many items, most of them of a few sizes: where
        its windows fall in tables of each size is computed once (unless the document is huge)."""
        slots = self._slots.get(item.bits) or self.side.slots(item.bits)
        if self.side.windows.size <= _CACHED_SLOTS:
            self._slots[item.bits] = slots
        return self.side.starts_in(item, slots)


def _ratio(document: _Document, item: _Side, min_block_chars: int) -> float:
    if len(item.text) > min_block_chars and item.text in document.text:
        # SequenceMatcher's first block is the longest common substring, here the whole item,
        # and nothing is left beside it: the blocks are the item itself (exactly 1 when normalized).
        return published_length(item.text) / len(item.text)
    return _partial_ratio(document, item, min_block_chars)


def _partial_ratio(document: _Document, item: _Side, min_block_chars: int) -> float:
    """The ratio of an item that is not inside the document whole."""
    return _scored(document, item, _item_covered(document, item, min_block_chars), min_block_chars)


def _item_covered(document: _Document, item: _Side, min_block_chars: int) -> np.ndarray:
    """The item's characters inside a window of `min_block_chars + 1` that may occur in the document.

    Every character of a counting block is one of them, so their number over len(item) bounds
    the ratio from above."""
    if len(item.text) <= min_block_chars:
        return np.zeros(len(item.text), dtype=bool)  # no block can be longer than the item
    return item.covered(item.starts_in(document.side))


def _scored(document: _Document, item: _Side, item_covered: np.ndarray, min_block_chars: int) -> float:
    if not item_covered.any():
        return 0.0
    doc_text = document.side.collapse(document.side.covered(document.starts_in(item)), _DOC_SEPARATOR)
    item_text = item.collapse(item_covered, _ITEM_SEPARATOR)
    return _matched_chars(doc_text, item_text, min_block_chars) / len(item.text)


def match_ratio(doc: str, item: str, min_block_chars: int = MIN_BLOCK_CHARS) -> float:
    """The published ratio of two texts (normalized ones, in the recipe): the item's
    SequenceMatcher blocks longer than `min_block_chars`, joined, whitespace collapsed, over len(item).

    Equal to running `SequenceMatcher(None, doc, item, autojunk=False)` on the texts as given.
    """
    width = min_block_chars + 1
    return _ratio(_Document(doc, width), _Side.of(item, width), min_block_chars)


_ITEM_SIDES_BYTES = 64 << 20
_item_sides: dict[tuple[int, int], _Side] = {}
_item_sides_bytes = 0


def _item_side(index: Index, item_id: int) -> _Side:
    # Boilerplate n-grams (MMLU's moral scenarios share a 25-word stem) make the same items
    # candidates of many documents; their windows are hashed once per worker.
    global _item_sides_bytes
    key = (id(index), item_id)
    side = _item_sides.get(key)
    if side is None:
        side = _Side.of(index.normalized[item_id], index.config.min_block_chars + 1)
        size = 2 * side.tables[0].nbytes + side.windows.nbytes + side.codes.nbytes
        if _item_sides_bytes + size > _ITEM_SIDES_BYTES:
            _item_sides.clear()
            _item_sides_bytes = 0
        _item_sides[key] = side
        _item_sides_bytes += size
    return side


def _sort_key(match: Match) -> tuple[float, str, int]:
    return (-match.ratio, match.benchmark, match.item_index)


def _verify(text: str, hits: Hits, index: Index) -> Verdict:
    """Ratios of a document's candidate items (`hits` of this document only), whole copies first.

    A document holding a whole normalized item is removed, with that item as its best match in
    that item's benchmark (ratio 1, the highest there is). Other candidates of the same benchmark
    are then left unscored: nothing they could show changes the document's fate or its best
    match. The same holds for a candidate whose upper bound is below its benchmark's best ratio
    over the threshold (`_score_pending`). This matters for items that share long stems (MMLU's
    895 moral scenarios): one quoted scenario makes all of them candidates.
    """
    minimum = index.config.min_block_chars
    document = _Document(text, minimum + 1)
    words = text.split(" ")

    def match(row: int, ratio: float) -> Match:
        item_id, first = int(hits.items[row]), int(hits.first[row])
        item = index.items[item_id]
        return Match(
            item_id=item_id,
            benchmark=item.benchmark,
            item_index=item.index,
            item_text=item.text,
            ngram=" ".join(words[first : first + int(hits.length[row])]),
            shared_ngrams=int(hits.count[row]),
            ratio=ratio,
        )

    # A whole copy holds each of the item's grams, so a document sharing fewer cannot hold one.
    found, whole = [], np.zeros(hits.items.size, dtype=bool)
    for row in np.flatnonzero(hits.count >= index.grams[hits.items]).tolist():
        item_text = index.normalized[hits.items[row]]
        if len(item_text) > minimum and item_text in text:
            found.append(match(row, 1.0))
            whole[row] = True
    benchmark = index.benchmark_of[hits.items]
    pending = np.flatnonzero(~np.isin(benchmark, benchmark[whole]))
    scored = _score_pending(document, hits, index, pending.tolist(), removed=bool(found))
    found += [match(row, ratio) for row, ratio in scored]
    found.sort(key=_sort_key)
    above = tuple(m for m in found if m.ratio > index.config.threshold)
    below = tuple(m for m in found if m.ratio <= index.config.threshold)
    skipped = hits.items.size - int(whole.sum()) - len(scored)
    return Verdict(bool(above), above, below, len(words) if text else 0, skipped)


def _score_pending(
    document: _Document, hits: Hits, index: Index, rows: list[int], removed: bool
) -> list[tuple[int, float]]:
    """(row, ratio) of the candidates that can still matter, highest upper bound first.

    A removed document reports its verdict and its best match in each benchmark where it has
    one over the threshold, nothing more. So once a ratio over the threshold is found, a
    candidate is left unscored when its upper bound (`_item_covered`) is at or under the
    threshold, or below the best ratio over the threshold already found in its benchmark: it
    can change neither. Ties are scored, so the best match is the one the definition's order
    picks. A document that stays kept has no ratio over the threshold, so every candidate of it
    is scored: its near-misses are exact. `removed`: a whole copy was already found.
    """
    minimum, threshold = index.config.min_block_chars, index.config.threshold
    sides = [_item_side(index, int(hits.items[row])) for row in rows]
    covered = [_item_covered(document, side, minimum) for side in sides]
    bounds = [
        int(marks.sum()) / len(side.text) if side.text else 0.0
        for marks, side in zip(covered, sides, strict=True)
    ]
    best: dict[int, float] = {}  # benchmark number -> best ratio over the threshold
    scored = []
    for at in sorted(range(len(rows)), key=lambda at: (-bounds[at], rows[at])):
        row = rows[at]
        benchmark = int(index.benchmark_of[hits.items[row]])
        if bounds[at] < best.get(benchmark, -1.0) or ((removed or best) and bounds[at] <= threshold):
            continue
        ratio = _scored(document, sides[at], covered[at], minimum)
        scored.append((row, ratio))
        if ratio > threshold:
            best[benchmark] = max(ratio, best.get(benchmark, ratio))
    return scored


def check_batch(docs: Sequence[str], index: Index) -> list[Verdict]:
    """Verdicts for a batch of documents, in order."""
    tokens = tokens_of(docs)
    hits = batch_hits(tokens, index)
    verdicts = [clean_verdict(count) for count in tokens.counts.tolist()]
    # Hits come sorted by document: each candidate document gets its own slice.
    numbers, starts = np.unique(hits.docs, return_index=True)
    bounds = np.append(starts, hits.docs.size).tolist()
    for number, start, end in zip(numbers.tolist(), bounds[:-1], bounds[1:], strict=True):
        verdicts[number] = _verify(tokens.text(number), hits.part(start, end), index)
    return verdicts


@lru_cache(maxsize=4096)
def clean_verdict(tokens: int) -> Verdict:
    # Verdicts are frozen, so clean documents of one length share one: cheaper to make, and
    # pickled once per batch on the way back from a worker process.
    return Verdict(False, tokens=tokens)


def check(doc: str, index: Index) -> Verdict:
    return check_batch([doc], index)[0]
