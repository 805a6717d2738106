"""MinHash signatures in datatrove 0.9's on-disk format, computed in batches with numpy.

datatrove's `MinhashDedupSignature` spends nearly all its time in spaCy word tokenization and
in one Python hash call per shingle. This module keeps what the later steps depend on (the
permutation parameters, the permutation arithmetic, the record layout and sort order of the
signature files) and replaces the rest:

* text simplification: the same words as datatrove's `simplify_text` under the config's
  `TextNormConfig` gives (lowercase, numbers to 0, punctuation to spaces, diacritics dropped),
  computed on bytes for ASCII text and with C-speed diacritics removal for the rest;
* words: the simplified text split on whitespace instead of spaCy; once punctuation is gone the
  two disagree only on spaCy's special cases ("cannot" -> "can", "not"; "0km" -> "0", "km"),
  which change both copies of a near-duplicate alike;
* shingle hashes: each distinct word is hashed once with xxh64 of its UTF-8 bytes (a cache
  shared across documents), and the `n_grams` word hashes of a shingle are combined with
  numpy over a whole batch (a polynomial in the word hashes, then the splitmix64 finalizer so
  that shingles sharing words do not get related values);
* permutations: datatrove's `(a * h + b) % (2**61 - 1)` with the same `a`, `b` (drawn from
  `np.random.RandomState(seed)` as datatrove draws them), including its uint64 wrap-around of
  `a * h + b`, evaluated for many documents at once and reduced per document with
  `np.minimum.reduceat`.

So a signature here equals what datatrove's `get_signature` returns for the shingle hashes
above; only the shingle hashes differ from datatrove's (whose values nothing downstream
compares with anything but other signatures of the same run).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from datatrove.pipeline.base import PipelineStep

MERSENNE_61 = (1 << 61) - 1
_P = np.uint64(MERSENNE_61)
_TOP = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_SHIFT61 = np.uint64(61)

# Odd multiplier of the shingle polynomial, and splitmix64's finalizer constants.
_POLY = np.uint64(0x9E37_79B9_7F4A_7C15)
_MIX1 = np.uint64(0xBF58_476D_1CE4_E5B9)
_MIX2 = np.uint64(0x94D0_49BB_1331_11EB)

# Documents per batch of tokenization and shingle hashing, and shingle rows per permutation
# block: blocks bound the two permutation buffers (0.9 MB each at 112 hashes) whatever a
# document's length, and keep them near the cache instead of streaming through memory.
_BATCH_DOCS = 256
_BLOCK_ROWS = 1024
# The word-hash cache is dropped beyond this many words; hashes depend only on the word, so
# dropping it changes speed, never a result.
_CACHE_WORDS = 1 << 21


def permutation_parameters(config: Any) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each uint64 of length num_buckets * hashes_per_bucket, as datatrove draws them."""
    count = config.num_buckets * config.hashes_per_bucket
    generator = np.random.RandomState(config.seed)
    a = generator.randint(1, _P, dtype=np.uint64, size=(1, count))
    b = generator.randint(0, _P, dtype=np.uint64, size=(1, count))
    return a.reshape(-1), b.reshape(-1)


