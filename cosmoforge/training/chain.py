"""The training stretch of an embedded run: dataset -> tokens -> tiny model -> evaluation table.

On a cluster these are Jobs; on a laptop the runner calls `train_run` after compaction, so
one spec proves the whole data path end to end. Outputs land beside the dataset:
`tokens/`, `checkpoints/` (model, loss log and plot) and `eval/` (results.json, results.md).
"""

from __future__ import annotations

from dataclasses import dataclass
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


def train_run(spec: TrainingSpec, store: RunStore, dataset: str) -> TrainingSummary:
    """Tokenize `dataset` (the run's final documents), train the preset on it, evaluate it.

    Each step reads and writes the run's folder wherever it lives (local or object storage);
    training and evaluation stage their files locally themselves."""
    from cosmoforge.training.cpu_train import TrainConfig, train
    from cosmoforge.training.evaluate import evaluate
    from cosmoforge.training.tokenize import tokenize_dataset

    tokens = tokenize_dataset(dataset, store.url("tokens"), tokenizer=spec.tokenizer, seed=42, overwrite=True)
    config = TrainConfig(
        preset=spec.preset,
        steps=spec.steps,
        batch_size=spec.batch_size,
        sequence_length=spec.sequence_length,
        learning_rate=spec.learning_rate,
        warmup_steps=spec.warmup_steps,
        checkpoint_every=spec.checkpoint_every,
    )
    trained = train(store.url("tokens"), store.url("checkpoints"), config)
    tasks: list[dict[str, Any]] = []
    if spec.evaluate:
        result = evaluate(
            trained.checkpoint,
            store.url("eval"),
            tasks=list(spec.eval_tasks),
            max_samples=spec.eval_max_samples,
            data_dir=spec.eval_data,
        )
        tasks = [score.__dict__ for score in result.scores]
    return TrainingSummary(
        documents=tokens.documents,
        tokens=tokens.tokens,
        steps=trained.steps,
        first_loss=trained.first_loss,
        final_loss=trained.final_loss,
        tasks=tasks,
        outputs={name: store.url(name) for name in ("tokens", "checkpoints", "eval")},
    )
