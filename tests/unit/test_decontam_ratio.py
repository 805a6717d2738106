"""The published ratio, exactly: the fast path against a plain transcription of the definition.

The definition (Cosmopedia's decontamination): tokenize with NFD minus combining marks,
lowercase, `\\w+`; the tokenized text is the tokens joined by single spaces; a document is a
candidate for an item when they share a 10-gram (cosmoforge also matches items shorter than 10
words whole); ratio = len(" ".join("".join(blocks).split())) / len(item), where `blocks` are
the item's substrings of `SequenceMatcher(None, doc, item, autojunk=False)` blocks longer than
5 characters; the document is removed when a candidate's ratio > 0.5.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cosmoforge.postprocess import decontam, evalsets
from cosmoforge.postprocess.decontam import BenchmarkItem, build_index, check_batch, match_ratio

DATA = Path(__file__).parents[1] / "data" / "benchmarks"
NGRAM, THRESHOLD, MIN_BLOCK = 10, 0.5, 5


# --- the definition, transcribed with the standard library only -----------------------------------


def tokens(text: str) -> list[str]:
    text = unicodedata.normalize("NFD", text)
    text = "".join(c for c in text if not unicodedata.category(c).startswith("M"))
    return re.findall(r"\w+", text.lower())


def definition_ratio(doc: str, item: str) -> float:
    doc_text, item_text = " ".join(tokens(doc)), " ".join(tokens(item))
    if not item_text:
        return 0.0
    matcher = difflib.SequenceMatcher(None, doc_text, item_text, autojunk=False)
    blocks = [item_text[m.b : m.b + m.size] for m in matcher.get_matching_blocks() if m.size > MIN_BLOCK]
    return len(" ".join("".join(blocks).split())) / len(item_text)


def is_candidate(doc: str, item: str) -> bool:
    doc_tokens, item_tokens = tokens(doc), tokens(item)
    size = min(NGRAM, len(item_tokens))
    if size == 0 or len(" ".join(item_tokens)) <= MIN_BLOCK:
        return False
    grams = {tuple(doc_tokens[i : i + size]) for i in range(len(doc_tokens) - size + 1)}
    return any(tuple(item_tokens[i : i + size]) in grams for i in range(len(item_tokens) - size + 1))


# --- inputs: real benchmark items, cut, edited, padded and spaced ----------------------------------

ITEMS = [item for path in sorted(DATA.glob("*.jsonl")) for item in evalsets.load_benchmark(str(path))]
INDEX = build_index(ITEMS, decontam.Config(NGRAM, THRESHOLD, MIN_BLOCK))
FILLER = "the of and a to in is was for on that with as by it from at this be are an or which".split()
SEPARATORS = [" ", " ", " ", "  ", "\n", ", ", ". ", " - ", "\t", " \u2014 ", "'s "]


@st.composite
def fragment(draw: st.DrawFn) -> str:
    """A piece of one item's words (often about half of them), with words replaced, dropped,
    inserted, accented or recased, joined by assorted whitespace and punctuation."""
    words = draw(st.sampled_from(ITEMS)).text.split()
    length = draw(st.integers(1, len(words)))
    start = draw(st.integers(0, len(words) - length))
    out: list[str] = []
    for word in words[start : start + length]:
        roll = draw(st.integers(0, 19))
        if roll == 0:
            continue  # dropped
        if roll == 1:
            word = draw(st.sampled_from(FILLER))  # replaced
        elif roll == 2:
            out.append(draw(st.sampled_from(FILLER)))  # inserted before
        elif roll == 3:
            word = word.upper()
        elif roll == 4 and word[:1].lower() in "aeiou":
            word = unicodedata.normalize("NFD", word[0] + "\u0301") + word[1:]  # an accent to drop
        out.append(word)
    glue = [draw(st.sampled_from(SEPARATORS)) for _ in out]
    return "".join(word + sep for word, sep in zip(out, glue, strict=True))


documents = st.lists(
    st.one_of(fragment(), st.lists(st.sampled_from(FILLER), min_size=1, max_size=8).map(" ".join)),
    min_size=1,
    max_size=5,
).map(" ".join)


def assert_fast_path_is_the_definition(docs: list[str]) -> None:
    for doc, verdict in zip(docs, check_batch(docs, INDEX), strict=True):
        scored = {m.item_id: m.ratio for m in (*verdict.matches, *verdict.near_misses)}
        for item_id, ratio in scored.items():
            assert ratio == definition_ratio(doc, ITEMS[item_id].text), (doc, ITEMS[item_id].text)
        expected = {i for i, item in enumerate(ITEMS) if is_candidate(doc, item.text)}
        assert set(scored) <= expected
        assert len(expected) - len(scored) == verdict.skipped  # left unscored after a whole copy
        assert verdict.contaminated == any(
            definition_ratio(doc, ITEMS[i].text) > THRESHOLD for i in expected
        ), doc


# --- the tests ---------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(documents, min_size=1, max_size=4))
def test_every_ratio_and_verdict_equals_the_definition(docs: list[str]) -> None:
    assert_fast_path_is_the_definition(docs)


@settings(max_examples=300, deadline=None, database=None)
@given(documents, st.sampled_from(ITEMS))
@example("ab cd ef gh ij", BenchmarkItem("x", 0, "ab cd ef gh ij kl"))  # whole words meet at spaces
def test_match_ratio_equals_the_definition_on_normalized_texts(doc: str, item: BenchmarkItem) -> None:
    normalized_doc, normalized_item = decontam.normalize(doc), decontam.normalize(item.text)
    assert match_ratio(normalized_doc, normalized_item) == definition_ratio(doc, item.text)


def test_blocks_meeting_at_a_space_count_it_once() -> None:
    # Two blocks of the item: "alpha bravo " (ending in its space) and " charlie delta" (starting
    # with the other side's space: the document has "x" where the item has "bravo"'s
    # neighbour). Summing block sizes counts a space the published formula does not.
    item = "alpha bravo zulu charlie delta"
    doc = "alpha bravo q charlie delta"
    blocks = difflib.SequenceMatcher(None, doc, item, autojunk=False).get_matching_blocks()
    kept = [item[b.b : b.b + b.size] for b in blocks if b.size > MIN_BLOCK]
    assert kept == ["alpha bravo ", " charlie delta"]
    assert definition_ratio(doc, item) == (len(item) - len(" zulu")) / len(item)
    assert match_ratio(doc, item) == definition_ratio(doc, item)
    assert match_ratio(doc, item) < sum(b.size for b in blocks if b.size > MIN_BLOCK) / len(item)


def test_a_ratio_of_exactly_one_half_is_kept() -> None:
    # The blocks are "abcdef " and " lmnop": 13 characters summed, 12 once the space where they
    # meet is counted once. 12 / 24 is not over the threshold; 13 / 24 would be.
    item = BenchmarkItem("custom", 0, "abcdef ghijk lmnop qrstu")
    doc = "Abcdef, zz lmnop!"
    assert definition_ratio(doc, item.text) == 0.5
    index = build_index([item], decontam.Config(ngram=1))  # "abcdef" makes it a candidate
    (verdict,) = check_batch([doc], index)
    assert not verdict.contaminated
    assert [m.ratio for m in verdict.near_misses] == [0.5]
    assert match_ratio(decontam.normalize(doc), item.text) == 0.5
