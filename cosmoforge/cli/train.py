"""`cosmo tokenize`, `cosmo train` and `cosmo evaluate`: the training stretch of a run, by hand.

Each command checks its input (tokenizer, dataset rows, preset against sequence length, task
data) before doing any work; a problem prints one line and exits with status 2. Heavy imports
stay inside the command functions so `cosmo --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cosmoforge.cli.options import RankError, add_rank, job_rank, positive

DEFAULT_TOKENIZER = "HuggingFaceTB/cosmo2-tokenizer"


def _fail(command: str, error: Exception) -> int:
    print(f"cosmo {command}: error: {error}", file=sys.stderr)
    return 2


def _tokenize(args: argparse.Namespace) -> int:
    from cosmoforge.training import TrainingError
    from cosmoforge.training.tokenize import tokenize_dataset
    from cosmoforge.training.tokenize_ranks import merge_ranks, tokenize_rank

    try:
        if args.step is None and args.world_size != 1:
            raise TrainingError("--world-size needs --step tokenize or --step merge")
        if args.step == "tokenize":
            rank = tokenize_rank(
                args.dataset,
                args.out,
                tokenizer=args.tokenizer,
                rank=job_rank(args.rank),
                world_size=args.world_size,
                text_field=args.text_field,
                eos_token=args.eos_token,
                seed=args.seed,
                overwrite=args.overwrite,
            )
            start, stop = rank.rows
            print(
                f"rank {rank.rank} of {rank.world_size}: rows {start}..{stop}, {rank.documents} documents -> "
                f"{rank.tokens} tokens; run `--step merge` once every rank is done"
            )
            return 0
        if args.step == "merge":
            result = merge_ranks(
                args.dataset,
                args.out,
                tokenizer=args.tokenizer,
                world_size=args.world_size,
                eos_token=args.eos_token,
                seed=args.seed,
            )
        else:
            result = tokenize_dataset(
                args.dataset,
                args.out,
                tokenizer=args.tokenizer,
                text_field=args.text_field,
                eos_token=args.eos_token,
                workers=args.workers,
                seed=args.seed,
                overwrite=args.overwrite,
            )
    except (TrainingError, RankError) as error:
        return _fail("tokenize", error)
    print(
        f"{result.documents} documents -> {result.tokens} tokens in {len(result.files)} file(s) "
        f"({result.tokens_per_second:,.0f} tokens/s); metrics in {result.output}/metrics.json"
    )
    for group, counts in result.tokens_by.items():
        print(f"  tokens by {group}: " + ", ".join(f"{name}={count}" for name, count in counts.items()))
    return 0


def _train(args: argparse.Namespace) -> int:
    from cosmoforge.training import TrainingError
    from cosmoforge.training.cpu_train import TrainConfig, train

    config = TrainConfig(
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        sequence_length=args.seq_len,
        learning_rate=args.lr,
        warmup_steps=args.warmup,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        precision=args.precision,
        checkpoint_every=args.checkpoint_every,
    )
    try:
        result = train(args.tokens, args.out, config)
    except TrainingError as error:
        return _fail("train", error)
    size = f"{result.parameters / 1e6:.1f}M parameters"
    loss = f"loss {result.first_loss:.3f} -> {result.final_loss:.3f}"
    where = f"{result.device}, {result.precision}"
    print(f"{result.preset} Llama ({size}, {where}), {result.steps} steps on {result.tokens} tokens: {loss}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"loss log: {result.output}/loss.jsonl, plot: {result.output}/loss.png")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cosmoforge.training import TrainingError
    from cosmoforge.training.evaluate import evaluate

    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()] if args.tasks else None
    try:
        result = evaluate(
            args.checkpoint,
            args.out,
            tasks=tasks,
            max_samples=args.max_samples,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            device=args.device,
        )
    except TrainingError as error:
        return _fail("evaluate", error)
    print(result.to_markdown())
    print(f"results: {args.out}/results.md, {args.out}/results.json")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from cosmoforge.training import TrainingError
    from cosmoforge.training.convert import convert_checkpoint

    try:
        checkpoint = convert_checkpoint(args.source, args.out, tokens=args.tokens)
    except TrainingError as error:
        return _fail("convert-checkpoint", error)
    print(f"transformers checkpoint: {checkpoint}")
    return 0


def register(subparsers: Any) -> None:
    _register_tokenize(subparsers)
    _register_train(subparsers)
    _register_evaluate(subparsers)
    _register_convert(subparsers)


def _register_tokenize(subparsers: Any) -> None:
    tokenize = subparsers.add_parser(
        "tokenize",
        help="tokenize a parquet dataset into nanotron/datatrove token files",
        description="Tokenize DATASET (a parquet file or folder, local or fsspec URI) with datatrove.",
    )
    tokenize.add_argument("dataset", metavar="DATASET")
    tokenize.add_argument("--out", required=True, metavar="DIR", help="folder (or URI) for the token files")
    tokenize.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        metavar="PATH_OR_ID",
        help="tokenizer.json, its folder, or a Hub id",
    )
    tokenize.add_argument("--text-field", default="text", help="column holding the documents (default: text)")
    tokenize.add_argument(
        "--eos-token", default=None, help="end-of-text token (default: found in the vocabulary)"
    )
    tokenize.add_argument("--workers", type=positive, default=1, help="parallel tokenizer processes")
    tokenize.add_argument("--seed", type=int, default=42, help="document shuffling seed")
    tokenize.add_argument("--overwrite", action="store_true", help="replace token files already in --out")
    tokenize.add_argument(
        "--step",
        choices=("tokenize", "merge"),
        default=None,
        help="run as ranks of a job: `tokenize` on every rank, then `merge` once (default: one process)",
    )
    tokenize.add_argument(
        "--world-size", type=positive, default=1, metavar="N", help="number of tokenize ranks (with --step)"
    )
    add_rank(tokenize, "--step tokenize")
    tokenize.set_defaults(func=_tokenize)


def _register_train(subparsers: Any) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a small Llama on token files, on the CPU or one GPU",
        description="Train a preset Llama on TOKENS (a `cosmo tokenize` folder) and save a checkpoint.",
    )
    train.add_argument("tokens", metavar="TOKENS")
    train.add_argument(
        "--out", required=True, metavar="DIR", help="folder or URI for checkpoint, loss log and plot"
    )
    train.add_argument("--preset", default="tiny", choices=["tiny", "small", "1b"])
    train.add_argument("--steps", type=positive, default=200)
    train.add_argument("--batch-size", type=positive, default=8, help="sequences per step")
    train.add_argument("--seq-len", type=positive, default=256, help="tokens per sequence")
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    train.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument(
        "--checkpoint-every",
        type=positive,
        default=None,
        metavar="STEPS",
        help="steps between resume states in --out (default: a tenth of --steps); "
        "a rerun with the same --out and settings continues from the last one",
    )
    train.add_argument("--threads", type=positive, default=None, help="torch threads (default: 1 for tiny)")
    train.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda[:N]",
        help="where to train (default: auto, a CUDA GPU when torch sees one, else the CPU)",
    )
    train.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16-mixed", "bf16"],
        help="auto: fp32 on the CPU, the preset's dtype on CUDA (bfloat16 -> bf16-mixed)",
    )
    train.set_defaults(func=_train)


def _register_evaluate(subparsers: Any) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="score a checkpoint on ARC, OpenBookQA, MMLU, PIQA, HellaSwag, SIQA, WinoGrande, BoolQ",
        description="Evaluate CHECKPOINT with lighteval (log-likelihood, cloze form).",
    )
    evaluate.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint folder or `cosmo train` output (folder or URI)"
    )
    evaluate.add_argument(
        "--out", required=True, metavar="DIR", help="folder or URI for results.md and results.json"
    )
    evaluate.add_argument("--tasks", default=None, help="comma-separated task names (default: all nine)")
    evaluate.add_argument("--max-samples", type=positive, default=None, help="samples per task")
    evaluate.add_argument(
        "--data-dir",
        default=None,
        help="local task data, one folder per task (default: the Hugging Face Hub)",
    )
    evaluate.add_argument("--batch-size", type=positive, default=8)
    evaluate.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]", help="where the model runs")
    evaluate.set_defaults(func=_evaluate)


def _register_convert(subparsers: Any) -> None:
    convert = subparsers.add_parser(
        "convert-checkpoint",
        help="convert a nanotron checkpoint to the transformers format, for `cosmo evaluate`",
        description="Convert the nanotron checkpoint SOURCE (a step folder, or the folder whose "
        "latest.txt names one) into OUT/checkpoint, loadable with transformers' from_pretrained.",
    )
    convert.add_argument("source", metavar="SOURCE", help="nanotron checkpoint folder or URI")
    convert.add_argument(
        "--out", required=True, metavar="DIR", help="folder or URI to write checkpoint/ into"
    )
    convert.add_argument(
        "--tokens", default=None, metavar="DIR", help="the `cosmo tokenize` folder: its tokenizer goes along"
    )
    convert.set_defaults(func=_convert)
