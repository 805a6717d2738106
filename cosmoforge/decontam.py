"""Benchmark decontamination: remove generated documents that contain evaluation benchmark samples.

A model trained on text that quotes its test questions scores well for the wrong reason, so
Cosmopedia drops every document that reproduces a benchmark sample. The recipe, stated
precisely (all sizes are parameters of `Config`):

1. Normalize a text: Unicode NFD, drop every character of general category M (combining
   marks), lowercase, keep the word tokens `\\w+`. The normalized text is those tokens joined
   by single spaces.
2. Candidates: a document is a candidate for a benchmark item when they share a word n-gram
   (n = 10). An item with fewer than n tokens is indexed whole, as its full token sequence, so
   a document is its candidate when it contains that sequence.
3. Verify every candidate item: `SequenceMatcher(None, doc, item, autojunk=False)` on the two
   normalized texts; matched = total size of the matching blocks longer than `min_block_chars`
   (5) characters; ratio = matched / len(item). The document is contaminated when
   ratio > threshold (0.5). Candidates at or under the threshold are near-misses, kept for audit.
   One shortcut: once a document holds a whole item of a benchmark (ratio exactly 1), the other
   candidates of that benchmark are tested for whole copies only, not scored; they cannot change
   the verdict or the best match, which is what the report counts.

Where the published scripts go wrong, this module does not: it checks every item sharing an
n-gram with the document (not only the first hit), keeps every item per n-gram (a dict keyed
by n-gram keeps only the last one), matches items shorter than n words, and gives the same
answer for any worker count or `PYTHONHASHSEED` (hashes are computed from bytes, never with
`hash()`).

Speed comes from integers, not from changing the answer: a batch of documents becomes one
UTF-8 byte string, normalized by one `bytes.translate` for its ASCII and a table lookup for each
other character; tokens are hashed from their bytes read eight at a time, n-grams from prefix
sums over the token hashes, in a few numpy passes; the index is a sorted `uint64` array of
distinct n-gram hashes with the items holding each, looked up with `np.searchsorted` behind a
blocked Bloom filter; short items are looked for only where their first two words occur. Only
candidates reach SequenceMatcher, on texts shortened in a way that provably keeps the ratio (see
"verification" below), and a document holding the whole normalized item skips it (its first
block is then the entire item: ratio 1). SequenceMatcher comes from `cydifflib` when installed,
a C++ port of difflib that returns the same blocks, and from `difflib` otherwise. Batches run on
every core: in the calling process and in forked workers that inherit the index (`Checker`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import logging
import multiprocessing
import os
import queue
import re
import threading
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

NGRAM = 10
THRESHOLD = 0.5
MIN_BLOCK_CHARS = 5
MAX_NGRAM = 256
BATCH_SIZE = 256  # documents per batch at most
BATCH_CHARS = 1 << 19  # and about this many characters: numpy's per-call cost is shared, workers stay busy


class DecontamError(ValueError):
    """A problem with the user's input or settings; the CLI prints it as one line."""


def _sequence_matcher() -> Callable[..., Any]:
    try:
        return importlib.import_module("cydifflib").SequenceMatcher
    except ImportError:
        return importlib.import_module("difflib").SequenceMatcher


SequenceMatcher = _sequence_matcher()


@dataclass(frozen=True)
class Config:
    ngram: int = NGRAM
    threshold: float = THRESHOLD
    min_block_chars: int = MIN_BLOCK_CHARS

    def __post_init__(self) -> None:
        if not 1 <= self.ngram <= MAX_NGRAM:
            raise DecontamError(f"ngram must be between 1 and {MAX_NGRAM}, got {self.ngram}")
        if not 0.0 <= self.threshold <= 1.0:
            raise DecontamError(f"threshold must be between 0 and 1, got {self.threshold}")
        if self.min_block_chars < 0:
            raise DecontamError(f"min_block_chars must be at least 0, got {self.min_block_chars}")


@dataclass(frozen=True)
class BenchmarkItem:
    """One benchmark sample as evaluation sees it (question plus correct answer)."""

    benchmark: str
    index: int  # row number in the benchmark split, so a finding can be looked up
    text: str


@dataclass(frozen=True)
class Match:
    """A verified candidate: which item, how much of it the document holds, and the evidence."""

    item_id: int  # position in Index.items
    benchmark: str
    item_index: int
    item_text: str
    ngram: str  # the first shared n-gram (or whole short item), normalized
    shared_ngrams: int
    ratio: float


@dataclass(frozen=True)
class Verdict:
    contaminated: bool
    matches: tuple[Match, ...] = ()  # ratio > threshold, highest ratio first
    near_misses: tuple[Match, ...] = ()  # candidates at or under the threshold
    tokens: int = 0
    skipped: int = 0  # candidates left unscored: their benchmark is settled by a whole copy

    @property
    def best(self) -> Match | None:
        return self.matches[0] if self.matches else None


# --- normalization -------------------------------------------------------------------------
#
# `normalize` below is the definition. Batches take a faster road that gives the same tokens:
# every step of the recipe maps one character to at most one character without looking at
# its neighbours (NFD's reordering only moves marks, which are dropped), so a table indexed
# by code point does all four steps: one `bytes.translate` for ASCII, one lookup for each other
# character. Characters where that fails (NFD to several letters, as Hangul syllables; capital
# sigma, whose lowercase depends on the next letter) send their document down the definition's
# road.

