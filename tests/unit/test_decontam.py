"""Benchmark decontamination: the recipe's numbers, the reference scripts' bugs, the loaders, the CLI."""

from __future__ import annotations

import difflib
import json
import os
import random
import re
import signal
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosmoforge.cli.main import main as cosmo
from cosmoforge.postprocess import decontam, evalsets
from cosmoforge.postprocess.decontam import (
    BenchmarkItem,
    build_index,
    cache,
    check,
    check_all,
    hashing,
    match_ratio,
    normalization,
    normalize,
)

DATA = Path(__file__).parents[1] / "data" / "benchmarks"


@pytest.fixture(autouse=True)
def index_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands keep benchmark indexes in a cache folder: this session's, not the user's."""
    monkeypatch.setenv(cache.ENV, str(tmp_path_factory.getbasetemp() / "index-cache"))


FILLER = (
    "Gardeners in temperate climates often start seedlings indoors during late winter, moving them "
    "outside once the soil warms and the risk of frost has passed. "
)


def recipe_ratio(doc: str, item: str, min_block: int = 5) -> float:
    """The published formula, spelled out with the standard library only: the item's blocks
    longer than `min_block`, joined, whitespace collapsed, over the item's length."""
    doc, item = normalize(doc), normalize(item)
    return published_ratio(doc, item, min_block)


def published_ratio(doc: str, item: str, min_block: int) -> float:
    blocks = difflib.SequenceMatcher(None, doc, item, autojunk=False).get_matching_blocks()
    joined = "".join(item[b.b : b.b + b.size] for b in blocks if b.size > min_block)
    return len(" ".join(joined.split())) / len(item) if item else 0.0


# --- normalization and the ratio --------------------------------------------------------------


def _plain_normalize(text: str) -> str:
    text = unicodedata.normalize("NFD", text)
    text = "".join(c for c in text if not unicodedata.category(c).startswith("M"))
    return " ".join(re.findall(r"\w+", text.lower()))


def test_normalize_is_nfd_without_marks_lowercase_word_tokens() -> None:
    assert (
        normalize("Café RÉSUMÉ, naïve—São Paulo\u2019s İstanbul_2!")
        == "cafe resume naive sao paulo s istanbul_2"
    )
    assert normalize("") == "" and normalize("  ... !!") == ""
    alphabet = [
        chr(c) for c in [*range(32, 127), 0xE9, 0xC5, 0x130, 0x2014, 0x3B1, 0x416, 0x4E2D, 0x301, 0xA0, 0xDF]
    ]
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert normalize(text) == _plain_normalize(text), repr(text)


def test_batches_are_normalized_to_the_same_tokens_as_the_definition() -> None:
    # The per-character table must agree with the recipe on what it can do (accents, marks,
    # ligature-free scripts, astral symbols, NUL) and hand over what it cannot (Hangul
    # syllables that decompose to several letters, capital sigma whose case depends on context).
    rng = random.Random(11)
    alphabet = [
        *"abcXYZ09 _-.,\n\t\0",
        *"éÉßİΣσΩαÅñıſµǅǰΐὒᾈẞ\u2019\u2013…①²½٣ー한국\u0301\u0345\u200d",
        *(chr(rng.randrange(0x80, 0x3000)) for _ in range(200)),
        *(chr(rng.randrange(0x10000, 0x20000)) for _ in range(20)),
        "\U0001f600",  # an emoji
        "\U0001d400",  # mathematical bold capital A
        "\u023a",  # lowercases to a letter one UTF-8 byte longer
        "\ud800",  # a lone surrogate
    ]
    # Mostly ASCII text with characters the table can fold in place, as generated text is, and
    # then every kind of character at once.
    foldable = [
        c for c in alphabet if normalization._char_code(ord(c)) != normalization._SLOW and c != "\u023a"
    ]
    folded = 0
    for number in range(3000):
        pool = foldable if number % 2 else alphabet
        texts = [
            "".join(
                rng.choice(pool) if rng.random() < 0.2 else rng.choice("ab ")
                for _ in range(rng.randint(0, 40))
            )
            for _ in range(rng.randint(1, 5))
        ]
        tokens = hashing.tokens_of(texts)
        expected = [normalize(text).split() for text in texts]
        assert tokens.counts.tolist() == [len(words) for words in expected], repr(texts)
        batch = normalization.normalized_bytes(texts).tobytes().decode("utf-8").split("\n")
        assert [part.split() for part in batch] == expected, repr(texts)
        assert tokens.texts() == [normalize(text) for text in texts], repr(texts)  # what the index keeps
        joined = "\0".join(texts).encode("utf-8", "surrogatepass").translate(normalization._UTF8_BYTES)
        if not "".join(texts).isascii():
            folded += normalization._fold_non_ascii(np.frombuffer(joined, dtype=np.uint8).copy())[1].size == 0
    assert folded > 500


