"""Normalization: NFD, no combining marks, lowercase, `\\w+` tokens joined by single spaces.

`normalize` is the recipe's definition; `normalized_bytes` gives the same tokens for a whole
batch of documents at once, as the UTF-8 bytes the hashing reads.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

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


SPACE = 32
TEXT_END = 10  # between texts in a batch; never inside a normalized one
_DROP = -1  # the character vanishes (a mark)
_SLOW = -2  # the table cannot say: normalize the document by the definition
_ASTRAL = 0x10000  # table slot standing for every code point above the BMP


@lru_cache(maxsize=4096)
def _char_code(code: int) -> int:
    """What one code point becomes: a code point, SPACE, _DROP or _SLOW."""
    if 0xD800 <= code <= 0xDFFF:
        return SPACE  # a lone surrogate is no word character
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
    return ord(lowered) if lowered.isalnum() or lowered == "_" else SPACE


_tables: list[np.ndarray] = []  # the table, once built or loaded


def build_char_table() -> np.ndarray:
    table = np.array([_char_code(code) for code in range(_ASTRAL)] + [_SLOW], dtype=np.int32)
    table[0] = TEXT_END  # the batch joins texts with NUL, which a text's own NULs never are
    return table


def char_table() -> np.ndarray:
    # Built once per process (about 0.2 s), or loaded with a cached index (`use_char_table`);
    # forked workers inherit it with the index.
    if not _tables:
        _tables.append(build_char_table())
    return _tables[0]


def use_char_table(table: np.ndarray) -> None:
    """Take `table`, a saved `build_char_table()` of this Unicode version, instead of building it."""
    if table.shape != (_ASTRAL + 1,) or table.dtype != np.int32:
        raise ValueError(
            f"a character table has {_ASTRAL + 1} int32 entries, not {table.shape} {table.dtype}"
        )
    _tables[:] = [table]


# Bytes in, not code points: the batch's normalized text is handed on as UTF-8, which for the
# usual Latin text (accents and punctuation gone) is one byte per character, and every byte of a
# word character is above the space.
def _ascii_byte(code: int) -> int:
    char = chr(code)
    if code == 0:
        return TEXT_END  # the batch joins texts with NUL, which a text's own NULs never are
    return ord(char.lower()) if char.isascii() and (char.isalnum() or char == "_") else SPACE


# ASCII bytes as the recipe maps them; the bytes of longer UTF-8 sequences stay for the table.
_UTF8_BYTES = bytes(_ascii_byte(code) if code < 0x80 else code for code in range(256))


def normalized_bytes(texts: Sequence[str]) -> np.ndarray:
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
            numbers = set(np.searchsorted(np.flatnonzero(data == TEXT_END), stuck).tolist())
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
    mapped = char_table()[np.minimum(code, _ASTRAL)].astype(np.int64)
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
    table = char_table()
    mapped = table[np.minimum(codes, _ASTRAL)]
    astral = np.flatnonzero(codes >= _ASTRAL)
    mapped[astral] = [_char_code(int(code)) for code in codes[astral]]
    lowest = mapped.min()
    if lowest <= _SLOW:
        ends = np.flatnonzero(codes == 0)
        pieces = np.split(mapped, ends)  # every piece but the first starts with its separator
        for number in set(np.searchsorted(ends, np.flatnonzero(mapped == _SLOW)).tolist()):
            again = np.frombuffer(normalize(texts[number]).encode("utf-32-le"), dtype=np.uint32)
            pieces[number] = np.concatenate(([TEXT_END] if number else [], again)).astype(np.int32)
        mapped = np.concatenate(pieces)
    # Precomposed letters map straight to their base letter; marks standing alone are rare.
    return mapped[mapped != _DROP] if lowest <= _DROP else mapped
