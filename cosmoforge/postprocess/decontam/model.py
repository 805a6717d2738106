"""The recipe's settings and what checking a document produces, as plain data.

Every other module of the package reads these; none of them does any work, so the settings can
be validated (`DecontamError`) and the results passed between processes without importing the
numpy machinery behind them.
"""

from __future__ import annotations

from dataclasses import dataclass

NGRAM = 10
THRESHOLD = 0.5
MIN_BLOCK_CHARS = 5
MAX_NGRAM = 256


class DecontamError(ValueError):
    """A problem with the user's input or settings; the CLI prints it as one line."""


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