def test_gram_hashes_do_not_depend_on_spacing_or_batch_neighbours() -> None:
    text = "The Quick,  brown fox — jumps over the lazy dog again and again"
    alone = decontam.gram_hashes(text, 3)
    assert np.array_equal(alone, decontam.gram_hashes(normalize(text), 3))
    tokens = hashing.tokens_of(["other words first", text, "and after"])
    first, hashes = hashing.grams(tokens, 3)
    mine = tokens.text_of[first] == 1
    assert np.array_equal(hashes[mine], alone)
    assert np.unique(alone).size == alone.size  # "again and again" differs from "and again"


def test_match_ratio_equals_sequencematcher_on_the_whole_texts() -> None:
    rng = random.Random(3)
    for _ in range(1500):
        doc = "".join(rng.choice("ab cd") for _ in range(rng.randint(0, 200)))
        item = "".join(rng.choice("ab cd") for _ in range(rng.randint(0, 50)))
        minimum = rng.choice([0, 2, 5])
        assert match_ratio(doc, item, minimum) == published_ratio(doc, item, minimum), (doc, item)


def test_a_whole_copy_scores_one_and_a_short_item_can_never_match() -> None:
    assert match_ratio("x the item text y", "the item text") == 1.0
    assert match_ratio("abc", "abc") == 0.0  # no block is longer than 5 characters


# --- the recipe -----------------------------------------------------------------------------

ITEMS = [
    BenchmarkItem(
        "arc_easy", 0, "Which form of energy does a solar panel turn sunlight into? electrical energy"
    ),
    BenchmarkItem(
        "boolq",
        0,
        "Penguins are flightless seabirds of the southern hemisphere whose wings have become stiff "
        "flippers that propel them swiftly through the water. can penguins fly yes",
    ),
    BenchmarkItem("mmlu", 0, "What is the chemical symbol for sodium? Na"),  # 7 words: shorter than 10
]


@pytest.fixture(scope="module")
def index() -> decontam.Index:
    return build_index(ITEMS)


def test_exact_copy_is_removed_with_its_evidence(index: decontam.Index) -> None:
    verdict = check(FILLER + ITEMS[1].text.upper() + " " + FILLER, index)
    assert verdict.contaminated
    best = verdict.best
    assert best is not None and (best.benchmark, best.item_index, best.ratio) == ("boolq", 0, 1.0)
    assert best.ngram == "penguins are flightless seabirds of the southern hemisphere whose wings"
    assert best.shared_ngrams == len(normalize(ITEMS[1].text).split()) - 9


def test_paraphrase_over_and_partial_copy_under_the_threshold(index: decontam.Index) -> None:
    words = ITEMS[1].text.split()
    paraphrase = " ".join("swim" if i in (12, 20) else w for i, w in enumerate(words))
    partial = " ".join(words[:11])  # a third of the item
    over, under = check(FILLER + paraphrase, index), check(FILLER + partial, index)
    assert over.contaminated and over.best is not None
    assert over.best.ratio == pytest.approx(recipe_ratio(FILLER + paraphrase, ITEMS[1].text))
    assert 0.5 < over.best.ratio < 1.0
    assert not under.contaminated and len(under.near_misses) == 1
    assert under.near_misses[0].ratio == pytest.approx(recipe_ratio(FILLER + partial, ITEMS[1].text))
    assert under.near_misses[0].ratio <= 0.5


