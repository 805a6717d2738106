"""The numpy MinHash signature step against datatrove's format, math and later steps."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import xxhash
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text

from cosmoforge.postprocess.minhash_signature import (
    MinhashSignatureStep,
    SignatureComputer,
    permutation_parameters,
    record_dtype,
    signature_path,
    words_of,
    write_signatures,
)

P = (1 << 61) - 1
M64 = (1 << 64) - 1

VOCAB = [
    "".join(random.Random(n).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3 + n % 7))
    for n in range(3000)
]


def essay(rng: random.Random, words: int) -> str:
    out = []
    for n in range(words):
        word = rng.choice(VOCAB)
        out.append(word.capitalize() + "," if n % 11 == 0 else word)
    return " ".join(out) + "."


def edited(text: str, changes: int, rng: random.Random) -> str:
    words = text.split()
    for at in rng.sample(range(len(words)), changes):
        words[at] = rng.choice(VOCAB)
    return " ".join(words)


# --- the transcription: one shingle, one hash function at a time, in Python integers ----------


def mix(z: int) -> int:
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def scalar_signature(text: str, config: MinhashConfig) -> list[int] | None:
    words = words_of(text, config)
    n = config.n_grams
    if len(words) < n:
        return None
    hashes = [xxhash.xxh64_intdigest(word.encode("utf-8")) for word in words]
    low32 = config.hash_config.precision == 32
    shingles = []
    for start in range(len(words) - n + 1):
        acc = hashes[start]
        for word in hashes[start + 1 : start + n]:
            acc = (acc * 0x9E3779B97F4A7C15 + word) & M64
        shingle = mix(acc)
        shingles.append(shingle & 0xFFFFFFFF if low32 else shingle)
    a, b = permutation_parameters(config)
    signature = []
    for ai, bi in zip(a.tolist(), b.tolist(), strict=True):
        # datatrove's uint64 product and sum wrap around before the modulus.
        residues = [((ai * s + bi) & M64) % P for s in shingles]
        signature.append(min(r & 0xFFFFFFFF if low32 else r for r in residues))
    return signature


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(7)
    return [
        essay(rng, 120),
        "Too short to sign.",
        "Café naïve Ångström, 1,000.5 km; Ελληνικά; x\u037ey — MIXED Case",
        essay(rng, 4),
        essay(rng, 5),  # exactly one shingle
        essay(rng, 1300),  # spans several permutation blocks
        "",
        essay(rng, 60),
    ]


@pytest.mark.parametrize("precision", [64, 32])
def test_signatures_equal_the_scalar_transcription(texts: list[str], precision: int) -> None:
    config = MinhashConfig(hash_config=HashConfig(precision=precision))
    rows, signatures = SignatureComputer(config).compute(texts)
    expected = [scalar_signature(text, config) for text in texts]
    assert rows.tolist() == [row for row, sig in enumerate(expected) if sig is not None]
    assert signatures.dtype == (np.uint32 if precision == 32 else np.uint64)
    for row, signature in zip(rows.tolist(), signatures.tolist(), strict=True):
        assert signature == expected[row]


def test_signatures_are_datatrove_get_signature_of_our_shingles(texts: list[str]) -> None:
    config = MinhashConfig()
    computer = SignatureComputer(config)
    shingles, per_doc = computer.shingles(texts)
    starts = np.cumsum(per_doc) - per_doc
    rows, signatures = computer.compute(texts)
    step = MinhashDedupSignature(output_folder="unused", config=config)
    for row, signature in zip(rows.tolist(), signatures, strict=True):
        mine = shingles[starts[row] : starts[row] + per_doc[row]].reshape(-1, 1)
        assert np.concatenate(step.get_signature(mine)).tolist() == signature.tolist()


def test_permutation_parameters_are_datatrove_s() -> None:
    config = MinhashConfig(num_buckets=3, hashes_per_bucket=4, seed=11)
    a, b = MinhashDedupSignature(output_folder="unused", config=config).parameters
    mine_a, mine_b = permutation_parameters(config)
    assert mine_a.tolist() == a.ravel().tolist()
    assert mine_b.tolist() == b.ravel().tolist()


@pytest.mark.parametrize(
    "norm",
    [
        TextNormConfig(),
        TextNormConfig(norm_weekdays=True, norm_monthnames=True),
        TextNormConfig(lowercase=False),
    ],
)
def test_words_are_datatrove_simplified_text_split(norm: TextNormConfig) -> None:
    samples = [
        "Hello, World!  It's 3.14 -- or 1,000,000 (approx.) on Monday in May.\tTabs\nand\r\nlines",
        "Café naïve Ångström Zürich; résumé — “quoted” «guillemets» x\u037ey",
        "Astral \U0001d4cd\U0001d167y and \u00a0no-break\u2003spaces; \u0663\u066b\u0664 Arabic digits",
        "\x00control\x1fchars\x7fand\x85next line",
        "  ",
    ]
    config = MinhashConfig(norm_config=norm)
    for sample in samples:
        assert words_of(sample, config) == simplify_text(sample, norm).split(), sample


class OurShinglesSignature(MinhashDedupSignature):
    """datatrove's own signature step, fed the shingle hashes of this module."""

    def get_shingles(self, text: str) -> np.ndarray:
        shingles, _ = SignatureComputer(self.config).shingles([text])
        return shingles.reshape(-1, 1)


