"""The benchmark index: every n-gram of every item (short items whole), as sorted integers.

Built once per process from the items and read by every check, in this process and in the forked
checking processes, which share it copy-on-write.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cosmoforge.postprocess.decontam.hashing import Tokens, grams, tokens_of
from cosmoforge.postprocess.decontam.model import BenchmarkItem, Config
from cosmoforge.postprocess.decontam.normalization import char_table


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

    def starts(self, tokens: Tokens) -> np.ndarray:
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
    char_table()  # before any fork, so workers share it
    tokens = tokens_of([item.text for item in items])
    normalized = tokens.texts() if items else []  # no text and one empty text have the same bytes
    # An item of k < n tokens is one k-gram; longer items give their n-grams.
    gram_length = np.minimum(tokens.counts, config.ngram)
    matchable = np.array([len(text) > config.min_block_chars for text in normalized], dtype=bool)
    key_parts, owner_parts = [], []
    lengths = sorted(set(gram_length[matchable & (gram_length > 0)].tolist()))
    for k in lengths:
        first, hashes = grams(tokens, k)
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
