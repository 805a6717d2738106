"""The benchmark index, built once per benchmark set and kept in a file cache.

Loading the benchmark files and building the index (normalizing and hashing every item) takes
seconds for the nine benchmarks, and every `cosmo decontaminate` against the same benchmarks
would redo the same work. So the items and the index arrays are saved under the user's cache
folder, in a file named by the digest of what they are a function of: the benchmark files'
bytes (or, for benchmarks from the Hub, the items themselves), the settings, the Unicode
version and the source of the modules that compute them, so that any change to the code starts
a new file instead of reading a stale one. The file is one uncompressed `.npz`: one read, every
array checked by its zip CRC. A file that cannot be read or does not fit is rebuilt and
replaced; a cache folder that cannot be written only costs the next run the build.

The 16 most recently used files are kept. `COSMOFORGE_DECONTAM_INDEX_CACHE` names another
folder, or `off` to build every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from cosmoforge.postprocess.decontam import hashing, index, model, normalization
from cosmoforge.postprocess.decontam.index import Index, _Anchors, _BitFilter, build_index
from cosmoforge.postprocess.decontam.model import BenchmarkItem, Config

ENV = "COSMOFORGE_DECONTAM_INDEX_CACHE"
KEEP = 16  # index files kept, the most recently used: each benchmark set (or setting) adds one
OFF = "off"
_FORMAT = b"cosmoforge decontam index 1"
_log = logging.getLogger(__name__)


def default_folder() -> Path | None:
    """Where index files live: $COSMOFORGE_DECONTAM_INDEX_CACHE, else the XDG cache folder; None when off."""
    named = os.environ.get(ENV)
    if named is not None:
        return None if named.strip().lower() in (OFF, "") else Path(named).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cosmoforge" / "decontam-index"


@lru_cache(maxsize=1)
def _code_digest() -> bytes:
    hashed = hashlib.sha256(_FORMAT + unicodedata.unidata_version.encode())
    for module in (model, normalization, hashing, index):
        hashed.update(Path(module.__file__ or "").read_bytes())
    hashed.update(Path(__file__).read_bytes())
    return hashed.digest()


def _digest(config: Config, what: bytes, content: Iterable[bytes]) -> str:
    hashed = hashlib.sha256(_code_digest())
    hashed.update(repr((config.ngram, config.threshold, config.min_block_chars)).encode() + what)
    for part in content:
        hashed.update(len(part).to_bytes(8, "little"))
        hashed.update(part)
    return hashed.hexdigest()[:40]


def items_digest(items: Sequence[BenchmarkItem], config: Config) -> str:
    """The name of the index of `items` under `config`: it changes with any item, setting or the code."""
    texts = [part for item in items for part in (item.benchmark, str(item.index), item.text)]
    return _digest(config, b"items", (text.encode("utf-8", "surrogatepass") for text in texts))


def sources_digest(fingerprint: bytes, config: Config) -> str:
    """The name of the index of the benchmark files whose content `fingerprint` digests."""
    return _digest(config, b"sources", [fingerprint])


# --- the file --------------------------------------------------------------------------------------


def _pack(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [text.encode("utf-8", "surrogatepass") for text in texts]
    ends = np.cumsum([len(part) for part in encoded], dtype=np.int64)
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), ends


def _unpack(data: np.ndarray, ends: np.ndarray) -> list[str]:
    # One decode for all, then str slices: a character starts at every byte that is not a UTF-8
    # continuation byte (10xxxxxx), so counting those gives each text's end in characters.
    whole = data.tobytes().decode("utf-8", "surrogatepass")
    continuations = np.flatnonzero((data & 0xC0) == 0x80)
    chars = ends - np.searchsorted(continuations, ends)
    return [whole[a:b] for a, b in itertools.pairwise([0, *chars.tolist()])]


def _item(benchmark: str, number: int, text: str) -> BenchmarkItem:
    # As unpickling makes one: a frozen dataclass's __init__ sets each field through
    # object.__setattr__, which for the 33,782 items of the nine benchmarks cost a quarter second.
    item = object.__new__(BenchmarkItem)
    item.__dict__.update(benchmark=benchmark, index=number, text=text)
    return item


def _arrays(built: Index, key: str) -> dict[str, np.ndarray]:
    names = sorted({item.benchmark for item in built.items})
    arrays = {
        "key": np.frombuffer(key.encode(), dtype=np.uint8),
        "char_table": normalization.char_table(),
        "keys": built.keys,
        "offsets": built.offsets,
        "owners": built.owners,
        "lengths": np.array(built.lengths, dtype=np.int64),
        "filter_words": built.filter.words,
        "filter_bits": np.array([built.filter.bits], dtype=np.int64),
        "grams": built.grams,
        "benchmark_of": built.benchmark_of,
        "unmatchable": np.array(built.unmatchable, dtype=np.int64),
        "anchor_shape": np.array([[a.length, a.bits] for a in built.anchors], dtype=np.int64).reshape(-1, 2),
        "item_benchmark": np.array([names.index(item.benchmark) for item in built.items], dtype=np.int64),
        "item_index": np.array([item.index for item in built.items], dtype=np.int64),
    }
    for name, texts in (
        ("names", names),
        ("item_text", [item.text for item in built.items]),
        ("normalized", built.normalized),
    ):
        arrays[f"{name}_data"], arrays[f"{name}_ends"] = _pack(texts)
    for number, anchors in enumerate(built.anchors):
        arrays[f"anchor_hashes_{number}"] = anchors.hashes
        arrays[f"anchor_flags_{number}"] = anchors.flags
    return arrays


def _from_arrays(arrays: dict[str, np.ndarray], config: Config, key: str) -> Index:
    if arrays["key"].tobytes().decode() != key:
        raise ValueError("the file holds another index")
    names = _unpack(arrays["names_data"], arrays["names_ends"])
    texts = _unpack(arrays["item_text_data"], arrays["item_text_ends"])
    normalized = _unpack(arrays["normalized_data"], arrays["normalized_ends"])
    items = tuple(
        _item(names[benchmark], number, text)
        for benchmark, number, text in zip(
            arrays["item_benchmark"].tolist(), arrays["item_index"].tolist(), texts, strict=True
        )
    )
    if not len(normalized) == arrays["grams"].size == arrays["benchmark_of"].size == len(items):
        raise ValueError("the file's arrays do not fit together")
    anchors = tuple(
        _Anchors(int(length), arrays[f"anchor_hashes_{n}"], arrays[f"anchor_flags_{n}"], int(bits))
        for n, (length, bits) in enumerate(arrays["anchor_shape"].tolist())
    )
    normalization.use_char_table(arrays["char_table"])
    return Index(
        config=config,
        items=items,
        normalized=tuple(normalized),
        keys=arrays["keys"],
        offsets=arrays["offsets"],
        owners=arrays["owners"],
        lengths=tuple(arrays["lengths"].tolist()),
        filter=_BitFilter(arrays["filter_words"], int(arrays["filter_bits"][0])),
        anchors=anchors,
        grams=arrays["grams"],
        benchmark_of=arrays["benchmark_of"],
        unmatchable=tuple(arrays["unmatchable"].tolist()),
    )


def load(path: Path, config: Config, key: str) -> Index:
    """The index saved at `path`; any problem with the file raises (OSError, ValueError, KeyError...)."""
    with np.load(path, allow_pickle=False) as saved:
        arrays = {name: saved[name] for name in saved.files}  # each member read whole: CRC checked
    return _from_arrays(arrays, config, key)


def prune(folder: Path, keep: int = KEEP) -> None:
    """Remove all but the `keep` most recently used index files of `folder`."""
    files = sorted(folder.glob("*.npz"), key=lambda path: path.stat().st_mtime, reverse=True)
    for path in files[keep:]:
        path.unlink(missing_ok=True)


def save(path: Path, built: Index, key: str) -> None:
    """Write the index file whole under a temporary name, then rename: readers never see half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, allow_pickle=False, **_arrays(built, key))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# --- the cache -----------------------------------------------------------------------------------