# --- text ------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _nonspacing_marks() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """Code points of category Mn in this Python's Unicode database: (BMP class, astral class).

    datatrove tests `unicodedata.category(c) != "Mn"` character by character after NFD; the
    same set as compiled classes removes them in C. The two are kept apart because `re` matches
    a class of BMP ranges through a lookup table, but one that reaches past U+FFFF by scanning
    its ranges, which is many times slower; astral marks are rare, so that class only runs on
    the texts that have astral characters at all.
    """
    ranges: list[tuple[int, int]] = []
    for code in range(0x110000):
        if unicodedata.category(chr(code)) == "Mn":
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))

    def pattern(part: list[tuple[int, int]]) -> re.Pattern[str]:
        return re.compile("[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in part) + "]+")

    return pattern([r for r in ranges if r[1] <= 0xFFFF]), pattern([r for r in ranges if r[0] > 0xFFFF])


def _strip_marks(text: str) -> str:
    bmp, astral = _nonspacing_marks()
    text = bmp.sub("", unicodedata.normalize("NFD", text))
    return astral.sub("", text) if max(text, default=" ") > "\uffff" else text


Words = list[str] | list[bytes]

# datatrove's number pattern restricted to ASCII: its digits (\\p{Nd}) and decimal separators
# outside ASCII cannot occur in ASCII text.
_ASCII_NUMBERS = re.compile(rb"[0-9]+(?:[.,][0-9]+)?")


def _splitter(norm_config: Any) -> Callable[[str], Words]:
    """A function text -> words, the same words as `simplify_text(text, norm_config).split()`.

    Whitespace normalization only changes how words are separated, so the split makes it
    unnecessary. ASCII text (most of it; `str.isascii` is free) is simplified as bytes, where
    lowercasing, the number pattern and the punctuation table (datatrove's, restricted to ASCII)
    run several times faster than on `str`, and has no diacritics. Other text goes through
    datatrove's `simplify_text` for everything but the diacritics, whose per-character loop is
    replaced by NFD and one regular expression over the nonspacing marks.
    """
    # TextNormConfig is a mutable dataclass, so it cannot key a cache itself.
    return _cached_splitter(tuple(sorted(asdict(norm_config).items())))


@lru_cache(maxsize=8)
def _cached_splitter(flags: tuple[tuple[str, bool], ...]) -> Callable[[str], Words]:
    from datatrove.utils.text import PUNCTUATION_TRANS, TextNormConfig, simplify_text

    settings = dict(flags)
    marks = settings.pop("norm_unicode_diacritics")
    settings.pop("norm_whitespace")
    rest = TextNormConfig(**settings, norm_unicode_diacritics=False, norm_whitespace=False)
    lowercase, numbers, punctuation = rest.lowercase, rest.norm_numbers, rest.remove_punctuation
    # Weekday and month names are English words matched after lowercasing; rare options, so
    # they simply take the general path.
    ascii_path = not (rest.norm_weekdays or rest.norm_monthnames)
    ascii_punctuation = bytes(c for c in range(128) if PUNCTUATION_TRANS.get(c) == ord(" "))
    spaces = bytes.maketrans(ascii_punctuation, b" " * len(ascii_punctuation))

    def split(text: str) -> Words:
        if ascii_path and text.isascii():
            data = text.encode("ascii")
            if lowercase:
                data = data.lower()
            if numbers:
                data = _ASCII_NUMBERS.sub(b"0", data)
            if punctuation:
                data = data.translate(spaces)
            return data.split()
        text = simplify_text(text, rest)
        if marks and not text.isascii():
            text = _strip_marks(text)
        return text.split()

    return split


class _WordHashes(dict[str | bytes, int]):
    """xxh64 of a word's UTF-8 bytes, computed once per distinct word (as str or as bytes)."""

    def __missing__(self, word: str | bytes) -> int:
        data = word.encode("utf-8", errors="surrogatepass") if isinstance(word, str) else word
        value = xxhash.xxh64_intdigest(data)
        self[word] = value
        return value


def words_of(text: str, config: Any) -> list[str]:
    """The words a document's shingles are made of: its simplified text split on whitespace."""
    return [w.decode("ascii") if isinstance(w, bytes) else w for w in _splitter(config.norm_config)(text)]


# --- hashing ---------------------------------------------------------------------------------


def shingle_hashes(word_hashes: np.ndarray, ngram: int) -> np.ndarray:
    """uint64 hash of every window of `ngram` consecutive word hashes (none if fewer words).

    The polynomial w0 * K^(n-1) + w1 * K^(n-2) + ... + w(n-1) (mod 2^64) depends on word order;
    splitmix64's finalizer then spreads it so that related polynomials give unrelated hashes.
    """
    windows = word_hashes.size - ngram + 1
    if windows <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = word_hashes[:windows].copy()
    for offset in range(1, ngram):
        acc *= _POLY
        acc += word_hashes[offset : offset + windows]
    acc ^= acc >> np.uint64(30)
    acc *= _MIX1
    acc ^= acc >> np.uint64(27)
    acc *= _MIX2
    acc ^= acc >> np.uint64(31)
    return acc


class SignatureComputer:
    """Signatures for batches of documents under one MinhashConfig."""

    def __init__(self, config: Any) -> None:
        precision = config.hash_config.precision
        if precision not in (32, 64):
            raise ValueError(f"hash precision must be 32 or 64, got {precision}")
        self.config = config
        self.ngram = int(config.n_grams)
        self.hashes = config.num_buckets * config.hashes_per_bucket
        self.precision = precision
        a, b = permutation_parameters(config)
        self._a, self._b = a[None, :], b[None, :]
        self._words = _WordHashes()
        self._split = _splitter(config.norm_config)
        self._product = np.empty((_BLOCK_ROWS, self.hashes), dtype=np.uint64)
        self._high = np.empty((_BLOCK_ROWS, self.hashes), dtype=np.uint64)

    def shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shingle hashes of all documents back to back, shingle count per document)."""
        if len(self._words) > _CACHE_WORDS:
            self._words.clear()
        tokens: list[str | bytes] = []
        counts = np.empty(len(texts), dtype=np.int64)
        for row, text in enumerate(texts):
            words = self._split(text)
            counts[row] = len(words)
            tokens += words
        word_hashes = np.fromiter(map(self._words.__getitem__, tokens), dtype=np.uint64, count=len(tokens))
        # Windows over the whole batch at once; those that straddle two documents are dropped.
        hashes = shingle_hashes(word_hashes, self.ngram)
        per_doc = np.maximum(counts - self.ngram + 1, 0)
        if hashes.size:
            starts = np.cumsum(counts) - counts
            doc = np.repeat(np.arange(len(texts)), counts)[: hashes.size]
            position = np.arange(hashes.size) - starts[doc]
            hashes = hashes[position < per_doc[doc]]
        if self.precision == 32:
            # datatrove's 32-bit shingle hashes (xxh32) are below 2^32; keep the same domain.
            hashes &= np.uint64(0xFFFF_FFFF)
        return hashes, per_doc

    def signatures(self, shingles: np.ndarray, per_doc: np.ndarray) -> np.ndarray:
        """(documents with at least one shingle) x hashes array of minima, in the file's dtype.

        datatrove computes min((a*h + b) mod 2^64 mod p) over a document's shingles. With
        x = a*h + b (mod 2^64), y = (x & p) + (x >> 61) lies in [0, p + 7] and is congruent to x
        mod p; w = y - p (mod 2^64) then orders exactly as x mod p does (the few y >= p give the
        smallest w, equal to their residue, and every other w is its residue + 2^64 - p), so the
        minimum of w gives the minimum residue with no division. At 32-bit precision datatrove
        masks each residue before the minimum, so there every residue is reduced exactly.
        """
        owners = np.flatnonzero(per_doc > 0)
        sizes = per_doc[owners]
        starts = np.cumsum(sizes) - sizes
        best = np.full((owners.size, self.hashes), _TOP, dtype=np.uint64)
        owner_of_row = np.repeat(np.arange(owners.size), sizes)
        for first in range(0, shingles.size, _BLOCK_ROWS):
            last = min(first + _BLOCK_ROWS, shingles.size)
            rows = last - first
            x = self._product[:rows]
            high = self._high[:rows]
            np.multiply(shingles[first:last, None], self._a, out=x)
            x += self._b
            np.right_shift(x, _SHIFT61, out=high)
            x &= _P
            x += high
            if self.precision == 32:
                # The exact residue (y - p where y >= p) of every element, for datatrove's mask.
                np.greater_equal(x, _P, out=high, casting="unsafe")
                high *= _P
                x -= high
                x &= np.uint64(0xFFFF_FFFF)
            else:
                x -= _P
            # One piece per document present in this block, the first one possibly begun in the last.
            inner = starts[(starts > first) & (starts < last)]
            cuts = np.concatenate(([first], inner)) - first
            pieces = owner_of_row[cuts + first]
            minima = np.minimum.reduceat(x, cuts, axis=0)
            best[pieces] = np.minimum(best[pieces], minima)
        if self.precision == 32:
            return best.astype(np.uint32)
        return np.where(best < _TOP - _P + np.uint64(1), best, best + _P)

    def compute(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(indices within `texts` of the documents with a signature, their signatures)."""
        shingles, per_doc = self.shingles(texts)
        return np.flatnonzero(per_doc > 0), self.signatures(shingles, per_doc)


