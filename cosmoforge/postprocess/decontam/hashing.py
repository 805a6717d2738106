"""Token and word n-gram hashes of a batch of normalized texts, as integers from their bytes.

Candidates are found by comparing n-gram hashes, so the index and every document must hash the
same way, in any process and for any `PYTHONHASHSEED`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cosmoforge.postprocess.decontam.normalization import SPACE, TEXT_END, normalized_bytes

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
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_LONG_TOKEN = 32  # bytes
_WORD_MASKS = np.array([(1 << (8 * size)) - 1 for size in range(8)] + [(1 << 64) - 1], dtype=np.uint64)


@lru_cache(maxsize=32)
def _cached_powers(count: int) -> tuple[np.ndarray, np.ndarray]:
    return _powers_of(_BASE, count), _powers_of(_BASE_INVERSE, count)


def _powers_of(base: int, count: int) -> np.ndarray:
    powers = np.full(count, base, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers, dtype=np.uint64)  # wraps modulo 2**64, as intended


def _powers(count: int) -> tuple[np.ndarray, np.ndarray]:
    # Sized to the next power of two: a batch of documents needs about 10**5, the index build
    # 10**6, and computing 2**22 up front cost every process (and every run) half a second.
    if count <= _POWERS_CACHED:
        forward, inverse = _cached_powers(max(1024, 1 << (count - 1).bit_length()))
        return forward[:count], inverse[:count]
    return _powers_of(_BASE, count), _powers_of(_BASE_INVERSE, count)


_SHIFT = np.uint64(33)
_MIXERS = (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(1))


def mix(values: np.ndarray) -> np.ndarray:
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
        hashes[more] = mix(hashes[more]) + word
    long = np.flatnonzero(sizes > _LONG_TOKEN)
    if long.size:
        hashes[long] = [
            int.from_bytes(hashlib.blake2b(data[start:end].tobytes(), digest_size=8).digest(), "little")
            for start, end in zip(starts[long].tolist(), ends[long].tolist(), strict=True)
        ]
    return mix(hashes ^ (sizes.astype(np.uint64) * GOLDEN))


@dataclass(frozen=True)
class Tokens:
    """Every token of a batch of texts, hashed, with the prefix sums its n-grams come from."""

    hashes: np.ndarray  # uint64 hash of each token
    prefix: np.ndarray  # uint64 S[t] over the token hashes, S[0] = 0
    forward: np.ndarray  # uint64 B**t
    text_of: np.ndarray  # int64 which text each token belongs to
    first_token: np.ndarray  # int64 index of each text's first token
    counts: np.ndarray  # int64 tokens per text
    data: np.ndarray  # the `normalized_bytes` they come from
    breaks: np.ndarray  # int64 where each text ends in `data`, a separator or the end

    def text(self, number: int) -> str:
        """A text, normalized: the same string as `normalize` gives."""
        start = int(self.breaks[number - 1]) + 1 if number else 0
        return " ".join(self.data[start : self.breaks[number]].tobytes().decode("utf-8").split())

    def texts(self) -> list[str]:
        """Every text, normalized, as `text` gives them: one decode for the batch."""
        pieces = self.data.tobytes().decode("utf-8").split(chr(TEXT_END))
        return [" ".join(piece.split()) for piece in pieces]


def _locate(data: np.ndarray, texts: int) -> Tokens:
    """Tokens of `normalized_bytes` output holding `texts` texts."""
    word = np.zeros(data.size + 2, dtype=np.int8)
    np.greater(data, SPACE, out=word[1:-1])
    # Word and non-word runs alternate, so the changes are start, end, start, end...
    changes = np.flatnonzero(word[1:] != word[:-1])
    starts, ends = changes[0::2], changes[1::2]
    hashes = _token_hashes(data, starts, ends)
    # Few texts, many tokens: find where each text ends among the tokens, not the reverse.
    breaks = np.append(np.flatnonzero(data == TEXT_END), data.size)
    counts = np.diff(np.searchsorted(starts, breaks), prepend=0)
    text_of = np.repeat(np.arange(texts), counts)
    forward, inverse = _powers(hashes.size + 1)
    first_token = np.cumsum(counts) - counts
    return Tokens(hashes, _prefix(hashes, inverse), forward, text_of, first_token, counts, data, breaks)


def tokens_of(texts: Sequence[str]) -> Tokens:
    return _locate(normalized_bytes(texts), len(texts))


def every_gram(tokens: Tokens, k: int) -> np.ndarray:
    """Hash of the k tokens from each position that has k - 1 after it, within a text or across."""
    end = tokens.hashes.size + 1
    if end <= k:
        return np.empty(0, dtype=np.uint64)
    return mix((tokens.prefix[k:end] - tokens.prefix[: end - k]) * tokens.forward[k - 1 : end - 1])


def spans(tokens: Tokens, first: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept positions, hashes) of the runs of k tokens from `first` that stay inside one text."""
    end = first + k
    inside = np.flatnonzero(end <= tokens.hashes.size)
    inside = inside[tokens.text_of[first[inside]] == tokens.text_of[end[inside] - 1]]
    start, end = first[inside], end[inside]
    return inside, mix((tokens.prefix[end] - tokens.prefix[start]) * tokens.forward[end - 1])


def grams(tokens: Tokens, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(first token index, hash) of every run of k tokens inside one text."""
    hashes = every_gram(tokens, k)
    first = np.flatnonzero(tokens.text_of[: hashes.size] == tokens.text_of[k - 1 :])
    return first, hashes[first]


def gram_hashes(text: str, k: int) -> np.ndarray:
    """Hash of each k-gram of a text's normalized tokens, the same integers the index holds."""
    return grams(tokens_of([text]), k)[1]