def test_items_shorter_than_n_words_are_matched_whole(index: decontam.Index) -> None:
    assert index.lengths == (8, 10)  # the mmlu item has 8 words, the others more than 10
    verdict = check("Quiz time. What is the chemical symbol for sodium? Na, of course.", index)
    assert verdict.contaminated and verdict.best is not None and verdict.best.benchmark == "mmlu"
    assert not check("What is the chemical symbol for sodium? Ask a chemist.", index).contaminated
    assert check("", index) == decontam.Verdict(contaminated=False)


def test_every_item_sharing_an_ngram_is_checked_not_only_the_first_hit() -> None:
    stem = "For which of these two scenarios does the main character do something clearly wrong"
    endings = [
        "Returning a lost leather wallet to its grateful owner at the downtown bus depot, or keeping "
        "the change a busy cashier handed over by mistake on a rainy Tuesday evening.",
        "Borrowing a sister's new hatchback for a long weekend road trip without asking, or feeding a "
        "hungry stray kitten that wandered into the backyard during a thunderstorm.",
        "Copying a classmate's chemistry homework answers during lunch and handing them in, or helping "
        "an elderly neighbor carry heavy grocery bags up three flights of stairs.",
        "Lying to a landlord about who broke the kitchen window at a noisy summer party, or paying the "
        "monthly rent two weeks early because a bonus arrived sooner than expected.",
    ]
    items = [BenchmarkItem("mmlu", i, f"{stem}? {ending}") for i, ending in enumerate(endings)]
    index = build_index(items)
    # Every item keeps its n-grams: the shared stem n-grams point at all four items.
    first_gram = decontam.gram_hashes(stem, 10)[0]
    assert sorted(index.owners_of(int(first_gram))) == [0, 1, 2, 3]
    # A fragment of item 3 comes first; further on the document copies item 1 with one word
    # changed, so no item is there whole and every candidate is checked.
    copy = items[1].text.replace("weekend", "holiday")
    doc = f"{stem}? Lying to a landlord is one example. Here is the full question: {copy}"
    verdict = check(doc, index)
    assert verdict.contaminated and [m.item_index for m in verdict.matches] == [1]
    assert verdict.matches[0].ratio == pytest.approx(recipe_ratio(doc, items[1].text))
    # The siblings are scored, or left unscored when their upper bound is below item 1's ratio:
    # none of them could beat it.
    assert len(verdict.near_misses) + verdict.skipped == 3
    assert all(recipe_ratio(doc, items[i].text) < verdict.matches[0].ratio for i in (0, 2, 3))
    # A document that is kept has every candidate scored exactly: its near-misses are reported.
    kept = check(f"{stem}? Lying to a landlord is one example.", index)
    assert not kept.contaminated and kept.skipped == 0
    assert sorted(m.item_index for m in kept.near_misses) == [0, 1, 2, 3]
    # With item 1 there whole, it is the best match there can be: the siblings are not scored.
    whole = check(f"{stem}? Lying to a landlord is one example. {items[1].text}", index)
    assert [m.item_index for m in whole.matches] == [1] and whole.skipped == 3 and not whole.near_misses


def test_a_killed_checking_process_loses_no_document(index: decontam.Index) -> None:
    docs = [FILLER * (i % 5) + (ITEMS[i % 3].text if i % 4 == 0 else "plain text") for i in range(400)]
    expected = [v.matches for v in check_all(docs, index, workers=1)]
    with decontam.Checker(index, workers=2, batch_size=2) as checker:
        (victim,) = checker.processes()

        def documents() -> Iterator[str]:
            for number, doc in enumerate(docs):
                if number == 30:  # 15 batches handed over: the process may be holding one
                    os.kill(victim, signal.SIGKILL)
                yield doc

        verdicts = list(checker.check_all(documents()))
        assert [v.matches for v in verdicts] == expected
        assert checker.processes() == []  # the rest, and the next corpus, are checked here
        assert [v.matches for v in checker.check_all(docs)] == expected


