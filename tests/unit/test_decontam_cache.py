"""The file cache of benchmark indexes: a hit reads what a build makes, a change of content is a
miss, and a damaged file is rebuilt, never trusted."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cosmoforge.postprocess import evalsets
from cosmoforge.postprocess.decontam import BenchmarkItem, Config, Index, build_index, cache, check_batch

DATA = Path(__file__).parents[1] / "data" / "benchmarks"
ARRAYS = ("keys", "offsets", "owners", "grams", "benchmark_of")


@pytest.fixture
def items() -> list[BenchmarkItem]:
    return evalsets.load_benchmarks(
        [str(DATA / "piqa.jsonl"), str(DATA / "siqa.jsonl"), str(DATA / "mmlu.jsonl")]
    )


def documents(items: list[BenchmarkItem]) -> list[str]:
    # Whole copies, halves, a short item and clean text: every path of the check.
    filler = "Seedlings go outside once the soil warms and the risk of frost has passed. "
    halves = [" ".join(item.text.split()[: len(item.text.split()) // 2]) for item in items]
    return [filler + item.text for item in items] + [filler + half for half in halves] + [filler * 3]


def assert_same(found: Index, built: Index, docs: list[str]) -> None:
    assert found.items == built.items and found.normalized == built.normalized
    for name in ARRAYS:
        assert np.array_equal(getattr(found, name), getattr(built, name)), name
    assert found.lengths == built.lengths and found.unmatchable == built.unmatchable
    assert np.array_equal(found.filter.words, built.filter.words) and found.filter.bits == built.filter.bits
    assert [(a.length, a.bits) for a in found.anchors] == [(a.length, a.bits) for a in built.anchors]
    assert check_batch(docs, found) == check_batch(docs, built)


def refuse_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(*_: object) -> Index:
        raise AssertionError("built again: the cache was not used")

    monkeypatch.setattr(cache, "build_index", build)


def test_a_hit_reads_the_index_a_build_makes(
    tmp_path: Path, items: list[BenchmarkItem], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config()
    built = cache.cached_index(items, config, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    refuse_builds(monkeypatch)
    found = cache.cached_index(items, config, tmp_path)
    assert found is not built
    docs = documents(items)
    assert sum(verdict.contaminated for verdict in check_batch(docs, found)) >= len(items)
    assert_same(found, build_index(items, config), docs)


def test_changed_items_or_settings_are_a_miss(tmp_path: Path, items: list[BenchmarkItem]) -> None:
    cache.cached_index(items, Config(), tmp_path)
    changed = [*items[:-1], BenchmarkItem(items[-1].benchmark, items[-1].index, items[-1].text + " more")]
    found = cache.cached_index(changed, Config(), tmp_path)
    assert found.items == tuple(changed) and found.normalized[-1].endswith(" more")
    cache.cached_index(items, Config(ngram=8), tmp_path)
    renamed = [BenchmarkItem("other", item.index, item.text) for item in items]
    assert cache.cached_index(renamed, Config(), tmp_path).benchmarks == ["other"]
    assert len(list(tmp_path.glob("*.npz"))) == 4


def test_benchmark_files_are_found_by_their_bytes_without_loading_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "piqa.jsonl"
    source.write_bytes((DATA / "piqa.jsonl").read_bytes())
    specs = [str(source)]
    loads: list[int] = []

    def load() -> list[BenchmarkItem]:
        loads.append(1)
        return evalsets.load_benchmarks(specs)

    folder = tmp_path / "cache"
    first = cache.index_for(load, Config(), evalsets.fingerprint(specs), folder)
    again = cache.index_for(load, Config(), evalsets.fingerprint(specs), folder)
    assert len(loads) == 1 and again.items == first.items
    source.write_bytes(source.read_bytes().replace(b"lemon juice", b"lime juice", 1))
    changed = cache.index_for(load, Config(), evalsets.fingerprint(specs), folder)
    assert len(loads) == 2 and changed.items != first.items
    assert changed.items == tuple(evalsets.load_benchmarks(specs))
    assert evalsets.fingerprint(["piqa=" + str(source)]) != evalsets.fingerprint(specs)
    assert evalsets.fingerprint([str(tmp_path / "missing.jsonl")]) is None


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not a zip", "another key"])
def test_a_damaged_file_is_rebuilt_and_replaced(
    tmp_path: Path, items: list[BenchmarkItem], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    built = cache.cached_index(items, Config(), tmp_path)
    (path,) = tmp_path.glob("*.npz")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":  # inside an array: the zip CRC catches it
        at = data.index(b"keys.npy") + 4096
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    elif damage == "not a zip":
        path.write_bytes(b"garbage")
    else:
        other = tmp_path / "other"
        cache.cached_index(items[:3], Config(), other)
        path.write_bytes(next(other.glob("*.npz")).read_bytes())
    with caplog.at_level(logging.WARNING):
        found = cache.cached_index(items, Config(), tmp_path)
    assert "rebuilding it" in caplog.text
    assert_same(found, built, documents(items)[:50])
    assert path.read_bytes() == data  # replaced by a good file


def test_off_and_unwritable_folders_still_give_the_index(
    tmp_path: Path, items: list[BenchmarkItem], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cache.ENV, "off")
    assert cache.default_folder() is None
    assert cache.cached_index(items[:5]).items == tuple(items[:5])
    monkeypatch.setenv(cache.ENV, str(tmp_path / "here"))
    assert cache.default_folder() == tmp_path / "here"
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder would be")
    assert cache.cached_index(items[:5], Config(), blocked / "cache").items == tuple(items[:5])


def test_only_the_most_recently_used_files_are_kept(tmp_path: Path, items: list[BenchmarkItem]) -> None:
    for count in range(1, 5):
        cache.cached_index(items[:count], Config(), tmp_path)
    cache.prune(tmp_path, keep=2)
    kept = sorted(path.name for path in tmp_path.glob("*.npz"))
    assert kept == sorted(f"{cache.items_digest(items[:n], Config())}.npz" for n in (3, 4))
