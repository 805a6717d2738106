"""`cosmo plan FILE`: the size and cost of a run before anything is generated.

The counting and arithmetic are in `cosmoforge.runs.plan`; this module picks the tokenizer,
reads a finished run for calibration when asked, and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="count a run's prompts and estimate its tokens, GPU-hours and cost"
    )
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--gpu", help="GPU type of the throughput figure (default: H100; cpu-2 for embedded)")
    p.add_argument("--tokens-per-second", type=float, help="your measured generated tokens/s per GPU")
    p.add_argument("--gpu-hour-price", type=float, help="price of one GPU-hour, for the cost")
    p.add_argument("--fill-ratio", type=float, help="share of maxNewTokens a completion uses (0-1]")
    p.add_argument(
        "--calibrate", metavar="RUN_URI", help="measure the fill ratio on a finished run's dataset"
    )
    p.set_defaults(func=plan)


def plan(args: argparse.Namespace) -> int:
    from cosmoforge.cli.run import _load
    from cosmoforge.prompts.builder import build_prompts
    from cosmoforge.prompts.seeds import SeedError
    from cosmoforge.runs.plan import count_prompts, plan_run

    run = _load(args.file)
    if run is None:
        return 1
    try:
        assumptions = _assumptions(args)
        counts = count_prompts(build_prompts(run))
    except (SeedError, ValueError) as error:
        print(f"cosmo plan: {error}", file=sys.stderr)
        return 2
    result = plan_run(run, counts, token_counter(run.spec.generation.model), assumptions)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        from rich.console import Console

        Console().print(plan_table(result))
    return 0


def _assumptions(args: argparse.Namespace) -> Any:
    from cosmoforge.runs.plan import Assumptions

    fill, source = args.fill_ratio, None
    if fill is not None and not 0 < fill <= 1:
        raise ValueError(f"--fill-ratio must be in (0, 1], not {fill}")
    if args.calibrate:
        fill = measured_fill_ratio(args.calibrate)
        source = f"fill ratio {fill:.2f} of maxNewTokens, measured on {args.calibrate}"
    for name in ("tokens_per_second", "gpu_hour_price"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, not {value}")
    return Assumptions(fill, source, args.tokens_per_second, args.gpu, args.gpu_hour_price)


def measured_fill_ratio(run_uri: str) -> float:
    """Completion tokens over the token budget, across a finished run's dataset."""
    from cosmoforge.generation.compact import read_dataset
    from cosmoforge.runs.plan import fill_ratio_of
    from cosmoforge.storage import RunStore

    parent, _, name = run_uri.rstrip("/").rpartition("/")
    table = read_dataset(RunStore.open(parent or ".", name), columns=["completion_tokens", "sampling"])
    if table is None:
        raise ValueError(f"{run_uri} has no dataset/ to calibrate on")
    budgets = [
        int(json.loads(s or "{}").get("max_new_tokens", 0)) for s in table.column("sampling").to_pylist()
    ]
    return fill_ratio_of(table.column("completion_tokens").to_pylist(), budgets)


def token_counter(model: str) -> Any:
    """The model's own tokenizer if it is on this machine, else SmolLM2's from the embedded model.

    Only files already here are read (no download): planning must work offline.
    """
    from cosmoforge.runs.plan import TokenCounter
    from cosmoforge.services.modelserver.llama import EMBEDDED_MODEL_ID

    if model != EMBEDDED_MODEL_ID:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        except Exception:  # not cached here, gated, or not a transformers tokenizer
            pass
        else:
            return TokenCounter(
                lambda texts: [len(ids) for ids in tokenizer(list(texts))["input_ids"]], model, True
            )
    llama = _embedded_vocabulary()
    if llama is None:
        return None

    def count(texts: Sequence[str]) -> list[int]:
        return [len(llama.tokenize(text.encode(), add_bos=False)) for text in texts]

    return TokenCounter(count, "SmolLM2's tokenizer", model == EMBEDDED_MODEL_ID)


def _embedded_vocabulary() -> Any:
    try:
        from llama_cpp import Llama

        from cosmoforge.services.modelserver.llama import embedded_model_path

        with _quiet_stderr():  # llama.cpp warns about the context of a vocabulary-only load
            return Llama(model_path=str(embedded_model_path()), vocab_only=True, verbose=False)
    except (ImportError, RuntimeError, ValueError):
        return None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def plan_table(result: Any) -> Any:
    from rich.table import Table

    table = Table(title=f"cosmo plan: {result.run}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    table.add_column("", style="dim")
    rows: list[tuple[str, str, str]] = [
        ("prompts", f"{result.prompts:,}", "built from the seeds, as the run will")
    ]
    for title, counts in (
        ("source", result.by_source),
        ("audience", result.by_audience),
        ("style", result.by_style),
    ):
        rows += [(f"  {title}: {name}", f"{count:,}", "") for name, count in counts.items()]
    rows += [
        ("prompt tokens", f"{result.prompt_tokens:,}", result.prompt_tokens_source),
        ("completion tokens", f"{result.completion_tokens:,}", result.completion_source),
        ("tokens/s per GPU", _number(result.tokens_per_second_per_gpu), result.throughput_source),
        ("GPU-hours", _number(result.gpu_hours), f"{result.gpu}, generated tokens only"),
        ("wall time (hours)", _number(result.wall_hours), f"at replicas.max: {result.gpus} GPUs"),
        ("cost", _number(result.cost), _price(result.gpu_hour_price)),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.1f}" if value >= 100 else f"{value:.3g}"


def _price(price: float | None) -> str:
    return "pass --gpu-hour-price for a cost" if price is None else f"at {price:g} per GPU-hour"
