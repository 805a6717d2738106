"""Training throughput of a preset Llama on one GPU, with cosmoforge's own training step.

The GPU path of cosmoforge trains with nanotron, which has not run on a GPU here. This script
answers the narrower question a lent GPU can settle in a few minutes: what does one GPU do on
the `1b` preset (cosmo-1b's shape) with the trainer in `cosmoforge.training.cpu_train`? It
builds the preset's `LlamaForCausalLM` through the same `build_model` / `make_optimizer` /
`make_schedule` / `train_step` that `cosmo train` uses (AdamW 0.9/0.95, warmup then cosine
decay, clipping 1.0, bf16 mixed precision on CUDA), trains a few steps per micro batch size and
prints one JSON summary: the GPU, versions, parameters, tokens/s after the warm-up steps, step
time, peak memory and model FLOPs utilisation (6 x parameters x tokens/s over the GPU's bf16
dense peak).

Data: by default i.i.d. tokens drawn from a Zipf distribution over the vocabulary (s = 1), so
the loss has somewhere to go: it starts near ln(vocabulary) and falls towards the source's
entropy (`loss_floor` in the summary). `--data uniform` draws uniform tokens (the loss stays
at ln(vocabulary)); `--tokens DIR` reads a `cosmo tokenize` folder's `.ds` files with numpy.

It needs torch, transformers and numpy and nothing else of cosmoforge's dependencies (no
pydantic, datatrove, pyarrow, fsspec or matplotlib): it imports only `cosmoforge.training`,
its presets, `peaks` and `cpu_train`, whose module-level imports are the standard library. A test
runs it with those packages blocked.

    python benchmarks/gpu_train.py --device cuda --preset 1b --out gpu_train.json
    python benchmarks/gpu_train.py --device cpu --preset tiny --steps 4 --micro-batch 2,4

`--max-seconds` bounds the whole run (imports and model initialisation included): no step
starts once the next would end past it, a size that would not get its warm-up done is
skipped, and an alarm 30 s past the budget stops a step that hangs. The summary is printed
(and rewritten to `--out` after every size) either way.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cosmoforge.training import TrainingError
from cosmoforge.training.cpu_train import (
    TrainConfig,
    build_model,
    check_config,
    make_optimizer,
    make_schedule,
    resolve_device,
    resolve_precision,
    train_step,
)
from cosmoforge.training.peaks import peak_tflops
from cosmoforge.training.presets import ModelPreset, get_preset

if TYPE_CHECKING:
    import torch

ZIPF_EXPONENT = 1.0
HARD_STOP_GRACE_SECONDS = 30
GIB = 1024**3


class BudgetExceeded(Exception):
    """Raised by the alarm when a step runs far past --max-seconds."""


@dataclass(frozen=True)
class Plan:
    """One size to time: the micro batch and whether activations are recomputed."""

    micro_batch: int
    grad_ckpt: bool


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 4,8,16, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes like 4,8,16, got {text!r}")
    return sorted(set(sizes))


class TokenSource:
    """Batches of `seq_len + 1` tokens on the device: Zipf or uniform draws, or token files."""

    def __init__(self, kind: str, vocab_size: int, seq_len: int, device: str, seed: int) -> None:
        import torch

        self.kind = kind
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64, device=device)
        weights = ranks.pow(-ZIPF_EXPONENT) if kind == "zipf" else torch.ones_like(ranks)
        probabilities = weights / weights.sum()
        self.cdf = probabilities.cumsum(0)
        self.entropy = float(-(probabilities * probabilities.log()).sum())

    def batch(self, size: int) -> torch.Tensor:
        import torch

        draws = torch.rand(
            size, self.seq_len + 1, generator=self.generator, device=self.device, dtype=torch.float64
        )
        return torch.searchsorted(self.cdf, draws).clamp_(max=self.vocab_size - 1)


class TokenFiles:
    """Random windows from a `cosmo tokenize` folder (local), read with numpy memory maps."""

    def __init__(self, folder: str, seq_len: int, device: str, seed: int) -> None:
        import numpy as np

        metrics_file = Path(folder) / "metrics.json"
        if not metrics_file.is_file():
            raise TrainingError(f"{folder} is not a tokenized folder: metrics.json is missing")
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        tokenizer = metrics["tokenizer"]
        dtype = np.uint16 if int(tokenizer["token_size"]) == 2 else np.uint32
        self.vocab_size = int(tokenizer["vocab_size"])
        self.eos_token_id = int(tokenizer["eos_token_id"])
        self.seq_len = seq_len
        self.device = device
        self.files = [np.memmap(path, dtype=dtype, mode="r") for path in sorted(Path(folder).glob("*.ds"))]
        self.files = [tokens for tokens in self.files if len(tokens) > seq_len + 1]
        if not self.files:
            raise TrainingError(f"{folder} holds no .ds file longer than {seq_len + 1} tokens")
        sizes = np.array([len(tokens) - seq_len - 1 for tokens in self.files], dtype=np.float64)
        self.weights = sizes / sizes.sum()
        self.random = np.random.default_rng(seed)
        self.entropy: float | None = None

    def batch(self, size: int) -> torch.Tensor:
        import numpy as np
        import torch

        picks = self.random.choice(len(self.files), size=size, p=self.weights)
        rows = []
        for pick in picks:
            tokens = self.files[pick]
            start = int(self.random.integers(0, len(tokens) - self.seq_len - 1))
            rows.append(np.asarray(tokens[start : start + self.seq_len + 1], dtype=np.int64))
        batch = torch.from_numpy(np.stack(rows))
        if self.device == "cpu":
            return batch
        # From pinned memory the copy is queued behind the running step instead of waiting for it.
        return batch.pin_memory().to(self.device, non_blocking=True)


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:
        info["numpy"] = None
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": properties.name,
            "memory_gib": round(properties.total_memory / GIB, 1),
            "multiprocessors": properties.multi_processor_count,
            "capability": f"{properties.major}.{properties.minor}",
            "count": torch.cuda.device_count(),
        }
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["gpu"] = None
    return info


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(
    plan: Plan,
    args: argparse.Namespace,
    preset: ModelPreset,
    source: TokenSource | TokenFiles,
    eos_token_id: int,
    precision: str,
    deadline: float,
    *,
    device: str,
) -> dict[str, Any]:
    """Build a fresh model, run the warm-up steps one by one, then time the rest as one window."""
    import torch

    cuda = device.startswith("cuda")
    config = TrainConfig(
        preset=preset.name,
        steps=args.steps,
        batch_size=plan.micro_batch,
        sequence_length=args.seq_len,
        learning_rate=args.lr,
        warmup_steps=min(args.lr_warmup, args.steps - 1),
        seed=args.seed,
        device=device,
        precision=precision,
    )
    check_config(config)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    result: dict[str, Any] = {"micro_batch": plan.micro_batch, "grad_ckpt": plan.grad_ckpt}
    tokens_per_step = plan.micro_batch * args.seq_len

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = build_model(preset, source.vocab_size, eos_token_id, device, precision)
    if plan.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    step_model: torch.nn.Module = torch.compile(model) if args.compile else model  # type: ignore[assignment]
    optimizer = make_optimizer(model, config, device)
    schedule = make_schedule(optimizer, config)
    sync()
    result["init_seconds"] = round(time.perf_counter() - started, 3)
    result["parameters"] = sum(parameter.numel() for parameter in model.parameters())
    result["attention"] = getattr(model.config, "_attn_implementation", None)
    if cuda:
        result["memory_after_init_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 2)

    losses: list[torch.Tensor] = []
    warmup_times: list[float] = []
    stopped = None

    def step() -> None:
        window = source.batch(plan.micro_batch)
        loss, _ = train_step(step_model, optimizer, schedule, window, precision, config.grad_clip)
        losses.append(loss)

    # Warm-up: one step at a time, synchronised, so the first (kernel selection, compilation)
    # is seen on its own and the later ones estimate a step for the deadline.
    for _ in range(min(args.warmup, args.steps)):
        estimate = warmup_times[-1] if warmup_times else 0.0
        if warmup_times and time.perf_counter() + estimate > deadline:
            stopped = "time budget"
            break
        begin = time.perf_counter()
        step()
        sync()
        warmup_times.append(time.perf_counter() - begin)
    result["first_step_seconds"] = round(warmup_times[0], 3) if warmup_times else None

    # Timed window: no synchronisation between steps (CUDA events mark them), so the CPU
    # queues the next step while the GPU runs this one, as in a real training loop.
    step_times: list[float] = []
    timed_steps = 0
    window_seconds = 0.0
    if stopped is None and args.steps > args.warmup:
        estimate = warmup_times[-1] if warmup_times else 0.0
        events = []
        begin = time.perf_counter()
        for _ in range(args.steps - args.warmup):
            if time.perf_counter() + estimate > deadline:
                stopped = "time budget"
                break
            if cuda:
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
            mark = time.perf_counter()
            step()
            if not cuda:
                step_times.append(time.perf_counter() - mark)
            timed_steps += 1
        if cuda and events:
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
        sync()
        window_seconds = time.perf_counter() - begin
        if cuda and events:
            step_times = [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(events)]

    values = [float(v) for v in torch.stack(losses).float().tolist()] if losses else []
    result |= {
        "status": "ok" if timed_steps else "no timed steps",
        "stopped_early": stopped,
        "steps_run": len(values),
        "warmup_steps": len(warmup_times),
        "timed_steps": timed_steps,
        "tokens_per_step": tokens_per_step,
        "warmup_step_seconds": [round(t, 3) for t in warmup_times],
        "timed_seconds": round(window_seconds, 3),
        "tokens_per_second": round(timed_steps * tokens_per_step / window_seconds, 1)
        if timed_steps
        else None,
        "step_seconds_median": round(statistics.median(step_times), 4) if step_times else None,
        "step_seconds_min": round(min(step_times), 4) if step_times else None,
        "step_seconds_max": round(max(step_times), 4) if step_times else None,
        "loss_first": round(values[0], 4) if values else None,
        "loss_last": round(values[-1], 4) if values else None,
        "losses": [round(v, 4) for v in values],
    }
    if cuda:
        result["peak_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
        result["peak_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 2)
    return result


def attach_flops(
    result: dict[str, Any], parameters: int, preset: ModelPreset, seq_len: int, peak: float | None
) -> None:
    """MFU = 6·N·tokens/s over the bf16 peak; the second figure adds attention's 12·L·h·s per token."""
    rate = result.get("tokens_per_second")
    per_token = 6 * parameters
    with_attention = per_token + 12 * preset.num_layers * preset.hidden_size * seq_len
    result["model_tflops_per_second"] = round(rate * per_token / 1e12, 3) if rate else None
    if rate and peak:
        result["mfu"] = round(rate * per_token / (peak * 1e12), 4)
        result["mfu_with_attention"] = round(rate * with_attention / (peak * 1e12), 4)
    else:
        result["mfu"] = result["mfu_with_attention"] = None


