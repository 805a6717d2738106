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
   normalized texts; blocks = the item's matching blocks longer than `min_block_chars` (5)
   characters; ratio = len(" ".join("".join(blocks).split())) / len(item), the published
   formula (blocks meeting at a space count it once). The document is contaminated when
   ratio > threshold (0.5). Candidates at or under the threshold are near-misses, kept for audit.
   Two shortcuts, for documents removed anyway: once a document holds a whole item of a
   benchmark (ratio exactly 1), the other candidates of that benchmark are tested for whole
   copies only, not scored; and a candidate whose upper bound is below the best ratio over the
   threshold found in its benchmark is not scored. Neither can change the verdict or the best
   match per benchmark, which is what the report counts; a kept document has every candidate
   scored.

Where the published scripts go wrong, this package does not: it checks every item sharing an
n-gram with the document (not only the first hit), keeps every item per n-gram (a dict keyed
by n-gram keeps only the last one), matches items shorter than n words, and gives the same
answer for any worker count or `PYTHONHASHSEED` (hashes are computed from bytes, never with
`hash()`).

The package is split by layer, each module saying how it is fast without changing the answer:
`normalization` (batches normalized as UTF-8 bytes), `hashing` (token and n-gram hashes from
prefix sums), `index` (sorted n-gram hashes behind a blocked Bloom filter), `candidates`
(lookups), `verify` (SequenceMatcher on provably equivalent shorter texts), `checker` (batches
on every core, in forked processes that inherit the index), `report`, `cache` (the index kept on
disk per benchmark set) and `dataset` (the stage over files, streamed). This module is the
facade that callers import; `cache` and `dataset` are imported by name.
"""

from __future__ import annotations

from cosmoforge.postprocess.decontam.checker import (
    BATCH_CHARS,
    BATCH_SIZE,
    QUEUED,
    Checker,
    check_all,
    default_workers,
)
from cosmoforge.postprocess.decontam.hashing import gram_hashes
from cosmoforge.postprocess.decontam.index import ANCHOR_TOKENS, Index, build_index
from cosmoforge.postprocess.decontam.model import (
    MAX_NGRAM,
    MIN_BLOCK_CHARS,
    NGRAM,
    THRESHOLD,
    BenchmarkItem,
    Config,
    DecontamError,
    Match,
    Verdict,
)
from cosmoforge.postprocess.decontam.normalization import normalize, tokenize
from cosmoforge.postprocess.decontam.report import (
    NEAR_MISS_LIMIT,
    NO_GROUP,
    Report,
    Tally,
    build_report,
    report_markdown,
)
from cosmoforge.postprocess.decontam.verify import SequenceMatcher, check, check_batch, match_ratio

__all__ = [
    "ANCHOR_TOKENS",
    "BATCH_CHARS",
    "BATCH_SIZE",
    "MAX_NGRAM",
    "MIN_BLOCK_CHARS",
    "NEAR_MISS_LIMIT",
    "NGRAM",
    "NO_GROUP",
    "QUEUED",
    "THRESHOLD",
    "BenchmarkItem",
    "Checker",
    "Config",
    "DecontamError",
    "Index",
    "Match",
    "Report",
    "SequenceMatcher",
    "Tally",
    "Verdict",
    "build_index",
    "build_report",
    "check",
    "check_all",
    "check_batch",
    "default_workers",
    "gram_hashes",
    "match_ratio",
    "normalize",
    "report_markdown",
    "tokenize",
]
