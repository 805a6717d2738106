"""Train a tiny Llama on the CPU (or one GPU) from the same token files the GPU path feeds nanotron.

This is not a substitute for the nanotron run: it exists so that a laptop or CI can prove the
data path end to end (dataset -> datatrove tokens -> windows -> a model whose loss goes down)
and hand a real checkpoint to the evaluation step. The same loop runs on one CUDA GPU when
there is one (`device`), in bf16 mixed precision when the preset's dtype is bfloat16, and
`benchmarks/gpu_train.py` times its step (`train_step`) on the `1b` preset. It uses
transformers' Llama, the same architecture family as cosmo-1b, and reads the tokens with
datatrove's `DatatroveFolderDataset`, the reader nanotron's Nanoset is built on, so windows of
`sequence_length + 1` tokens are cut exactly as on the cluster. The learning-rate schedule
(linear warmup, cosine decay to a tenth) is the one the nanotron config asks for.

Outputs in the output folder (local or any fsspec URI): `checkpoint/` (save_pretrained weights
and tokenizer), `loss.jsonl` and `loss.csv` (one row per step), `progress.json` (the same rows
in the shape the nanotron launcher writes, which the run's status reads), `loss.png`,
`train.json` (a summary, written last) and `resume/state.pt` (written on a schedule; a rerun
continues from it).

Module-level imports are the standard library and cosmoforge modules that import only the
standard library, so the benchmark can import this module on a machine with torch and
transformers and nothing else; torch, transformers, datatrove and matplotlib load inside the
functions that use them.
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

from cosmoforge.training import TrainingError, remote
from cosmoforge.training.metrics import PROGRESS_FILE, Progress, ProgressRecord
from cosmoforge.training.presets import ModelPreset, check_sequence_length, get_preset
from cosmoforge.training.tokenize import TOKENIZER_FILE, read_metrics

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

CHECKPOINT_DIR = "checkpoint"
# Everything a restarted `cosmo train` needs to go on where the last one stopped: weights,
# optimizer and schedule state, the step and the loss rows, in one file so it lands whole.
RESUME_STATE = "resume/state.pt"
# What must match for a resume state to continue this training rather than another one.
RESUME_KEYS = ("preset", "steps", "batch_size", "sequence_length", "learning_rate", "warmup_steps", "seed")
MIN_LR_RATIO = 0.1
DEVICES = ("auto", "cpu", "cuda")
# fp32: weights and compute in float32. bf16-mixed: float32 master weights, optimizer state and
# gradients, matrix products in bfloat16 under autocast (what nanotron's bf16 runs do with their
# fp32 master copy). bf16: the weights themselves in bfloat16 (half the memory, lossy updates).
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")


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
    # auto: the first CUDA GPU when torch sees one, else the CPU; cpu; cuda or cuda:N (an error
    # when torch sees no such GPU).
    device: str = "auto"
    # auto: fp32 on the CPU; on CUDA the preset's dtype (bfloat16 -> bf16-mixed). See PRECISIONS.
    precision: str = "auto"
    # Steps between resume states (uploaded with the loss log when the output is remote);
    # None: a tenth of the run.
    checkpoint_every: int | None = None

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or max(1, math.ceil(self.steps / 10))


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
    device: str = "cpu"
    precision: str = "fp32"

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
    check_device_name(config.device)
    if config.checkpoint_every is not None and config.checkpoint_every < 1:
        raise TrainingError(f"checkpoint interval must be at least 1 step, got {config.checkpoint_every}")
    if config.precision not in PRECISIONS:
        raise TrainingError(f"unknown precision {config.precision!r}: use one of {', '.join(PRECISIONS)}")
    return preset


def check_device_name(device: str) -> None:
    """auto, cpu, cuda or cuda:N; whether the GPU exists is `resolve_device`'s question."""
    index = device.removeprefix("cuda:")
    if device not in DEVICES and not (device.startswith("cuda:") and index.isdigit()):
        raise TrainingError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def resolve_device(requested: str) -> str:
    """The torch device to train on: `auto` picks CUDA when torch sees a GPU, else the CPU.

    Asking for `cuda` on a machine or a torch build without one is an error, never a silent
    fallback to the CPU: a 1b run that quietly lands on the CPU would take weeks.
    """
    check_device_name(requested)
    import torch

    if requested == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if available else "cpu"
    if not available:
        why = (
            f"this torch ({torch.__version__}) was built without CUDA"
            if torch.version.cuda is None
            else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: "
            "check the driver and CUDA_VISIBLE_DEVICES"
        )
        raise TrainingError(f"device {requested!r} requested but {why}; use --device cpu or auto")
    index = int(requested.removeprefix("cuda:")) if ":" in requested else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise TrainingError(f"device {requested!r} requested but torch sees {count} GPU(s)")
    return requested