def run_plan(plan: Plan, *run_args: Any, device: str) -> dict[str, Any]:
    """measure(), with an out-of-memory or any other failure reported instead of raised."""
    import torch

    try:
        return measure(plan, *run_args, device=device)
    except torch.cuda.OutOfMemoryError as error:
        result = {"status": "out of memory", "error": str(error).splitlines()[0][:300]}
    except BudgetExceeded:
        result = {"status": "stopped by the hard time limit"}
    except Exception as error:
        result = {
            # cuBLAS and cuDNN report a failed workspace allocation as a plain RuntimeError.
            "status": "out of memory" if "out of memory" in str(error).lower() else "error",
            "error": f"{type(error).__name__}: {error}"[:500],
            "traceback": traceback.format_exc(limit=6)[-2000:],
        }
    finally:
        free_memory(device)
    return {"micro_batch": plan.micro_batch, "grad_ckpt": plan.grad_ckpt} | result


def render(summary: dict[str, Any]) -> str:
    """Indented JSON with lists of numbers (losses, step times) kept on one line."""
    text = json.dumps(summary, indent=2)
    number = r"-?[0-9][0-9.eE+-]*"
    pattern = re.compile(rf"\[\s*({number}(?:,\s*{number})*)\s*\]")
    return pattern.sub(lambda match: "[" + ", ".join(match.group(1).replace(",", " ").split()) + "]", text)


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        f"{'micro batch':>11} {'ckpt':>5} {'tokens/s':>10} {'step s':>7} {'peak GiB':>9} {'MFU':>6}  status"
    ]
    for run in runs:
        rate = run.get("tokens_per_second")
        mfu = run.get("mfu")
        step = run.get("step_seconds_median")
        memory = run.get("peak_memory_allocated_gib")
        lines.append(
            f"{run['micro_batch']:>11} {'on' if run['grad_ckpt'] else 'off':>5} "
            f"{f'{rate:,.0f}' if rate else '-':>10} {f'{step:.3f}' if step else '-':>7} "
            f"{f'{memory:.1f}' if memory is not None else '-':>9} {f'{mfu:.1%}' if mfu else '-':>6}  "
            f"{run['status']}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b", help="tiny, small or 1b (default: 1b)")
    parser.add_argument(
        "--micro-batch",
        type=parse_sizes,
        default=None,
        help="sequences per step, one size or several: 4,8,16 (default: half, one and two times "
        "the preset's max_micro_batch)",
    )
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's positions")
    parser.add_argument("--steps", type=int, default=30, help="steps per size, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16-mixed or bf16")
    parser.add_argument(
        "--grad-ckpt",
        choices=["off", "on", "on-oom"],
        default="on-oom",
        help="activation checkpointing: on-oom retries a size that ran out of memory with it",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (slow first step)")
    parser.add_argument("--data", choices=["zipf", "uniform"], default="zipf", help="random token source")
    parser.add_argument("--tokens", default=None, metavar="DIR", help="a `cosmo tokenize` folder instead")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the preset's (49152 for 1b)")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    parser.add_argument("--lr-warmup", type=int, default=5, help="learning-rate warmup steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 peak, when the GPU is not known"
    )
    parser.add_argument("--max-seconds", type=float, default=210.0, help="budget for the whole run")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the JSON summary here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    deadline = started + args.max_seconds
    source: TokenSource | TokenFiles
    try:
        preset = get_preset(args.preset)
        args.seq_len = args.seq_len or preset.max_position_embeddings
        if args.steps < 1 or args.warmup < 0:
            raise TrainingError("--steps must be at least 1 and --warmup at least 0")
        check_config(TrainConfig(preset=preset.name, sequence_length=args.seq_len, precision=args.precision))
        import torch

        device = resolve_device(args.device)
        precision = resolve_precision(preset, device, args.precision)
        if device.startswith("cuda"):
            # Before the first allocation: sizes that come and go fragment the cache less.
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
            # torch.cuda.set_device refuses a bare "cuda"; name the index everywhere.
            device = device if ":" in device else f"cuda:{torch.cuda.current_device()}"
            torch.cuda.set_device(device)
        if args.tokens:
            source = TokenFiles(args.tokens, args.seq_len, device, args.seed)
            eos_token_id, data = source.eos_token_id, f"token files in {args.tokens}"
        else:
            vocab_size = args.vocab_size or preset.vocab_size
            source = TokenSource(args.data, vocab_size, args.seq_len, device, args.seed)
            eos_token_id, data = vocab_size - 1, f"{args.data} random tokens"
    except TrainingError as error:
        print(f"gpu_train: error: {error}", file=sys.stderr)
        return 2

    from transformers import LlamaForCausalLM  # noqa: F401  (imported here, not in init_seconds)

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.micro_batch or [
        max(1, preset.max_micro_batch // 2),
        preset.max_micro_batch,
        2 * preset.max_micro_batch,
    ]

    env = environment(device)
    peak = args.peak_tflops or (peak_tflops(env["gpu"]["name"]) if env["gpu"] else None)
    parameters = preset.parameter_count(source.vocab_size)
    summary: dict[str, Any] = {
        "benchmark": "benchmarks/gpu_train.py",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": env,
        "model": {
            "preset": preset.name,
            "hidden_size": preset.hidden_size,
            "intermediate_size": preset.intermediate_size,
            "layers": preset.num_layers,
            "heads": preset.num_heads,
            "vocab_size": source.vocab_size,
            "tie_word_embeddings": preset.tie_word_embeddings,
            "parameters": parameters,
            "preset_dtype": preset.dtype,
        },
        "settings": {
            "device": device,
            "precision": precision,
            "sequence_length": args.seq_len,
            "micro_batches": sizes,
            "steps": args.steps,
            "warmup": args.warmup,
            "learning_rate": args.lr,
            "lr_warmup": args.lr_warmup,
            "grad_ckpt": args.grad_ckpt,
            "compile": args.compile,
            "data": data,
            "max_seconds": args.max_seconds,
            "bf16_peak_tflops": peak,
            "flops_per_token": 6 * parameters,
        },
        "loss_uniform_guess": round(math.log(source.vocab_size), 4),
        "loss_floor": round(source.entropy, 4) if source.entropy is not None else None,
        "runs": [],
    }

    def write() -> None:
        summary["seconds"] = round(time.perf_counter() - started, 1)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(render(summary) + "\n", encoding="utf-8")

    def hard_stop(signum: int, frame: FrameType | None) -> None:
        raise BudgetExceeded

    alarm = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if alarm:
        previous = signal.signal(signal.SIGALRM, hard_stop)
        signal.alarm(max(1, int(deadline - time.perf_counter()) + HARD_STOP_GRACE_SECONDS))
    try:
        needs_ckpt = args.grad_ckpt == "on"
        last: dict[str, Any] | None = None
        for size in sizes:
            plan = Plan(size, needs_ckpt)
            if time.perf_counter() >= deadline:
                summary["runs"].append(
                    {"micro_batch": size, "grad_ckpt": plan.grad_ckpt, "status": "skipped: time budget"}
                )
                continue
            if last and last.get("step_seconds_median"):
                # Skip a size that could not finish its warm-up and a few timed steps in time.
                scale = (
                    size / last["micro_batch"] * (1.4 if plan.grad_ckpt and not last["grad_ckpt"] else 1.0)
                )
                needed = last["init_seconds"] + (args.warmup + 3) * last["step_seconds_median"] * scale
                if time.perf_counter() + needed > deadline:
                    summary["runs"].append(
                        {"micro_batch": size, "grad_ckpt": plan.grad_ckpt, "status": "skipped: time budget"}
                    )
                    continue
            run_args = (args, preset, source, eos_token_id)
            result = run_plan(plan, *run_args, precision, deadline, device=device)
            if result["status"] == "out of memory" and args.grad_ckpt == "on-oom" and not plan.grad_ckpt:
                summary["runs"].append(result)
                print(table([result]).splitlines()[1], file=sys.stderr, flush=True)
                needs_ckpt = True
                plan = Plan(size, True)
                result = run_plan(plan, *run_args, precision, deadline, device=device)
            attach_flops(result, parameters, preset, args.seq_len, peak)
            summary["runs"].append(result)
            print(table([result]).splitlines()[1], file=sys.stderr, flush=True)
            write()
            if result["status"] == "ok":
                last = result
            elif result["status"] == "out of memory":
                break  # larger sizes will not fit either
    finally:
        if alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    measured = [run for run in summary["runs"] if run.get("tokens_per_second")]
    best = max(measured, key=lambda run: run["tokens_per_second"], default=None)
    summary["best"] = (
        {
            key: best.get(key)
            for key in ("micro_batch", "grad_ckpt", "tokens_per_second", "mfu", "peak_memory_allocated_gib")
        }
        if best
        else None
    )
    write()
    print(table(summary["runs"]), file=sys.stderr)
    print(render(summary))
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