def test_same_verdicts_for_any_worker_count_and_hash_seed(index: decontam.Index) -> None:
    docs = [FILLER * (i % 3) + (ITEMS[i % 3].text if i % 4 == 0 else "plain text") for i in range(150)]
    one = list(check_all(docs, index, workers=1, batch_size=7))
    two = list(check_all(docs, index, workers=2, batch_size=7))
    three = list(check_all(docs, index, workers=3, batch_size=7))
    assert one == two == three and sum(v.contaminated for v in one) == 38
    script = (
        "from cosmoforge.postprocess.decontam import gram_hashes as g; "
        "print(g('a b c d e f g h i j k l', 10).tolist())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_a_ten_megabyte_document_is_checked(index: decontam.Index) -> None:
    big = FILLER * (10_000_000 // len(FILLER))
    verdict = check(big[: len(big) // 2] + ITEMS[0].text + big[len(big) // 2 :], index)
    assert verdict.contaminated and verdict.best is not None and verdict.best.benchmark == "arc_easy"


def test_report_counts_removed_documents_and_unique_items_per_group(index: decontam.Index) -> None:
    docs = [
        ITEMS[0].text,
        ITEMS[0].text + " again",
        ITEMS[1].text,
        "clean",
        FILLER + " ".join(ITEMS[1].text.split()[:10]),
    ]
    groups = ["web", "stories", "web", "web", None]
    verdicts = list(check_all(docs, index, workers=1))
    report = decontam.build_report(verdicts, index, groups, empty_documents=0)
    assert report["documents_removed"] == 3 and report["documents_kept"] == 2
    assert (
        report["benchmarks"]["arc_easy"]["removed"] == 2
        and report["benchmarks"]["arc_easy"]["unique_items"] == 1
    )
    assert report["benchmarks"]["arc_easy"]["groups"]["web"] == {"removed": 1, "unique_items": 1}
    assert report["benchmarks"]["boolq"]["groups"]["web"] == {"removed": 1, "unique_items": 1}
    assert report["groups"] == ["(none)", "stories", "web"]
    assert report["near_miss_count"] == 1 and report["near_misses"][0]["row"] == 4
    markdown = decontam.report_markdown(report)
    assert (
        "| web | 1 (1) | 1 (1) | 0 (0) |" in markdown and "| **total** | 2 (1) | 1 (1) | 0 (0) |" in markdown
    )


# --- benchmark loaders ------------------------------------------------------------------------

EXPECTED_SAMPLES = {
    "mmlu": "What is the chemical symbol for the element sodium? Na",
    "hellaswag": "A man stands at a kitchen sink full of plates. he scrubs each plate with a yellow sponge "
    "and rinses it under the tap.",
    "piqa": "To soften hard brown sugar, seal it in a jar with a slice of bread for a day.",
    "siqa": "Jordan forgot an umbrella and walked home through a heavy storm. How would Jordan feel when "
    "arriving home? soaked and cold",
    "winogrande": "Maria lent Sofia her bicycle because Sofia had a flat tire on her own.",
    "openbookqa": "A magnet will most strongly attract which of these objects an iron nail",
    "arc_easy": "What do plants take in through their leaves to make food? carbon dioxide",
    "arc_challenge": "A student pushes a toy car across a rug and then across a wooden floor with the same "
    "force. Why does the car travel farther on the wooden floor? The floor has less friction.",
    "boolq": "Botanically, a tomato is the ripened ovary of a flowering plant and contains seeds, which "
    "makes it a fruit even though cooks usually treat it as a vegetable in savory dishes. is a tomato "
    "botanically a fruit yes",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SAMPLES))
def test_each_benchmark_sample_is_question_plus_correct_answer(name: str) -> None:
    items = evalsets.load_benchmark(str(DATA / f"{name}.jsonl"))
    assert {item.benchmark for item in items} == {name}
    assert EXPECTED_SAMPLES[name] in [item.text for item in items]
    assert [item.index for item in items] == list(range(len(items)))


def test_wikihow_marks_are_stripped_and_unlabeled_rows_keep_the_question() -> None:
    texts = [item.text for item in evalsets.load_benchmark(str(DATA / "hellaswag.jsonl"))]
    assert "[" not in texts[1] and "Loosen the soil around the roots" in texts[1]
    assert texts[2] == "A woman paddles out on a long board. she"


def test_schema_detection_naming_and_generic_text_files(tmp_path: Path) -> None:
    renamed = tmp_path / "my_arc.jsonl"
    renamed.write_bytes((DATA / "arc_easy.jsonl").read_bytes())
    assert {i.benchmark for i in evalsets.load_benchmark(str(renamed))} == {"arc"}
    assert {i.benchmark for i in evalsets.load_benchmark(f"arc_challenge={renamed}")} == {"arc_challenge"}
    parquet = tmp_path / "questions.parquet"
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in (DATA / "mmlu.jsonl").open()]), parquet)
    assert evalsets.load_benchmark(f"mmlu={parquet}")[1].text.endswith("the pancreas")
    generic = evalsets.load_benchmark(str(DATA / "custom.jsonl"))
    assert [(i.benchmark, i.index) for i in generic] == [("house_eval", 0), ("house_eval", 1), ("custom", 0)]
    with pytest.raises(evalsets.BenchmarkError, match="missing"):
        evalsets.load_benchmark(f"piqa={DATA / 'siqa.jsonl'}")


