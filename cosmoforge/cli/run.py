"""Core commands: validate, crd, prompts, run, worker, serve-model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cosmoforge.cli.options import add_run_location


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("validate", help="check a GenerationRun file; one line per problem")
    p.add_argument("file")
    p.set_defaults(func=validate)

    p = subparsers.add_parser("crd", help="write the GenerationRun CRD generated from the spec model")
    p.add_argument("--out", help="file to write (default: stdout)")
    p.set_defaults(func=crd)

    p = subparsers.add_parser("prompts", help="build a run's prompts without generating")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="folder or URI for prompts parquet")
    p.add_argument("--limit", type=int, help="stop after this many prompts")
    p.set_defaults(func=prompts)

    p = subparsers.add_parser("stats", help="duplication and opening diversity of generated documents")
    p.add_argument("dataset", help="a dataset folder, a run folder, or a parquet file (local or URI)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=stats)

    p = subparsers.add_parser("run", help="run a spec end to end on this machine (embedded mode)")
    p.add_argument("file")
    p.add_argument("--out", help="output folder or URI (default: spec.output.uri)")
    p.add_argument(
        "--ui", type=int, nargs="?", const=0, metavar="PORT",
        help="serve the run's page on 127.0.0.1 while it generates (no PORT: any free port)",
    )  # fmt: skip
    p.set_defaults(func=run)

    p = subparsers.add_parser("worker", help="a generator worker: JetStream -> inference -> shards")
    p.add_argument("--nats", required=True, help="NATS URL")
    add_run_location(p)
    p.add_argument("--endpoint", required=True, help="inference server base URL")
    p.add_argument("--worker-id")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.set_defaults(func=worker)

    from cosmoforge.services.modelserver.serve import add_arguments as add_model_server_arguments

    p = subparsers.add_parser("serve-model", help="serve the embedded model with TGI's and OpenAI's APIs")
    add_model_server_arguments(p)
    p.set_defaults(func=serve_model)


def _load(path: str) -> Any:
    from cosmoforge.spec.model import SpecError
    from cosmoforge.spec.validation import load_file

    try:
        return load_file(path)
    except SpecError as error:
        for field, reason in error.problems:
            print(f"{error.source}: {field}: {reason}", file=sys.stderr)
        return None


def validate(args: argparse.Namespace) -> int:
    run = _load(args.file)
    if run is None:
        return 1
    print(f"{args.file}: valid GenerationRun {run.name!r} ({len(run.spec.seeds)} seed sources)")
    return 0


def crd(args: argparse.Namespace) -> int:
    from cosmoforge.spec.crd import crd_yaml

    text = crd_yaml()
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def prompts(args: argparse.Namespace) -> int:
    import itertools

    from cosmoforge.prompts.builder import build_prompts
    from cosmoforge.prompts.manifest import write_prompts
    from cosmoforge.prompts.seeds import SeedError
    from cosmoforge.storage import RunStore

    run = _load(args.file)
    if run is None:
        return 1
    store = RunStore(*_fs_root(args.out))
    try:
        count = write_prompts(store, itertools.islice(build_prompts(run), args.limit))
    except SeedError as error:
        print(f"seed error: {error}", file=sys.stderr)
        return 2
    summary = write_prompt_stats(store)
    print(f"{count} prompts written to {store.url('prompts')}; stats in {store.url('stats.json')}")
    print(
        json.dumps({k: summary[k] for k in ("seed_source", "style", "audience", "topic_conditioned_share")})
    )
    return 0


def write_prompt_stats(store: Any) -> dict[str, Any]:
    """stats.json and distributions.png beside the prompts folder."""
    import tempfile

    from cosmoforge.postprocess.stats import plot_distributions, prompt_stats
    from cosmoforge.storage import PROMPTS

    table = store.read_folder(PROMPTS)
    summary = prompt_stats(table)
    store.write_text("stats.json", json.dumps(summary, indent=2))
    with tempfile.TemporaryDirectory() as folder:
        plot_distributions(summary, f"{folder}/distributions.png")
        store.write_bytes("distributions.png", Path(f"{folder}/distributions.png").read_bytes())
    return summary


def stats(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cosmoforge.postprocess.stats import StatsError, dataset_stats, stats_table

    try:
        summary = dataset_stats(args.dataset, args.text_field)
    except StatsError as error:
        print(f"stats: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        Console().print(stats_table(summary, title=args.dataset))
    return 0


def _fs_root(uri: str) -> tuple[Any, str, str]:
    import os

    from fsspec.core import url_to_fs

    uri = uri if "://" in uri else os.path.abspath(uri)
    fs, root = url_to_fs(uri)
    return fs, root.rstrip("/"), uri.rstrip("/")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cosmoforge.cli.embedded import run_embedded, summary_table
    from cosmoforge.prompts.seeds import SeedError

    spec = _load(args.file)
    if spec is None:
        return 1
    from cosmoforge.postprocess.decontam import DecontamError
    from cosmoforge.postprocess.dedup import DedupError
    from cosmoforge.publish.run import PublishError
    from cosmoforge.tables import TableError
    from cosmoforge.training import TrainingError

    console = Console(stderr=True)
    try:
        summary = run_embedded(spec, args.out, console, ui_port=args.ui)
    except SeedError as error:
        # Plain print: rich would wrap the path at the terminal width.
        print(f"seed error: {error}", file=sys.stderr)
        return 2
    except (DedupError, DecontamError, TableError, TrainingError, PublishError) as error:
        print(f"{type(error).__name__}: {error} (generated data is kept; rerun to resume)", file=sys.stderr)
        return 2
    console.print(summary_table(summary))
    if summary.stats is not None:
        from cosmoforge.postprocess.stats import stats_table

        console.print(stats_table(summary.stats, title=f"{summary.run} documents"))
    print(f"{summary.output}/dataset")
    return 0 if summary.succeeded else 3


def worker(args: argparse.Namespace) -> int:
    import asyncio

    import yaml

    from cosmoforge import logs
    from cosmoforge.generation import metrics
    from cosmoforge.generation.worker import WorkerConfig, run_worker
    from cosmoforge.queue.pull import NatsAuthError
    from cosmoforge.spec.model import parse_run
    from cosmoforge.storage import RunStore

    logs.configure(args.log_format)
    metrics.serve(args.metrics_port)
    store = RunStore.open(args.out, args.run)
    text = store.read_text("spec.yaml")
    if text is None:
        print(f"no spec.yaml under {store.uri}", file=sys.stderr)
        return 2
    spec = parse_run(yaml.safe_load(text), store.url("spec.yaml"))
    config = WorkerConfig(
        nats_url=args.nats,
        run=args.run,
        output_uri=args.out,
        endpoint=args.endpoint,
        generation=spec.spec.generation,
    )
    if args.worker_id:
        config.worker_id = args.worker_id
    try:
        asyncio.run(run_worker(config))
    except NatsAuthError as error:  # the same credentials fail every time: say so once and stop
        print(f"cosmo worker: error: {error}", file=sys.stderr)
        return 2
    return 0


def serve_model(args: argparse.Namespace) -> int:
    from cosmoforge.services.modelserver.serve import serve

    return serve(args)