def resolve_precision(preset: ModelPreset, device: str, requested: str = "auto") -> str:
    """fp32 on the CPU unless asked; on CUDA the preset's dtype decides (bfloat16 -> bf16-mixed)."""
    if requested not in PRECISIONS:
        raise TrainingError(f"unknown precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    if device.startswith("cuda") and preset.dtype == "bfloat16":
        return "bf16-mixed"
    return "fp32"


def build_model(
    preset: ModelPreset, vocab_size: int, eos_token_id: int, device: str = "cpu", precision: str = "fp32"
) -> LlamaForCausalLM:
    """The preset's Llama, initialised on `device` itself (no CPU copy of a 1b model to build
    and move), with bfloat16 weights for the `bf16` precision. On the CPU it is built exactly
    as before, so a seed gives the same weights."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(preset, vocab_size, eos_token_id)
    if device == "cpu":
        model = LlamaForCausalLM(config)
    else:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    if precision == "bf16":
        model = model.bfloat16()
    model.train()
    return model


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: str) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95) as in the nanotron config; the fused CUDA kernel on a GPU."""
    import torch

    fused = {"fused": True} if device.startswith("cuda") else {}
    return torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        betas=(0.9, 0.95),
        weight_decay=config.weight_decay,
        **fused,
    )


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_at(step, config) / config.learning_rate
    )


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    window: torch.Tensor,
    precision: str = "fp32",
    grad_clip: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """One optimizer step on a batch of windows (`seq_len + 1` tokens, already on the device).

    Returns the loss as a tensor (reading it synchronises a GPU, so the caller decides when)
    and the learning rate the step used. Cross-entropy is computed in float32 whatever the
    precision; on fp32 the `.float()` is a no-op, so the CPU path is unchanged.
    """
    import torch
    from torch.nn import functional

    inputs, labels = window[:, :-1], window[:, 1:]
    autocast = torch.autocast(window.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    # lighteval switches gradients off process-wide when it loads a model; a training that
    # follows an evaluation in the same process (an embedded run's next stage) needs them back.
    with torch.enable_grad():
        with autocast:
            logits = model(input_ids=inputs, use_cache=False).logits
        loss = functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    learning_rate = float(schedule.get_last_lr()[0])
    optimizer.step()
    schedule.step()
    return loss.detach(), learning_rate


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


def save_checkpoint(model: Any, tokens: str, tokenizer: dict[str, Any], checkpoint: Path) -> None:
    model.save_pretrained(str(checkpoint))
    store_tokenizer(tokens, tokenizer, checkpoint)


def store_tokenizer(tokens: str, tokenizer: dict[str, Any], checkpoint: Path) -> None:
    """The tokenizer the token folder was made with, saved beside the weights.

    The tokenize step keeps the exact tokenizer it used beside the tokens (perhaps in object
    storage); it is preferred to a second Hub download."""
    kept = remote.read_bytes(remote.join(tokens, TOKENIZER_FILE))
    if kept is None:
        save_tokenizer(tokenizer["name_or_path"], tokenizer["eos_token"], checkpoint)
        return
    staged = checkpoint / f".{TOKENIZER_FILE}"
    staged.write_bytes(kept)
    try:
        save_tokenizer(str(staged), tokenizer["eos_token"], checkpoint)
    finally:
        staged.unlink(missing_ok=True)


def token_windows(tokens: str, metrics: dict[str, Any], config: TrainConfig) -> Any:
    """The token folder as windows of `sequence_length + 1` tokens; at least one batch of them."""
    from datatrove.utils.dataset import DatatroveFolderDataset

    windows = DatatroveFolderDataset(
        tokens if "://" in tokens else os.path.abspath(tokens),
        seq_len=config.sequence_length,
        filename_pattern="*.ds",
        token_size=int(metrics["tokenizer"]["token_size"]),
    )
    if len(windows) < config.batch_size:
        raise TrainingError(
            f"{metrics['tokens']} tokens make {len(windows)} windows of {config.sequence_length + 1}, "
            f"fewer than one batch of {config.batch_size}: lower the sequence length or batch size"
        )
    return windows


def batch_indices(step: int, windows: int, config: TrainConfig, _cache: dict[int, Any] | None = None) -> Any:
    """The windows of `step`: epochs over a fresh permutation each, seeded by the epoch number.

    A pure function of the step, so a resumed run draws exactly the batches the interrupted
    one would have drawn; `_cache` keeps the current epoch's permutation between calls."""
    import torch

    per_epoch = windows // config.batch_size
    epoch, position = divmod(step, per_epoch)
    cache = {} if _cache is None else _cache
    if epoch not in cache:
        cache.clear()
        cache[epoch] = torch.randperm(windows, generator=torch.Generator().manual_seed(config.seed + epoch))
    return cache[epoch][position * config.batch_size : (position + 1) * config.batch_size]


def load_resume_state(output: str, config: TrainConfig) -> dict[str, Any] | None:
    """The resume state under `output` when it continues this training, else None.

    A state written by a different configuration is an error, not something to overwrite:
    the folder holds another training's progress."""
    import io

    import torch

    data = remote.read_bytes(remote.join(output, RESUME_STATE))
    if data is None:
        return None
    state: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    saved = state.get("config") or {}
    wanted = asdict(config)
    different = [key for key in RESUME_KEYS if saved.get(key) != wanted[key]]
    if different:
        raise TrainingError(
            f"{output} holds a resume state of another training ({', '.join(different)} differ): "
            "use a new --out or remove it"
        )
    return state


def save_resume_state(output: str, local: Path, state: dict[str, Any]) -> None:
    """Write the state whole: write-then-rename locally, then one upload when remote."""
    import torch

    target = local / RESUME_STATE
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, target)
    if remote.is_remote(output):
        remote.upload_file(target, remote.join(output, RESUME_STATE))