@pytest.mark.parametrize("precision", [64, 32])
def test_files_are_byte_identical_to_datatrove_s(tmp_path: Path, texts: list[str], precision: int) -> None:
    config = MinhashConfig(num_buckets=3, hashes_per_bucket=4, hash_config=HashConfig(precision=precision))
    count = write_signatures(texts * 2, tmp_path / "ours", config, rank=3)
    assert count == len(texts) * 2
    documents = [Document(text=text, id=str(n)) for n, text in enumerate(texts * 2)]
    OurShinglesSignature(output_folder=str(tmp_path / "theirs"), config=config).run(iter(documents), rank=3)
    dtype = record_dtype(config)
    for bucket in range(config.num_buckets):
        ours = signature_path(tmp_path / "ours", bucket, 3)
        theirs = tmp_path / "theirs" / f"bucket_{bucket:03d}" / "00003.minhash.sig"
        assert ours.read_bytes() == theirs.read_bytes()
        records = np.fromfile(ours, dtype=dtype)
        signed = [row for row, text in enumerate(texts * 2) if scalar_signature(text, config) is not None]
        assert sorted(records["doc"].tolist()) == signed


def test_short_texts_get_no_record_but_keep_their_number(tmp_path: Path) -> None:
    config = MinhashConfig(num_buckets=2, hashes_per_bucket=2)
    texts = ["one two three four", "one two three four five", "", "a b c d e f g"]
    assert write_signatures(texts, tmp_path, config) == 4
    for bucket in range(2):
        records = np.fromfile(signature_path(tmp_path, bucket, 0), dtype=record_dtype(config))
        assert sorted(records["doc"].tolist()) == [1, 3]
    assert write_signatures(["too short"], tmp_path / "empty", config) == 1
    assert os.path.getsize(signature_path(tmp_path / "empty", 0, 0)) == 0


def test_datatrove_buckets_cluster_and_filter_find_the_planted_copies(tmp_path: Path) -> None:
    rng = random.Random(3)
    base = [essay(rng, 200) for _ in range(40)]
    copies = {40 + n: n * 3 for n in range(10)}  # row -> source row
    docs = base + [edited(base[source], 4, rng) for source in copies.values()]
    order = list(range(len(docs)))
    rng.shuffle(order)
    shuffled = [docs[old] for old in order]
    new_row = {old: new for new, old in enumerate(order)}
    pairs = {frozenset((new_row[copy], new_row[source])) for copy, source in copies.items()}

    config = MinhashConfig()
    sigs, buckets, clusters = (str(tmp_path / name) for name in ("sigs", "buckets", "clusters"))
    shards = [range(0, 23), range(23, len(shuffled))]
    for rank, shard in enumerate(shards):
        MinhashSignatureStep(sigs, config).run(
            (Document(text=shuffled[row], id=str(row)) for row in shard), rank=rank, world_size=2
        )
    for bucket in range(config.num_buckets):
        MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=config).run(
            None, rank=bucket, world_size=config.num_buckets
        )
    MinhashDedupCluster(input_folder=buckets, output_folder=clusters, config=config).run(None, 0, 1)
    removed = set()
    for rank, shard in enumerate(shards):
        documents = [Document(text=shuffled[row], id=str(row)) for row in shard]
        kept = {doc.id for doc in MinhashDedupFilter(input_folder=clusters).run(iter(documents), rank, 2)}
        removed |= {int(doc.id) for doc in documents if doc.id not in kept}
    # One of each planted pair goes, whichever came first stays; nothing else is touched.
    assert len(removed) == len(pairs)
    assert all(len(pair & removed) == 1 for pair in pairs)