_WORD = re.compile(r"\w+")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
# For ASCII text `\w` is [A-Za-z0-9_]: mapping everything else to spaces and splitting gives
# the same tokens as the regex at a fraction of the cost.
_ASCII_NON_WORD = str.maketrans({c: " " for c in range(128) if not (chr(c).isalnum() or chr(c) == "_")})


@lru_cache(maxsize=65536)
def _non_ascii_role(char: str) -> str:
    """ "mark", "word" (what `\\w` matches) or "other", for one non-ASCII character."""
    if unicodedata.category(char).startswith("M"):
        return "mark"
    return "word" if char.isalnum() or char == "_" else "other"


def normalize(text: str) -> str:
    """NFD, no combining marks (general category M), lowercase, `\\w+` tokens joined by spaces."""
    if not text.isascii():
        text = unicodedata.normalize("NFD", text)
        # Few distinct non-ASCII characters occur in a text, mostly marks and punctuation:
        # deleting marks and blanking punctuation with str.replace usually leaves ASCII text,
        # which the fast path below handles; words in other scripts go through the regex.
        for char in {c for run in _NON_ASCII.findall(text) for c in run}:
            role = _non_ascii_role(char)
            if role != "word":
                text = text.replace(char, "" if role == "mark" else " ")
        if not text.isascii():
            return " ".join(_WORD.findall(text.lower()))
    return " ".join(text.lower().translate(_ASCII_NON_WORD).split())


def tokenize(text: str) -> list[str]:
    return normalize(text).split()


_SPACE = 32
_TEXT_END = 10  # between texts in a batch; never inside a normalized one
_DROP = -1  # the character vanishes (a mark)
_SLOW = -2  # the table cannot say: normalize the document by the definition
_ASTRAL = 0x10000  # table slot standing for every code point above the BMP


@lru_cache(maxsize=4096)
def _char_code(code: int) -> int:
    """What one code point becomes: a code point, _SPACE, _DROP or _SLOW."""
    if 0xD800 <= code <= 0xDFFF:
        return _SPACE  # a lone surrogate is no word character
    char = chr(code)
    kept = "".join(
        c for c in unicodedata.normalize("NFD", char) if not unicodedata.category(c).startswith("M")
    )
    if "\u03a3" in kept:
        return _SLOW
    lowered = kept.lower()
    if len(lowered) > 1:
        return _SLOW
    if not lowered:
        return _DROP
    return ord(lowered) if lowered.isalnum() or lowered == "_" else _SPACE


@lru_cache(maxsize=1)
def _char_table() -> np.ndarray:
    # Built once per process (about 0.2 s); forked workers inherit it with the index.
    table = np.array([_char_code(code) for code in range(_ASTRAL)] + [_SLOW], dtype=np.int32)
    table[0] = _TEXT_END  # the batch joins texts with NUL, which a text's own NULs never are
    return table


# Bytes in, not code points: the batch's normalized text is handed on as UTF-8, which for the
# usual Latin text (accents and punctuation gone) is one byte per character, and every byte of a
# word character is above the space.
def _ascii_byte(code: int) -> int:
    char = chr(code)
    if code == 0:
        return _TEXT_END  # the batch joins texts with NUL, which a text's own NULs never are
    return ord(char.lower()) if char.isascii() and (char.isalnum() or char == "_") else _SPACE


# ASCII bytes as the recipe maps them; the bytes of longer UTF-8 sequences stay for the table.
_UTF8_BYTES = bytes(_ascii_byte(code) if code < 0x80 else code for code in range(256))


def _normalized_bytes(texts: Sequence[str]) -> np.ndarray:
    """UTF-8 of the normalized texts (uint8): tokens apart by runs of spaces, texts by newlines."""
    joined = "\0".join(texts)
    raw = joined.encode("utf-8", "surrogatepass")
    if raw.count(0) >= len(texts):  # a text's own NULs are word breaks, as any control
        texts = [text.replace("\0", " ") for text in texts]
        joined = "\0".join(texts)
        raw = joined.encode("utf-8", "surrogatepass")
    if joined.isascii():
        return np.frombuffer(raw.translate(_UTF8_BYTES), dtype=np.uint8)
    # Mostly ASCII with a few accents and dashes: ASCII bytes by one translate, the few other
    # characters one by one through the table, written back in place. A text holding one the
    # table cannot say (a Hangul syllable, a capital sigma) goes through the definition first.
    for attempt in range(2):
        data = np.frombuffer(raw.translate(_UTF8_BYTES), dtype=np.uint8)
        folded, stuck = _fold_non_ascii(data.copy())
        if stuck.size == 0:
            return folded
        if attempt == 0:
            numbers = set(np.searchsorted(np.flatnonzero(data == _TEXT_END), stuck).tolist())
            texts = [normalize(text) if number in numbers else text for number, text in enumerate(texts)]
            joined = "\0".join(texts)
            raw = joined.encode("utf-8", "surrogatepass")
    codes = _normalized_codes(joined, texts)
    return np.frombuffer(
        codes.astype(np.uint32).tobytes().decode("utf-32-le").encode("utf-8"), dtype=np.uint8
    )