def progress_file(rows: list[dict[str, float]], total_steps: int) -> str:
    """The loss rows as the progress file the nanotron launcher writes too (no MFU on a CPU)."""
    progress = Progress(run="")
    for row in rows:
        progress.add(
            ProgressRecord(
                step=int(row["step"]),
                total_steps=total_steps,
                loss=float(row["loss"]),
                tokens_per_second=float(row["tokens_per_second"]),
                consumed_tokens=int(row["tokens"]),
                learning_rate=float(row["lr"]),
                time=float(row["elapsed_seconds"]),
            )
        )
    return progress.to_json()


def publish_progress(output: str, local: Path, rows: list[dict[str, float]], total_steps: int) -> None:
    """The loss log so far, where the output folder is (the run's status reads progress.json)."""
    write_loss_logs(rows, local)
    (local / PROGRESS_FILE).write_text(progress_file(rows, total_steps), encoding="utf-8")
    if remote.is_remote(output):
        for name in ("loss.jsonl", "loss.csv", PROGRESS_FILE):
            remote.upload_file(local / name, remote.join(output, name))


def train(
    tokens: str,
    output: str | Path,
    config: TrainConfig,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `config.preset` on the token folder for `config.steps` steps and save everything.

    `output` is a local folder or an fsspec URI. Every `checkpoint_interval` steps the resume
    state and loss log are written there; a later call with the same output and configuration
    continues from the last state instead of starting again (a replaced pod, a Ctrl-C).
    `on_step` sees each step's loss row as it is recorded.
    """
    preset = check_config(config)
    device = resolve_device(config.device)
    precision = resolve_precision(preset, device, config.precision)
    metrics = read_metrics(tokens)
    tokenizer = metrics["tokenizer"]
    output = str(output)

    import torch

    windows = token_windows(tokens, metrics, config)
    resumed = load_resume_state(output, config)
    with remote.staging(output, prefix="cosmo-train-") as out:
        torch.set_num_threads(config.threads or (1 if preset.name == "tiny" else os.cpu_count() or 1))
        torch.manual_seed(config.seed)
        eos = int(tokenizer["eos_token_id"])
        model = build_model(preset, int(tokenizer["vocab_size"]), eos, device, precision)
        optimizer = make_optimizer(model, config, device)
        schedule = make_schedule(optimizer, config)
        first_step, rows = restore(resumed, model, optimizer, schedule)

        started = time.perf_counter()
        seen = int(rows[-1]["tokens"]) if rows else 0
        earlier = float(rows[-1]["elapsed_seconds"]) if rows else 0.0
        permutations: dict[int, Any] = {}
        for step in range(first_step, config.steps):
            indices = batch_indices(step, len(windows), config, permutations)
            batch = torch.stack([windows[int(index)]["input_ids"] for index in indices])
            window = batch.long().to(device, non_blocking=True)
            loss, learning_rate = train_step(model, optimizer, schedule, window, precision, config.grad_clip)
            seen += window.shape[0] * (window.shape[1] - 1)
            loss_value = float(loss.item())  # synchronises a GPU, so elapsed includes the step
            rows.append(
                loss_row(step + 1, loss_value, learning_rate, seen, earlier + time.perf_counter() - started)
            )
            if (step + 1) % config.checkpoint_interval == 0 and step + 1 < config.steps:
                state = resume_state(config, step + 1, model, optimizer, schedule, rows)
                save_resume_state(output, out, state)
                publish_progress(output, out, rows, config.steps)
            if on_step is not None:
                on_step(rows[-1])
        parameters = sum(p.numel() for p in model.parameters())
        save_checkpoint(model, tokens, tokenizer, out / CHECKPOINT_DIR)
        result = TrainResult(
            output=output,
            checkpoint=remote.join(output, CHECKPOINT_DIR),
            preset=preset.name,
            parameters=parameters,
            steps=config.steps,
            tokens=seen,
            seconds=float(rows[-1]["elapsed_seconds"]),
            losses=[float(row["loss"]) for row in rows],
            device=device,
            precision=precision,
        )
        write_outputs(result, config, rows, out, tokens, first_step)
    return result


def resume_state(
    config: TrainConfig, step: int, model: Any, optimizer: Any, schedule: Any, rows: list[dict[str, float]]
) -> dict[str, Any]:
    """What a later call needs to continue after `step` as if it had never stopped."""
    return {
        "config": asdict(config),
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rows": rows,
    }


def restore(
    resumed: dict[str, Any] | None, model: Any, optimizer: Any, schedule: Any
) -> tuple[int, list[dict[str, float]]]:
    """Load a resume state into the fresh model, optimizer and schedule: (first step, loss rows)."""
    if resumed is None:
        return 0, []
    model.load_state_dict(resumed["model"])
    optimizer.load_state_dict(resumed["optimizer"])
    schedule.load_state_dict(resumed["schedule"])
    return int(resumed["step"]), list(resumed["rows"])


def loss_row(step: int, loss: float, learning_rate: float, tokens: int, elapsed: float) -> dict[str, float]:
    return {
        "step": step,
        "loss": round(loss, 6),
        "lr": float(learning_rate),
        "tokens": tokens,
        "tokens_per_second": round(tokens / elapsed, 1),
        "elapsed_seconds": round(elapsed, 3),
    }


def write_outputs(
    result: TrainResult,
    config: TrainConfig,
    rows: list[dict[str, float]],
    out: Path,
    tokens: str,
    first_step: int,
) -> None:
    """Loss logs, plot and `train.json` beside the checkpoint in `out`, then all of it uploaded
    when the output is remote, the summary last: its presence says the training finished."""
    write_loss_logs(rows, out)
    (out / PROGRESS_FILE).write_text(progress_file(rows, config.steps), encoding="utf-8")
    title = f"{result.preset} Llama, {result.parameters / 1e6:.1f}M parameters"
    plot_losses(result.losses, out / "loss.png", title)
    summary = {k: v for k, v in asdict(result).items() if k != "losses"}
    summary |= {"first_loss": result.first_loss, "final_loss": result.final_loss, "config": asdict(config)}
    summary["tokens_source"] = tokens
    summary["resumed_from_step"] = first_step
    (out / "train.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if remote.is_remote(result.output):
        for name in (CHECKPOINT_DIR, "loss.jsonl", "loss.csv", "loss.png", PROGRESS_FILE):
            source = out / name
            if source.is_dir():
                remote.upload_folder(source, remote.join(result.output, name))
            else:
                remote.upload_file(source, remote.join(result.output, name))
        remote.upload_file(out / "train.json", remote.join(result.output, "train.json"))
