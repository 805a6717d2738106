"""Sampled token ids to answer text: the rules both llama.cpp engines must apply alike.

A token's bytes may end mid-character, a stop string may arrive split over tokens, and an
end-of-generation token ends the answer without being part of it. `TextStream` applies those
rules one token at a time, so streaming and non-streaming answers, one-at-a-time and batched
decoding all cut the text and count the tokens the same way. Pure: the vocabulary comes in as
two functions.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

from cosmoforge.services.modelserver.engine import FinishReason


class TextStream:
    def __init__(
        self,
        piece: Callable[[int], bytes],
        is_end: Callable[[int], bool],
        stops: Sequence[str],
        budget: int,
    ):
        self.piece = piece
        self.is_end = is_end
        self.stops = [s for s in stops if s]
        self.budget = budget
        self.count = 0  # tokens that are part of the answer
        self.finish: FinishReason | None = "length" if budget <= 0 else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet released: it may be the start of a stop string

    def push(self, token: int) -> str:
        """Take one sampled token; return the text that may be released now (maybe empty)."""
        if self.finish is not None:
            return ""
        if self.is_end(token):
            self.finish = "stop"
            return self._release_all()
        self.count += 1
        self._held += self._utf8.decode(self.piece(token))
        cut = min((i for i in (self._held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.finish = "stop"
            text, self._held = self._held[:cut], ""
            return text
        if self.count >= self.budget:
            self.finish = "length"
            return self._release_all()
        keep = self._longest_stop_prefix_suffix()
        text, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return text

    def _release_all(self) -> str:
        text = self._held + self._utf8.decode(b"", final=True)
        self._held = ""
        return text

    def _longest_stop_prefix_suffix(self) -> int:
        """How many trailing characters could still grow into a stop string."""
        held = self._held
        for size in range(min(len(held), max((len(s) for s in self.stops), default=0)), 0, -1):
            tail = held[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0
