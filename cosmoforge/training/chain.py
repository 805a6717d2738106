"""The training stretch of an embedded run: dataset -> tokens -> tiny model -> evaluation table.

On a cluster these are Jobs; on a laptop the runner calls `train_run` after compaction, so
one spec proves the whole data path end to end. Outputs land beside the dataset:
`tokens/`, `checkpoints/` (model, loss log and plot) and `eval/` (results.json, results.md).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosmoforge.spec.model import TrainingSpec
from cosmoforge.storage import RunStore


@dataclass
class TrainingSummary:
    documents: int
    tokens: int
    steps: int
    first_loss: float
    final_loss: float
    tasks: list[dict[str, Any]]
    outputs: dict[str, str]


def _local_root(store: RunStore) -> Path | None:
    protocol = store.fs.protocol if isinstance(store.fs.protocol, str) else store.fs.protocol[0]
    return Path(store.root) if protocol in ("file", "local") else None


def train_run(spec: TrainingSpec, store: RunStore, dataset: str) -> TrainingSummary:
    """Tokenize `dataset` (the run's final documents), train the preset on it, evaluate it."""
    from cosmoforge.training.cpu_train import TrainConfig, train
    from cosmoforge.training.evaluate import evaluate
    from cosmoforge.training.tokenize import tokenize_dataset

    local = _local_root(store)
    # Training and evaluation read local files; for object storage work in a scratch folder
    # and upload the results, so the run's folder looks the same wherever it lives.
    scratch = Path(tempfile.mkdtemp(prefix="cosmo-train-")) if local is None else None
    root = local if local is not None else scratch
    assert root is not None
    try:
        tokens = tokenize_dataset(
            dataset, str(root / "tokens"), tokenizer=spec.tokenizer, seed=42, overwrite=True
        )
        config = TrainConfig(
            preset=spec.preset,
            steps=spec.steps,
            batch_size=spec.batch_size,
            sequence_length=spec.sequence_length,
            learning_rate=spec.learning_rate,
            warmup_steps=spec.warmup_steps,
        )
        trained = train(str(root / "tokens"), root / "checkpoints", config)
        tasks: list[dict[str, Any]] = []
        if spec.evaluate:
            result = evaluate(
                trained.checkpoint,
                root / "eval",
                tasks=list(spec.eval_tasks),
                max_samples=spec.eval_max_samples,
                data_dir=spec.eval_data,
            )
            tasks = [score.__dict__ for score in result.scores]
        if scratch is not None:
            for folder in ("tokens", "checkpoints", "eval"):
                if (scratch / folder).exists():
                    store.fs.put(str(scratch / folder), store.path(folder), recursive=True)
        return TrainingSummary(
            documents=tokens.documents,
            tokens=tokens.tokens,
            steps=trained.steps,
            first_loss=trained.first_loss,
            final_loss=trained.final_loss,
            tasks=tasks,
            outputs={name: store.url(name) for name in ("tokens", "checkpoints", "eval")},
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