# --- files -----------------------------------------------------------------------------------


def record_dtype(config: Any) -> np.dtype[Any]:
    """One signature record: hashes_per_bucket little-endian hashes, then the uint32 doc id."""
    hash_type = "<u4" if config.hash_config.precision == 32 else "<u8"
    fields = [(f"h{i}", hash_type) for i in range(config.hashes_per_bucket)]
    return np.dtype([*fields, ("doc", "<u4")])


def signature_path(output_folder: str | os.PathLike[str], bucket: int, rank: int) -> Path:
    return Path(output_folder) / f"bucket_{bucket:03d}" / f"{rank:05d}.minhash.sig"


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == _BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def write_signatures(
    texts: Iterable[str], output_folder: str | os.PathLike[str], config: Any = None, rank: int = 0
) -> int:
    """Write one rank's signature files, as datatrove's `MinhashDedupSignature.run` does.

    Drop-in for `MinhashDedupSignature(output_folder=..., config=..., language=...).run(documents,
    rank=rank, world_size=...)` on a local folder, given the documents' texts in rank order:

    * `config` is a datatrove `MinhashConfig` (its default when None); n_grams, num_buckets,
      hashes_per_bucket, seed, norm_config and hash_config.precision are honoured (the shingle
      hash is always this module's, whatever hash_config.hash_fc says);
    * the document id written for a text is its 0-based position in `texts`, counting texts
      without a signature, exactly as datatrove numbers the documents of a rank (which is what
      `MinhashDedupFilter` matches against when it enumerates the same rank's documents);
    * a text with fewer than n_grams words after simplification gets no record;
    * it writes `output_folder/bucket_XXX/RRRRR.minhash.sig` for every bucket (empty files when
      no text has a signature), replacing existing ones: records of hashes_per_bucket
      little-endian uint64 (uint32 at 32-bit precision) followed by the little-endian uint32
      doc id, sorted by hashes then doc id, the layout `MinhashDedupBuckets` reads;
    * the text is not tokenized with spaCy: see the module's docstring for what differs.

    Returns the number of texts read (datatrove's document count for the rank).
    """
    if config is None:
        from datatrove.pipeline.dedup.minhash import MinhashConfig

        config = MinhashConfig()
    computer = SignatureComputer(config)
    dtype = record_dtype(config)
    per_bucket = config.hashes_per_bucket
    paths = [signature_path(output_folder, bucket, rank) for bucket in range(config.num_buckets)]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    seen = 0
    handles = [open(path, "wb") for path in paths]  # noqa: SIM115 - closed together below
    try:
        for batch in _batches(texts):
            if seen + len(batch) > 1 << 32:
                raise ValueError(
                    "datatrove's uint32 doc ids cannot number more than 2^32 documents in one rank"
                )
            rows, signatures = computer.compute(batch)
            ids = (rows + seen).astype(np.uint32)
            seen += len(batch)
            if not rows.size:
                continue
            records = np.empty(rows.size, dtype=dtype)
            records["doc"] = ids
            for bucket, handle in enumerate(handles):
                columns = signatures[:, bucket * per_bucket : (bucket + 1) * per_bucket]
                for i in range(per_bucket):
                    records[f"h{i}"] = columns[:, i]
                handle.write(records.tobytes())
    finally:
        for handle in handles:
            handle.close()
    for path in paths:
        _sort_records(path, dtype)
    return seen


