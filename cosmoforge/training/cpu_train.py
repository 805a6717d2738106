"""Train a tiny Llama on the CPU from the same token files the GPU path feeds nanotron.

This is not a substitute for the nanotron run: it exists so that a laptop or CI can prove the
data path end to end (dataset -> datatrove tokens -> windows -> a model whose loss goes down)
and hand a real checkpoint to the evaluation step. It uses transformers' Llama, the same
architecture family as cosmo-1b, and reads the tokens with datatrove's `DatatroveFolderDataset`,
the reader nanotron's Nanoset is built on, so windows of `sequence_length + 1` tokens are cut
exactly as on the cluster. The learning-rate schedule (linear warmup, cosine decay to a tenth)
is the one the nanotron config asks for.

Outputs in the run folder: `checkpoint/` (save_pretrained weights and tokenizer), `loss.jsonl`
and `loss.csv` (one row per step), `loss.png`, and `train.json` (a summary).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cosmoforge.training import TrainingError
from cosmoforge.training.presets import ModelPreset, check_sequence_length, get_preset
from cosmoforge.training.tokenize import TOKENIZER_FILE, read_metrics

if TYPE_CHECKING:
    from transformers import LlamaConfig

CHECKPOINT_DIR = "checkpoint"
MIN_LR_RATIO = 0.1


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"
    steps: int = 200
    batch_size: int = 8
    sequence_length: int = 256
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 42
    # None: one thread for `tiny` (a model this small spends more time synchronising threads
    # than computing; on a busy 2-core machine two threads were 6x slower), every core otherwise.
    threads: int | None = None


@dataclass
class TrainResult:
    output: str
    checkpoint: str
    preset: str
    parameters: int
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        return self.losses[-1]


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to MIN_LR_RATIO of it at the last step."""
    peak = config.learning_rate
    if config.warmup_steps and step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = peak * MIN_LR_RATIO
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def llama_config(preset: ModelPreset, vocab_size: int, eos_token_id: int) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=preset.rms_norm_eps,
        rope_theta=preset.rope_theta,
        tie_word_embeddings=preset.tie_word_embeddings,
        initializer_range=preset.init_std,
        # Documents are separated by EOS only, as in the token files; no BOS is added.
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def check_config(config: TrainConfig) -> ModelPreset:
    preset = get_preset(config.preset)
    check_sequence_length(preset, config.sequence_length)
    if config.steps < 1:
        raise TrainingError(f"steps must be at least 1, got {config.steps}")
    if config.batch_size < 1:
        raise TrainingError(f"batch size must be at least 1, got {config.batch_size}")
    return preset


def save_tokenizer(name_or_path: str, eos_token: str, target: Path) -> None:
    """Store the tokenizer beside the weights so evaluation loads the checkpoint alone."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isfile(name_or_path):
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=name_or_path, eos_token=eos_token)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.save_pretrained(str(target))


def write_loss_logs(rows: list[dict[str, float]], output: Path) -> None:
    with open(output / "loss.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    with open(output / "loss.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = list(range(1, len(losses) + 1))
    axis.plot(steps, losses, linewidth=1.0, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        axis.plot(steps, smooth, linewidth=2.0, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def train(tokens: str, output: str | Path, config: TrainConfig) -> TrainResult:
    """Train `config.preset` on the token folder for `config.steps` steps and save everything."""
    preset = check_config(config)
    metrics = read_metrics(tokens)
    tokenizer = metrics["tokenizer"]
    vocab_size = int(tokenizer["vocab_size"])

    import torch
    from datatrove.utils.dataset import DatatroveFolderDataset
    from torch.nn import functional
    from torch.utils.data import DataLoader, RandomSampler
    from transformers import LlamaForCausalLM

    windows = DatatroveFolderDataset(
        tokens if "://" in tokens else os.path.abspath(tokens),
        seq_len=config.sequence_length,
        filename_pattern="*.ds",
        token_size=int(tokenizer["token_size"]),
    )
    if len(windows) < config.batch_size:
        raise TrainingError(
            f"{metrics['tokens']} tokens make {len(windows)} windows of {config.sequence_length + 1}, "
            f"fewer than one batch of {config.batch_size}: lower the sequence length or batch size"
        )

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads or (1 if preset.name == "tiny" else os.cpu_count() or 1))
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama_config(preset, vocab_size, int(tokenizer["eos_token_id"])))
    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_at(step, config) / config.learning_rate
    )
    generator = torch.Generator().manual_seed(config.seed)

    def batches() -> Any:
        while True:  # epochs over the windows, reshuffled each time
            sampler = RandomSampler(windows, generator=generator)
            yield from DataLoader(windows, batch_size=config.batch_size, sampler=sampler, drop_last=True)

    rows: list[dict[str, float]] = []
    losses: list[float] = []
    started = time.perf_counter()
    seen = 0
    stream = batches()
    for step in range(config.steps):
        window = next(stream)["input_ids"].long()
        inputs, labels = window[:, :-1], window[:, 1:]
        logits = model(input_ids=inputs).logits
        loss = functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        learning_rate = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
        seen += labels.numel()
        elapsed = time.perf_counter() - started
        losses.append(float(loss.item()))
        rows.append(
            {
                "step": step + 1,
                "loss": round(losses[-1], 6),
                "lr": float(learning_rate),
                "tokens": seen,
                "tokens_per_second": round(seen / elapsed, 1),
                "elapsed_seconds": round(elapsed, 3),
            }
        )
    seconds = time.perf_counter() - started

    checkpoint = out / CHECKPOINT_DIR
    model.save_pretrained(str(checkpoint))
    # The tokenize step keeps the exact tokenizer it used beside the tokens; prefer it to a
    # second Hub download.
    local_tokenizer = Path(tokens) / TOKENIZER_FILE
    source = str(local_tokenizer) if local_tokenizer.is_file() else tokenizer["name_or_path"]
    save_tokenizer(source, tokenizer["eos_token"], checkpoint)
    write_loss_logs(rows, out)
    plot_losses(losses, out / "loss.png", f"{preset.name} Llama, {parameters / 1e6:.1f}M parameters")
    result = TrainResult(
        output=str(out),
        checkpoint=str(checkpoint),
        preset=preset.name,
        parameters=parameters,
        steps=config.steps,
        tokens=seen,
        seconds=seconds,
        losses=losses,
    )
    summary = {k: v for k, v in asdict(result).items() if k != "losses"}
    summary |= {"first_loss": result.first_loss, "final_loss": result.final_loss, "config": asdict(config)}
    summary["tokens_source"] = tokens
    (out / "train.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return result