def _fold_non_ascii(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`data` with each UTF-8 sequence replaced by the table's character, positions of the
    sequences where that cannot be done in place: a character the table cannot say, or one
    whose replacement is longer). Only with no such position is the first part the answer."""
    lead = np.flatnonzero(data >= 0xC0)
    last = data.size - 1
    first, second, third, fourth = (data[np.minimum(lead + k, last)].astype(np.int64) for k in range(4))
    size = np.where(first >= 0xF0, 4, np.where(first >= 0xE0, 3, 2))
    tail = ((second & 0x3F) << 12) | ((third & 0x3F) << 6) | (fourth & 0x3F)
    code = ((first & (0xFF >> (size + 1))) << (6 * (size - 1))) | (tail >> (6 * (4 - size)))
    mapped = _char_table()[np.minimum(code, _ASTRAL)].astype(np.int64)
    astral = np.flatnonzero(code >= _ASTRAL)
    mapped[astral] = [_char_code(int(value)) for value in code[astral]]
    length = np.select([mapped < 0, mapped < 0x80, mapped < 0x800, mapped < 0x10000], [0, 1, 2, 3], 4)
    stuck = lead[(mapped == _SLOW) | (length > size)]
    if stuck.size:
        return data, stuck
    keep = data < 0x80
    head = np.select(
        [length == 1, length == 2, length == 3],
        [mapped, 0xC0 | (mapped >> 6), 0xE0 | (mapped >> 12)],
        0xF0 | (mapped >> 18),
    )
    for k in range(4):
        chosen = np.flatnonzero(length > k)
        at = lead[chosen] + k
        if k == 0:
            data[at] = head[chosen]
        else:
            data[at] = 0x80 | ((mapped[chosen] >> (6 * (length[chosen] - 1 - k))) & 0x3F)
        keep[at] = True
    return data[keep], stuck


def _normalized_codes(joined: str, texts: Sequence[str]) -> np.ndarray:
    """Code points of the normalized texts, by the table and, for texts it cannot do, the definition."""
    codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    table = _char_table()
    mapped = table[np.minimum(codes, _ASTRAL)]
    astral = np.flatnonzero(codes >= _ASTRAL)
    mapped[astral] = [_char_code(int(code)) for code in codes[astral]]
    lowest = mapped.min()
    if lowest <= _SLOW:
        ends = np.flatnonzero(codes == 0)
        pieces = np.split(mapped, ends)  # every piece but the first starts with its separator
        for number in set(np.searchsorted(ends, np.flatnonzero(mapped == _SLOW)).tolist()):
            again = np.frombuffer(normalize(texts[number]).encode("utf-32-le"), dtype=np.uint32)
            pieces[number] = np.concatenate(([_TEXT_END] if number else [], again)).astype(np.int32)
        mapped = np.concatenate(pieces)
    # Precomposed letters map straight to their base letter; marks standing alone are rare.
    return mapped[mapped != _DROP] if lowest <= _DROP else mapped


# --- hashing -------------------------------------------------------------------------------
#
# A token's hash is computed from its bytes read eight at a time as little-endian integers (a
# token of up to 8 bytes is its own integer before mixing; longer ones fold in each further
# word through a 64-bit mixer; tokens over 32 bytes, rare in text, go through BLAKE2b one by
# one). An n-gram's hash is a polynomial over its tokens' hashes, mixed again: with R the
# inverse of the odd base B modulo 2**64 and S[t] = sum(h[u] * R**u, u < t), the polynomial of
# h[s:e] is (S[e] - S[s]) * B**(e - 1), so prefix sums give every n-gram hash of a batch in a
# few numpy passes. Hashing tokens first makes an n-gram's hash blind to how its tokens are
# spaced. Values depend on the text only, never on the process, the worker count or
# PYTHONHASHSEED.

_BASE = 0x100000001B3
_BASE_INVERSE = pow(_BASE, -1, 1 << 64)
_POWERS_CACHED = 1 << 22
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_LONG_TOKEN = 32  # bytes
_WORD_MASKS = np.array([(1 << (8 * size)) - 1 for size in range(8)] + [(1 << 64) - 1], dtype=np.uint64)


@lru_cache(maxsize=1)
def _cached_powers() -> tuple[np.ndarray, np.ndarray]:
    return _powers_of(_BASE, _POWERS_CACHED), _powers_of(_BASE_INVERSE, _POWERS_CACHED)


def _powers_of(base: int, count: int) -> np.ndarray:
    powers = np.full(count, base, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers, dtype=np.uint64)  # wraps modulo 2**64, as intended


def _powers(count: int) -> tuple[np.ndarray, np.ndarray]:
    if count <= _POWERS_CACHED:
        forward, inverse = _cached_powers()
        return forward[:count], inverse[:count]
    return _powers_of(_BASE, count), _powers_of(_BASE_INVERSE, count)


_SHIFT = np.uint64(33)
_MIXERS = (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(1))


def _mix(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place: callers hand over arrays of their own."""
    spare = np.empty_like(values)
    for multiplier in _MIXERS:
        values ^= np.right_shift(values, _SHIFT, out=spare)
        values *= multiplier
    return values