def _sort_records(path: Path, dtype: np.dtype[Any]) -> None:
    """Sort a bucket file's records by their hashes, then doc id, as the bucket step requires."""
    records = np.fromfile(path, dtype=dtype)
    if records.size < 2:
        return
    # lexsort's last key is the primary one.
    keys = [records[name] for name in reversed(dtype.names or ())]
    records[np.lexsort(keys)].tofile(path)


class MinhashSignatureStep(PipelineStep):
    """datatrove pipeline step in place of `MinhashDedupSignature`: a local folder or any fsspec URI."""

    type = "🫂 - DEDUP"
    name = "🎯 MinHash stage 1 (numpy)"

    def __init__(self, output_folder: str | os.PathLike[str], config: Any = None) -> None:
        super().__init__()
        self.output_folder = output_folder
        self.config = config

    def run(self, data: Iterable[Any], rank: int = 0, world_size: int = 1) -> None:
        texts = (doc.text for doc in data)
        with self.track_time():
            folder = str(self.output_folder)
            if "://" not in folder or folder.startswith("file://"):
                count = write_signatures(texts, folder.removeprefix("file://"), self.config, rank)
            else:
                count = _write_remote(texts, folder, self.config, rank)
        self.stat_update("total", value=count)


def _write_remote(texts: Iterable[str], folder: str, config: Any, rank: int) -> int:
    """Sorting a bucket file needs a local file: write here, then upload each one whole."""
    import tempfile

    from fsspec.core import url_to_fs

    fs, root = url_to_fs(folder)
    with tempfile.TemporaryDirectory(prefix="cosmoforge-signatures-") as local:
        count = write_signatures(texts, local, config, rank)
        for path in sorted(Path(local).glob("bucket_*/*.minhash.sig")):
            fs.put_file(str(path), f"{root.rstrip('/')}/{path.parent.name}/{path.name}")
    return count
