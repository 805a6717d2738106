"""Candidates: the (document, item) pairs of a batch that share a gram, found by hash lookups.

Only these pairs reach verification, where the ratio is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cosmoforge.postprocess.decontam.hashing import Tokens, every_gram, spans
from cosmoforge.postprocess.decontam.index import Index


@dataclass(frozen=True)
class Hits:
    """Shared grams of a batch, one row per (document, item) pair."""

    docs: np.ndarray  # int64 document number in the batch
    items: np.ndarray  # int64 item id
    first: np.ndarray  # int64 token position (in the document) of the first shared gram
    length: np.ndarray  # int64 length of that gram
    count: np.ndarray  # int64 number of shared gram positions

    def part(self, start: int, end: int) -> Hits:
        rows = slice(start, end)
        return Hits(self.docs[rows], self.items[rows], self.first[rows], self.length[rows], self.count[rows])


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


def batch_hits(tokens: Tokens, index: Index) -> Hits:
    n = index.config.ngram
    grams = every_gram(tokens, n)  # some run across two texts: their hits are dropped below
    first = np.arange(grams.size)
    size = np.full(grams.size, n)
    short = [k for k in index.lengths if k < n]
    if short and index.anchors:
        # Short items are looked for only where an anchor says one may start, all lengths at once.
        starts = np.unique(np.concatenate([anchors.starts(tokens) for anchors in index.anchors]))
        lengths = np.array(short, dtype=np.int64)
        inside, short_grams = spans(tokens, np.repeat(starts, lengths.size), np.tile(lengths, starts.size))
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
    return Hits(docs[first_of], items[first_of], pos[first_of], length[first_of], count)