def _prefix(values: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    prefix = np.zeros(values.size + 1, dtype=np.uint64)
    np.cumsum(values * inverse[: values.size], out=prefix[1:])
    return prefix


def _words_at(words: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The eight bytes from each byte offset `at` of `words`' buffer, as little-endian integers."""
    word = at >> 3
    shift = ((at & 7) << 3).astype(np.uint64)
    # Two shifts for the high part, as shifting a 64-bit integer by 64 is undefined.
    return (words[word] >> shift) | ((words[word + 1] << np.uint64(1)) << (np.uint64(63) - shift))


def _token_hashes(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    words = np.zeros((data.size >> 3) + 2, dtype=np.uint64)
    words.view(np.uint8)[: data.size] = data
    sizes = ends - starts
    hashes = _words_at(words, starts) & _WORD_MASKS[np.minimum(sizes, 8)]
    for offset in range(8, _LONG_TOKEN, 8):
        more = np.flatnonzero(sizes > offset)
        if more.size == 0:
            break
        word = _words_at(words, starts[more] + offset) & _WORD_MASKS[np.minimum(sizes[more] - offset, 8)]
        hashes[more] = _mix(hashes[more]) + word
    long = np.flatnonzero(sizes > _LONG_TOKEN)
    if long.size:
        hashes[long] = [
            int.from_bytes(hashlib.blake2b(data[start:end].tobytes(), digest_size=8).digest(), "little")
            for start, end in zip(starts[long].tolist(), ends[long].tolist(), strict=True)
        ]
    return _mix(hashes ^ (sizes.astype(np.uint64) * _GOLDEN))


@dataclass(frozen=True)
class _Tokens:
    """Every token of a batch of texts, hashed, with the prefix sums its n-grams come from."""

    hashes: np.ndarray  # uint64 hash of each token
    prefix: np.ndarray  # uint64 S[t] over the token hashes, S[0] = 0
    forward: np.ndarray  # uint64 B**t
    text_of: np.ndarray  # int64 which text each token belongs to
    first_token: np.ndarray  # int64 index of each text's first token
    counts: np.ndarray  # int64 tokens per text
    data: np.ndarray  # the `_normalized_bytes` they come from
    breaks: np.ndarray  # int64 where each text ends in `data`, a separator or the end

    def text(self, number: int) -> str:
        """A text, normalized: the same string as `normalize` gives."""
        start = int(self.breaks[number - 1]) + 1 if number else 0
        return " ".join(self.data[start : self.breaks[number]].tobytes().decode("utf-8").split())


def _locate(data: np.ndarray, texts: int) -> _Tokens:
    """Tokens of `_normalized_bytes` output holding `texts` texts."""
    word = np.zeros(data.size + 2, dtype=np.int8)
    np.greater(data, _SPACE, out=word[1:-1])
    # Word and non-word runs alternate, so the changes are start, end, start, end...
    changes = np.flatnonzero(word[1:] != word[:-1])
    starts, ends = changes[0::2], changes[1::2]
    hashes = _token_hashes(data, starts, ends)
    # Few texts, many tokens: find where each text ends among the tokens, not the reverse.
    breaks = np.append(np.flatnonzero(data == _TEXT_END), data.size)
    counts = np.diff(np.searchsorted(starts, breaks), prepend=0)
    text_of = np.repeat(np.arange(texts), counts)
    forward, inverse = _powers(hashes.size + 1)
    first_token = np.cumsum(counts) - counts
    return _Tokens(hashes, _prefix(hashes, inverse), forward, text_of, first_token, counts, data, breaks)


def _tokens_of(texts: Sequence[str]) -> _Tokens:
    return _locate(_normalized_bytes(texts), len(texts))


def _every_gram(tokens: _Tokens, k: int) -> np.ndarray:
    """Hash of the k tokens from each position that has k - 1 after it, within a text or across."""
    end = tokens.hashes.size + 1
    if end <= k:
        return np.empty(0, dtype=np.uint64)
    return _mix((tokens.prefix[k:end] - tokens.prefix[: end - k]) * tokens.forward[k - 1 : end - 1])


def _spans(tokens: _Tokens, first: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept positions, hashes) of the runs of k tokens from `first` that stay inside one text."""
    end = first + k
    inside = np.flatnonzero(end <= tokens.hashes.size)
    inside = inside[tokens.text_of[first[inside]] == tokens.text_of[end[inside] - 1]]
    start, end = first[inside], end[inside]
    return inside, _mix((tokens.prefix[end] - tokens.prefix[start]) * tokens.forward[end - 1])


def _grams(tokens: _Tokens, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(first token index, hash) of every run of k tokens inside one text."""
    hashes = _every_gram(tokens, k)
    first = np.flatnonzero(tokens.text_of[: hashes.size] == tokens.text_of[k - 1 :])
    return first, hashes[first]


def gram_hashes(text: str, k: int) -> np.ndarray:
    """Hash of each k-gram of a text's normalized tokens, the same integers the index holds."""
    return _grams(_tokens_of([text]), k)[1]


# --- index ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BitFilter:
    """A blocked Bloom filter: a key's top bits pick one 64-bit word, three 6-bit fields of its
    low bits pick the bits to test in that word.

    One cache miss per key, whatever the number of bits tested. With 20 to 40 bits per key (a
    word per two or three keys) about 0.2 % of absent keys get through to the binary search,
    whose own misses cost far more than the filter's.
    """

    words: np.ndarray  # uint64
    bits: int

    @classmethod
    def of(cls, keys: np.ndarray) -> _BitFilter:
        bits = min(27, max(6, int(np.ceil(np.log2(max(keys.size, 1) / 3)))))
        words = np.zeros(1 << bits, dtype=np.uint64)
        probes = np.zeros(keys.size, dtype=np.uint64)
        for shift in _PROBES:
            probes |= _ONE << ((keys >> shift) & _SIXTY_THREE)
        np.bitwise_or.at(words, (keys >> np.uint64(64 - bits)).astype(np.intp), probes)
        return cls(words, bits)

    def maybe(self, keys: np.ndarray) -> np.ndarray:
        word = self.words[(keys >> np.uint64(64 - self.bits)).astype(np.intp)]
        found = np.ones(keys.size, dtype=np.uint64)
        for shift in _PROBES:
            found &= word >> ((keys >> shift) & _SIXTY_THREE)
        return found.astype(bool)


_PROBES = (np.uint64(0), np.uint64(6), np.uint64(12))
_ONE = np.uint64(1)
_SIXTY_THREE = np.uint64(63)
_PAIR = np.uint64(0xD6E8FEB86659FD93)


def _heads(hashes: np.ndarray, length: int) -> np.ndarray:
    """A hash of the `length` (1 or 2) tokens from each position; the last ones have no successor."""
    return hashes if length == 1 else (hashes[:-1] * _PAIR) ^ hashes[1:]


@dataclass(frozen=True)
class _Anchors:
    """The first `length` tokens (one or two) of short items, hashed: a short item can only start there.

    Two tokens, not one: single words such as "the" begin short items and a third of a text's
    tokens, while two-word openings are rare.
    """

    length: int
    hashes: np.ndarray  # uint64, sorted, distinct
    flags: np.ndarray  # bool, set at the top `bits` bits of each hash: one lookup rules most tokens out
    bits: int

    @classmethod
    def of(cls, length: int, hashes: np.ndarray) -> _Anchors:
        hashes = np.unique(hashes)
        # At least 64 flags per anchor; a few thousand anchors keep the table in cache.
        bits = min(24, max(10, int(hashes.size).bit_length() + 6))
        flags = np.zeros(1 << bits, dtype=bool)
        flags[(hashes >> np.uint64(64 - bits)).astype(np.intp)] = True
        return cls(length, hashes, flags, bits)

    def starts(self, tokens: _Tokens) -> np.ndarray:
        heads = _heads(tokens.hashes, self.length)
        first = np.flatnonzero(self.flags[(heads >> np.uint64(64 - self.bits)).astype(np.intp)])
        slot = np.minimum(np.searchsorted(self.hashes, heads[first]), self.hashes.size - 1)
        first = first[self.hashes[slot] == heads[first]]
        last = first + (self.length - 1)
        return first[tokens.text_of[first] == tokens.text_of[last]]


ANCHOR_TOKENS = 2


@dataclass(frozen=True, eq=False)
class Index:
    """Benchmark n-grams as sorted integers; built once, read by every worker."""

    config: Config
    items: tuple[BenchmarkItem, ...]
    normalized: tuple[str, ...]
    keys: np.ndarray  # uint64, sorted, distinct
    offsets: np.ndarray  # int64: the owners of keys[i] are owners[offsets[i]:offsets[i + 1]]
    owners: np.ndarray  # int32 item ids
    lengths: tuple[int, ...]  # gram lengths present: n, plus the lengths of short items
    filter: _BitFilter  # over keys
    anchors: tuple[_Anchors, ...]  # where short items can start
    grams: np.ndarray  # int64 distinct keys per item
    benchmark_of: np.ndarray  # int64 number of each item's benchmark
    unmatchable: tuple[int, ...] = ()  # item ids too short to ever exceed the threshold

    @property
    def benchmarks(self) -> list[str]:
        return sorted({item.benchmark for item in self.items})

    def items_per_benchmark(self) -> dict[str, int]:
        return dict(Counter(item.benchmark for item in self.items))

    def owners_of(self, key: int) -> list[int]:
        """Item ids holding the gram whose hash is `key`."""
        at = int(np.searchsorted(self.keys, np.uint64(key)))
        if at == self.keys.size or int(self.keys[at]) != key:
            return []
        return self.owners[self.offsets[at] : self.offsets[at + 1]].tolist()


def build_index(items: Iterable[BenchmarkItem], config: Config | None = None) -> Index:
    """Index every n-gram of every item (short items whole), keeping every owner of an n-gram."""
    config = config or Config()
    items = tuple(items)
    _char_table()  # before any fork, so workers share it
    normalized = [normalize(item.text) for item in items]
    tokens = _tokens_of([item.text for item in items])
    # An item of k < n tokens is one k-gram; longer items give their n-grams.
    gram_length = np.minimum(tokens.counts, config.ngram)
    matchable = np.array([len(text) > config.min_block_chars for text in normalized], dtype=bool)
    key_parts, owner_parts = [], []
    lengths = sorted(set(gram_length[matchable & (gram_length > 0)].tolist()))
    for k in lengths:
        first, hashes = _grams(tokens, k)
        owner = tokens.text_of[first]
        wanted = (gram_length[owner] == k) & matchable[owner]
        key_parts.append(hashes[wanted])
        owner_parts.append(owner[wanted].astype(np.int32))
    keys = np.concatenate(key_parts) if key_parts else np.empty(0, dtype=np.uint64)
    owners = np.concatenate(owner_parts) if owner_parts else np.empty(0, dtype=np.int32)
    order = np.lexsort((owners, keys))
    keys, owners = keys[order], owners[order]
    # An n-gram repeated inside one item is one entry.
    distinct = np.ones(keys.size, dtype=bool)
    distinct[1:] = (keys[1:] != keys[:-1]) | (owners[1:] != owners[:-1])
    keys, owners = keys[distinct], owners[distinct]
    keys, starts = np.unique(keys, return_index=True)
    short = (gram_length < config.ngram) & (gram_length > 0) & matchable
    anchor_length = np.minimum(gram_length, ANCHOR_TOKENS)
    anchors = []
    for length in sorted(set(anchor_length[short].tolist())):
        heads = _heads(tokens.hashes, length)
        anchors.append(_Anchors.of(length, heads[tokens.first_token[short & (anchor_length == length)]]))
    return Index(
        config=config,
        items=items,
        normalized=tuple(normalized),
        keys=keys,
        offsets=np.append(starts, owners.size).astype(np.int64),
        owners=owners,
        lengths=tuple(lengths),
        filter=_BitFilter.of(keys),
        anchors=tuple(anchors),
        grams=np.bincount(owners, minlength=len(items)).astype(np.int64),
        benchmark_of=np.unique([item.benchmark for item in items], return_inverse=True)[1].astype(np.int64),
        unmatchable=tuple(np.flatnonzero(~matchable).tolist()),
    )


# --- candidates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hits:
    """Shared grams of a batch, one row per (document, item) pair."""

    docs: np.ndarray  # int64 document number in the batch
    items: np.ndarray  # int64 item id
    first: np.ndarray  # int64 token position (in the document) of the first shared gram
    length: np.ndarray  # int64 length of that gram
    count: np.ndarray  # int64 number of shared gram positions

    def part(self, start: int, end: int) -> _Hits:
        rows = slice(start, end)
        return _Hits(self.docs[rows], self.items[rows], self.first[rows], self.length[rows], self.count[rows])


def _lookup(grams: np.ndarray, index: Index) -> tuple[np.ndarray, np.ndarray]:
    """(gram number, owner slot) for every owner of a key equal to one of the grams."""
    maybe = np.flatnonzero(index.filter.maybe(grams))
    if maybe.size == 0 or index.keys.size == 0:
        return maybe, maybe
    wanted = grams[maybe]
    at = np.minimum(np.searchsorted(index.keys, wanted), index.keys.size - 1)
    found = index.keys[at] == wanted
    maybe, at = maybe[found], at[found]
    left = index.offsets[at]
    counts = index.offsets[at + 1] - left
    # Expand each [left, left + count) run into its slots without a Python loop.
    run_start = np.repeat(np.cumsum(counts) - counts, counts)
    slots = np.repeat(left, counts) + (np.arange(int(counts.sum())) - run_start)
    return np.repeat(maybe, counts), slots


def _batch_hits(tokens: _Tokens, index: Index) -> _Hits:
    n = index.config.ngram
    grams = _every_gram(tokens, n)  # some run across two texts: their hits are dropped below
    first = np.arange(grams.size)
    size = np.full(grams.size, n)
    short = [k for k in index.lengths if k < n]
    if short and index.anchors:
        # Short items are looked for only where an anchor says one may start, all lengths at once.
        starts = np.unique(np.concatenate([anchors.starts(tokens) for anchors in index.anchors]))
        lengths = np.array(short, dtype=np.int64)
        inside, short_grams = _spans(tokens, np.repeat(starts, lengths.size), np.tile(lengths, starts.size))
        first = np.concatenate((first, np.repeat(starts, lengths.size)[inside]))
        size = np.concatenate((size, np.tile(lengths, starts.size)[inside]))
        grams = np.concatenate((grams, short_grams))
    numbers, slots = _lookup(grams, index)
    token, length = first[numbers], size[numbers]
    inside = np.flatnonzero(tokens.text_of[token] == tokens.text_of[token + length - 1])
    token, length, slots = token[inside], length[inside], slots[inside]
    docs = tokens.text_of[token]
    items = index.owners[slots].astype(np.int64)
    pos = token - tokens.first_token[docs]
    order = np.lexsort((pos, items, docs))
    docs, items, pos, length = docs[order], items[order], pos[order], length[order]
    pair = docs * (len(index.items) + 1) + items
    _, first_of, count = np.unique(pair, return_index=True, return_counts=True)
    return _Hits(docs[first_of], items[first_of], pos[first_of], length[first_of], count)


# --- verification --------------------------------------------------------------------------
#
# SequenceMatcher's cost grows with the document's length times the item's, and it is run for
# every candidate item, so it is fed shorter strings that provably give the same ratio. Only
# blocks longer than `min_block_chars` (m) count. A character that lies in no common substring
# of length m + 1 or more can only ever be part of shorter blocks, so every such run in either
# text is replaced by one separator that the other text lacks. That keeps every counting common
# substring, in the same order, and creates none (none can cross a separator); find_longest_match
# picks the longest block, first in the document, then in the item, and order is kept, so the
# counting blocks and their recursion are unchanged. A sub-range whose longest block is at most
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
        windows *= _GOLDEN  # the flags come from the top bits: spread them
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


def _matched_chars(doc: str, item: str, min_block_chars: int) -> int:
    blocks = SequenceMatcher(None, doc, item, autojunk=False).get_matching_blocks()
    return sum(block.size for block in blocks if block.size > min_block_chars)


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
        # and nothing is left beside it: the ratio is exactly 1 without running it.
        return 1.0
    return _partial_ratio(document, item, min_block_chars)


def _partial_ratio(document: _Document, item: _Side, min_block_chars: int) -> float:
    """The ratio of an item that is not inside the document whole."""
    length = len(item.text)
    if length <= min_block_chars:
        return 0.0  # no block can be longer than the item
    doc = document.side
    item_covered = item.covered(item.starts_in(doc))
    if not item_covered.any():
        return 0.0
    doc_text = doc.collapse(doc.covered(document.starts_in(item)), _DOC_SEPARATOR)
    item_text = item.collapse(item_covered, _ITEM_SEPARATOR)
    return _matched_chars(doc_text, item_text, min_block_chars) / length


def match_ratio(doc: str, item: str, min_block_chars: int = MIN_BLOCK_CHARS) -> float:
    """len(joined SequenceMatcher blocks longer than min_block_chars) / len(item), on normalized texts.

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


def _verify(text: str, hits: _Hits, index: Index) -> Verdict:
    """Ratios of a document's candidate items (`hits` of this document only), whole copies first.

    A document holding a whole normalized item is removed, with that item as its best match in
    that item's benchmark (ratio 1, the highest there is). Other candidates of the same benchmark
    are then left unscored: nothing they could show changes the document's fate or its best
    match. This matters for items that share long stems (MMLU's 895 moral scenarios): one
    copied scenario makes all of them candidates.
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
    for row in pending.tolist():
        found.append(match(row, _partial_ratio(document, _item_side(index, int(hits.items[row])), minimum)))
    found.sort(key=_sort_key)
    above = tuple(m for m in found if m.ratio > index.config.threshold)
    below = tuple(m for m in found if m.ratio <= index.config.threshold)
    skipped = hits.items.size - int(whole.sum()) - pending.size
    return Verdict(bool(above), above, below, len(words) if text else 0, skipped)


def check_batch(docs: Sequence[str], index: Index) -> list[Verdict]:
    """Verdicts for a batch of documents, in order."""
    tokens = _tokens_of(docs)
    hits = _batch_hits(tokens, index)
    verdicts = [_clean(count) for count in tokens.counts.tolist()]
    # Hits come sorted by document: each candidate document gets its own slice.
    numbers, starts = np.unique(hits.docs, return_index=True)
    bounds = np.append(starts, hits.docs.size).tolist()
    for number, start, end in zip(numbers.tolist(), bounds[:-1], bounds[1:], strict=True):
        verdicts[number] = _verify(tokens.text(number), hits.part(start, end), index)
    return verdicts


@lru_cache(maxsize=4096)
def _clean(tokens: int) -> Verdict:
    # Verdicts are frozen, so clean documents of one length share one: cheaper to make, and
    # pickled once per batch on the way back from a worker process.
    return Verdict(False, tokens=tokens)


def check(doc: str, index: Index) -> Verdict:
    return check_batch([doc], index)[0]


# --- running on every core -----------------------------------------------------------------


_Packed = tuple[list[int], dict[int, Verdict]]


def _pack(verdicts: list[Verdict]) -> _Packed:
    """Verdicts for the way back from a forked process: token counts, and those with candidates."""
    found = {n: verdict for n, verdict in enumerate(verdicts) if verdict.matches or verdict.near_misses}
    return [verdict.tokens for verdict in verdicts], found


def _unpack(packed: _Packed) -> list[Verdict]:
    tokens, found = packed
    return [found.get(n) or _clean(count) for n, count in enumerate(tokens)]


def _serve(connection: Any, index: Index, inherited: list[Any]) -> None:
    """A forked process: check each batch that arrives and send back its verdicts, until told to stop.

    The caller's ends of the pipes (this process's and its elder siblings') came along with the
    fork: closed here, so that the pipe ends when the caller does, and this process with it.
    """
    for end in inherited:
        end.close()
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message is None:
            return
        number, docs = message
        try:
            reply: tuple[int, _Packed | None, BaseException | None] = (
                number,
                _pack(check_batch(docs, index)),
                None,
            )
        except Exception as error:  # raised in the caller, as if it had checked the batch
            reply = (number, None, error)
        connection.send(reply)


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= size or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _start_method() -> str:
    # Fork hands the index to each worker by copy-on-write memory, never by pickling; where
    # fork is missing the index is pickled once per worker at start, still never per batch.
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(eq=False)
class _Pending:
    """A batch handed to a forked process. `done` is set when its verdicts (or the error checking
    it raised) are back, or when they never will be: its process died, and neither is set."""

    batch: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    packed: _Packed | None = None
    error: BaseException | None = None
    claimed: bool = False  # the caller checks it instead: not sent if not sent yet


class _Forked:
    """One forked checking process with its own pipe, and two threads so that the caller never
    waits on it: one sends the batches as the process takes them, one collects the verdicts.

    A process that dies loses only the batches it was sent: they are marked lost, and the
    caller checks them itself.
    """

    def __init__(self, context: Any, index: Index, elder: list[_Forked]) -> None:
        self.connection, child = context.Pipe()
        inherited = [self.connection, *(forked.connection for forked in elder)]
        self.process = context.Process(target=_serve, args=(child, index, inherited), daemon=True)
        self.process.start()
        child.close()
        self.lock = threading.Lock()
        self.alive = True
        self.waiting = 0  # batches handed over and not back
        self._sent: dict[int, _Pending] = {}
        self._outbox: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._numbers = itertools.count()

    def start(self) -> None:
        """Start the threads, once every process is forked: a fork copies no thread but may copy
        a lock one of them holds."""
        threading.Thread(target=self._send, name="decontam-send", daemon=True).start()
        threading.Thread(target=self._receive, name="decontam-receive", daemon=True).start()

    def hand_over(self, batch: list[str]) -> _Pending:
        pending = _Pending(batch)
        with self.lock:
            self.waiting += 1
        self._outbox.put(pending)
        return pending

    def _settle(
        self, pending: _Pending, packed: _Packed | None = None, error: BaseException | None = None
    ) -> None:
        with self.lock:
            self.waiting -= 1
        pending.packed, pending.error = packed, error
        pending.done.set()

    def _send(self) -> None:
        while (pending := self._outbox.get()) is not None:
            number = next(self._numbers)
            with self.lock:
                go = self.alive and not pending.claimed
                if go:
                    self._sent[number] = pending
            if not go:
                self._settle(pending)
                continue
            # If the process is gone, the receiving thread marks its batches lost.
            with contextlib.suppress(OSError):
                self.connection.send((number, pending.batch))
        with contextlib.suppress(OSError):
            self.connection.send(None)

    def _receive(self) -> None:
        while True:
            try:
                number, packed, error = self.connection.recv()
            except (EOFError, OSError):
                break
            with self.lock:
                pending = self._sent.pop(number)
            self._settle(pending, packed, error)
        with self.lock:
            self.alive, lost = False, list(self._sent.values())
            self._sent.clear()
        if lost or self.process.exitcode not in (None, 0):
            logging.getLogger(__name__).warning(
                "a decontamination process ended (exit code %s); its %d batches are checked by the caller",
                self.process.exitcode,
                len(lost),
            )
        for pending in lost:
            self._settle(pending)

    def close(self) -> None:
        self._outbox.put(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


QUEUED = 16  # batches waiting for each forked process at most


class Checker:
    """`workers` processes that check batches: this one and `workers - 1` forked ones holding the index.

    Started once and reused for every corpus: a long-running worker (or a benchmark) pays the
    start only once; `check_all` below is the one-shot form. The calling thread hands batches to
    the forked processes until each has `QUEUED` waiting, and checks the next batch itself
    whenever they have, so every core is busy and the caller's share never crosses a pipe.
    The queue is deep because batches differ: one document can share n-grams with hundreds of
    items, and the forked processes must not run dry while the caller checks it. At the end of
    the input the caller takes back the last batches not yet sent, so the queue does not leave
    it idle either. A forked process that dies (out of memory, killed) loses nothing: the
    caller checks the batches it held and all that follow. Calls from several threads share
    the processes, and one of them at a time checks here (they would only share one interpreter).
    """

    def __init__(self, index: Index, workers: int | None = None, batch_size: int = BATCH_SIZE) -> None:
        self.index = index
        self.workers = default_workers() if workers is None else workers
        self.batch_size = batch_size
        self._lock = threading.Lock()  # choosing a forked process
        self._here = threading.Lock()  # held by the thread checking in this process
        context = multiprocessing.get_context(_start_method())
        self._forked: list[_Forked] = []
        for _ in range(self.workers - 1):
            self._forked.append(_Forked(context, index, self._forked))
        for forked in self._forked:
            forked.start()

    def processes(self) -> list[int]:
        """Process ids of the forked processes still checking."""
        return [forked.process.pid for forked in self._forked if forked.alive]

    def _hand_over(self, batch: list[str]) -> _Pending | None:
        """`batch` on its way to a forked process, or None when they all have enough waiting."""
        with self._lock:
            free = [forked for forked in self._forked if forked.alive and forked.waiting < QUEUED]
            if not free:
                return None
            return min(free, key=lambda forked: forked.waiting).hand_over(batch)

    def _check_here(self, batch: list[str]) -> list[Verdict]:
        with self._here:
            return check_batch(batch, self.index)

    def _take_back(self, ahead: deque[_Pending | list[Verdict]]) -> bool:
        """Check here the latest batch still waiting for a forked process, if this process is free.

        The first batches not back are left alone: the forked processes are on them.
        """
        waiting = [
            n for n, entry in enumerate(ahead) if isinstance(entry, _Pending) and not entry.done.is_set()
        ]
        if len(waiting) < self.workers or not self._here.acquire(blocking=False):
            return False
        try:
            entry = ahead[waiting[-1]]
            assert isinstance(entry, _Pending)
            entry.claimed = True
            ahead[waiting[-1]] = check_batch(entry.batch, self.index)
        finally:
            self._here.release()
        return True

    def _verdicts(self, entry: _Pending | list[Verdict]) -> list[Verdict]:
        if isinstance(entry, list):
            return entry
        if entry.error is not None:
            raise entry.error
        if entry.packed is None:  # lost with its process
            return self._check_here(entry.batch)
        return _unpack(entry.packed)

    def _settle(self, ahead: deque[_Pending | list[Verdict]], keep: int) -> Iterator[Verdict]:
        """Verdicts of the batches at the front that are done, and of more until `keep` remain."""
        while ahead:
            front = ahead[0]
            if isinstance(front, _Pending) and not front.done.is_set():
                if len(ahead) <= keep:
                    return
                if not self._take_back(ahead):
                    front.done.wait()
                continue
            yield from self._verdicts(ahead.popleft())

    def check_all(self, docs: Iterable[str]) -> Iterator[Verdict]:
        """Verdicts in input order; the same ones whatever the worker count."""
        ahead: deque[_Pending | list[Verdict]] = deque()  # in input order
        for batch in _batches(docs, self.batch_size):
            ahead.append(self._hand_over(batch) or self._check_here(batch))
            # Bounded: a slow process holds back at most so many finished batches behind it.
            yield from self._settle(ahead, keep=4 * QUEUED * self.workers)
        yield from self._settle(ahead, keep=0)

    def close(self) -> None:
        for forked in self._forked:
            forked.close()
        self._forked = []

    def __enter__(self) -> Checker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def check_all(
    docs: Iterable[str], index: Index, workers: int | None = None, batch_size: int = BATCH_SIZE
) -> Iterator[Verdict]:
    """Verdicts in input order; the same ones whatever `workers` is."""
    with Checker(index, workers, batch_size) as checker:
        yield from checker.check_all(docs)


# --- report --------------------------------------------------------------------------------

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