def test_unknown_benchmark_names_the_known_ones() -> None:
    with pytest.raises(evalsets.BenchmarkError) as raised:
        evalsets.load_benchmark("hellaswagg")
    assert all(name in str(raised.value) for name in evalsets.KNOWN)


def test_hub_loading_asks_for_the_evaluated_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []
    rows = [json.loads(line) for line in (DATA / "winogrande.jsonl").open()]

    def fake_load(path: str, name: str | None = None, split: str | None = None) -> list[dict[str, str]]:
        calls.append((path, name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    items = evalsets.load_benchmark("winogrande")
    assert calls == [("allenai/winogrande", "winogrande_xl", "validation")]
    assert items[0].text == "The trophy would not fit in the suitcase because the trophy was too large."
    expected = {
        "mmlu": ("cais/mmlu", "all", "test"),
        "hellaswag": ("Rowan/hellaswag", None, "validation"),
        "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
        "boolq": ("google/boolq", None, "validation"),
    }
    for name, (hub, config, split) in expected.items():
        evalset = evalsets.EVAL_SETS[name]
        assert (evalset.hub_id, evalset.config, evalset.split) == (hub, config, split)

    def offline(*_: object, **__: object) -> None:
        raise ConnectionError("Couldn't reach the Hub\nlong traceback text")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        evalsets.BenchmarkError, match=r"cannot load piqa \(ybisk/piqa.*Couldn't reach the Hub"
    ):
        evalsets.load_benchmark("piqa")


# --- the command line ---------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_cli_writes_kept_removed_and_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arc = evalsets.load_benchmark(str(DATA / "arc_easy.jsonl"))
    rows = [
        {"id": 0, "text": FILLER + arc[0].text, "seed_source": "web"},
        {"id": 1, "text": FILLER, "seed_source": "web"},
        {"id": 2, "text": "", "seed_source": "stories"},
        {"id": 3, "text": EXPECTED_SAMPLES["piqa"], "seed_source": "stories"},
        {"id": 4, "text": None, "seed_source": None},
    ]
    source = _jsonl(tmp_path / "docs.jsonl", rows)
    out = tmp_path / "out"
    code = cosmo(
        [
            "decontaminate",
            str(source),
            "--benchmark",
            str(DATA / "arc_easy.jsonl"),
            "--benchmark",
            str(DATA / "piqa.jsonl"),
            "--out",
            str(out),
            "--workers",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    kept, removed = pq.read_table(out / "kept.parquet"), pq.read_table(out / "removed.parquet")
    assert kept.column("id").to_pylist() == [1, 2, 4] and removed.column("id").to_pylist() == [0, 3]
    assert removed.column_names == [*kept.column_names, *decontam_columns()]
    assert removed.column("decontam_benchmark").to_pylist() == ["arc_easy", "piqa"]
    assert removed.column("decontam_ratio").to_pylist() == [1.0, 1.0]
    assert removed.column("decontam_item_index").to_pylist() == [0, 1]
    report = json.loads((out / "report.json").read_text())
    assert report["empty_documents"] == 2 and report["groups"] == ["(none)", "stories", "web"]
    assert report["benchmarks"]["piqa"]["groups"]["stories"] == {"removed": 1, "unique_items": 1}
    assert "| stories | 0 (0) | 1 (1) |" in (out / "report.md").read_text()


def decontam_columns() -> list[str]:
    from cosmoforge.postprocess.stages import DECONTAM_COLUMNS

    return list(DECONTAM_COLUMNS)


@pytest.mark.parametrize(
    ("content", "arguments", "message"),
    [
        (b'{"text": "fine"}\n{"text": "bad \xff byte"}\n', [], "line 2: not UTF-8"),
        (b'{"body": "no text column"}\n', [], "no column 'text'"),
        (b'{"text": "fine"}\n', ["--benchmark", "hellaswagg"], "unknown benchmark 'hellaswagg'"),
        (b'{"text": "fine"}\n', ["--threshold", "2"], "threshold must be between 0 and 1"),
        (b'{"text": 3}\n', [], "not text"),
        (b'{"text": "fine"}\nnot json\n', [], "line 2: invalid JSON"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, arguments: list[str], message: str
) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_bytes(content)
    benchmark = ["--benchmark", str(DATA / "piqa.jsonl")] if "--benchmark" not in arguments else []
    code = cosmo(["decontaminate", str(source), *benchmark, *arguments, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_rejects_binary_text_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xc3\x28"], type=pa.binary())}), source)
    code = cosmo(
        ["decontaminate", str(source), "--benchmark", str(DATA / "piqa.jsonl"), "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "row 1: not valid UTF-8" in capsys.readouterr().err


def test_cli_reads_and_writes_any_fsspec_uri(capsys: pytest.CaptureFixture[str]) -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    rows = [{"text": FILLER + EXPECTED_SAMPLES["siqa"]}, {"text": FILLER}]
    memory.pipe("/decontam-test/docs.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    memory.pipe("/decontam-test/siqa.jsonl", (DATA / "siqa.jsonl").read_bytes())
    code = cosmo(
        [
            "decontaminate",
            "memory://decontam-test/docs.jsonl",
            "--benchmark",
            "memory://decontam-test/siqa.jsonl",
            "--out",
            "memory://decontam-test/out",
            "--workers",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    with memory.open("/decontam-test/out/removed.parquet", "rb") as handle:
        assert pq.read_table(handle).column("decontam_benchmark").to_pylist() == ["siqa"]
    report = json.loads(memory.cat("/decontam-test/out/report.json"))
    assert report["documents_kept"] == 1
    memory.rm("/decontam-test", recursive=True)


def test_a_removed_document_leaves_unscored_only_candidates_that_cannot_matter() -> None:
    stem = "Which of the following best describes what the main character of this short scenario did"
    endings = [
        "returned a lost leather wallet to its grateful owner at the downtown bus depot on a Monday",
        "kept the change a busy cashier handed over by mistake on a rainy Tuesday evening in town",
        "fed a hungry stray kitten that wandered into the backyard during a summer thunderstorm",
        "paid the monthly rent two weeks early because a bonus arrived sooner than expected",
    ]
    items = [BenchmarkItem("mmlu", i, f"{stem}: {ending}.") for i, ending in enumerate(endings)]
    copied = "To keep cut apples from turning brown, brush the slices with lemon juice before storing them."
    items.append(BenchmarkItem("piqa", 0, copied))
    index = build_index(items)
    fragment = " ".join(stem.split()[:12])  # every MMLU item is a candidate, none over the threshold
    kept_doc = f"{fragment} and more words of a different story."
    kept = check(kept_doc, index)
    assert not kept.contaminated and kept.skipped == 0 and len(kept.near_misses) == 4
    removed = check(f"{kept_doc} {copied}", index)
    assert removed.contaminated and [(m.benchmark, m.ratio) for m in removed.matches] == [("piqa", 1.0)]
    assert removed.skipped == 4 and not removed.near_misses  # their bounds are at most the threshold
    assert all(recipe_ratio(f"{kept_doc} {copied}", item.text) <= 0.5 for item in items[:4])