def index_for(
    load_items: Callable[[], Iterable[BenchmarkItem]],
    config: Config,
    fingerprint: bytes | None = None,
    folder: Path | None = None,
) -> Index:
    """`build_index(load_items(), config)`, from the cache `folder` (default: `default_folder()`)
    when an earlier run saved it, else built and saved there.

    With a `fingerprint` of the benchmark files (`evalsets.fingerprint`) a saved index is found
    without loading the items at all; without one, the items are loaded and their digest names it.
    """
    folder = folder if folder is not None else default_folder()
    if folder is None:
        return build_index(load_items(), config)
    items: tuple[BenchmarkItem, ...] | None = None
    if fingerprint is None:
        items = tuple(load_items())
        key = items_digest(items, config)
    else:
        key = sources_digest(fingerprint, config)
    path = folder / f"{key}.npz"
    if path.exists():
        try:
            found = load(path, config, key)
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: kept by `prune`
            return found
        except Exception as error:  # a damaged or foreign file: rebuilt below, and replaced
            _log.warning("decontamination index cache %s is unusable (%s); rebuilding it", path, error)
    built = build_index(items if items is not None else load_items(), config)
    try:
        save(path, built, key)
        prune(folder)
    except OSError as error:
        _log.warning("cannot save the decontamination index cache in %s: %s", folder, error)
    return built


def cached_index(
    items: Iterable[BenchmarkItem], config: Config | None = None, folder: Path | None = None
) -> Index:
    """`build_index(items, config)` through the cache, named by the items' digest."""
    listed = tuple(items)
    return index_for(lambda: listed, config or Config(), None, folder)
