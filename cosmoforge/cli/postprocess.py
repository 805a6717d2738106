"""Post-processing from the shell: `cosmo decontaminate`, `cosmo dedup`, `cosmo decontaminator`,
`cosmo decontaminate-submit` and `cosmo decontaminate-worker`.

The first two read a parquet/jsonl file or folder (local or any fsspec URI), write what they
keep and what they remove side by side under `--out`, and account for every row: nothing is
dropped without a row in `removed.parquet` saying why. The third serves the same check over
gRPC to documents as they are generated. The last two run a run's decontamination stage as
tasks on NATS JetStream for worker processes (`cosmoforge.postprocess.decontam.submit` and
`.worker`), with the same outputs. A problem with the input or the settings is a one-line
message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cosmoforge.cli.grpcauth import server_options, server_security
from cosmoforge.cli.options import RankError, add_rank, add_run_location, job_rank

DEFAULT_GROUP_FIELD = "seed_source"  # repeated from cosmoforge.postprocess.stages to keep --help import-light


def register(subparsers: Any) -> None:
    index = _index_options()
    log_format = argparse.ArgumentParser(add_help=False)
    log_format.add_argument("--log-format", choices=("text", "json"), default="text")
    _register_decontaminate(subparsers, index)
    _register_decontaminator(subparsers, index, log_format)
    _register_submit(subparsers)
    _register_worker(subparsers, log_format)
    _register_dedup(subparsers)


def _index_options() -> argparse.ArgumentParser:
    """The benchmark index settings, shared by every command that builds one from flags."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--benchmark",
        action="append",
        required=True,
        metavar="NAME|PATH|NAME=PATH",
        help="a known benchmark (mmlu, hellaswag, piqa, siqa, winogrande, openbookqa, arc_easy, "
        "arc_challenge, boolq), a local file, or NAME=PATH; repeat for several",
    )
    parent.add_argument("--ngram", type=int, default=10, help="candidate n-gram size in words (default: 10)")
    parent.add_argument(
        "--threshold", type=float, default=0.5, help="contaminated when ratio > this (default: 0.5)"
    )
    parent.add_argument(
        "--min-block-chars", type=int, default=5, help="count matching blocks longer than this (default: 5)"
    )
    return parent


def _add_columns(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    parser.add_argument(
        "--group-field",
        default=None,
        help=f"column naming each row's seed-data group (default: {DEFAULT_GROUP_FIELD}, if present)",
    )


def _register_decontaminate(subparsers: Any, index: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "decontaminate",
        parents=[index],
        help="remove documents that contain evaluation benchmark samples",
        description=(
            "Remove documents sharing an n-gram with a benchmark sample whose SequenceMatcher "
            "ratio exceeds the threshold; write kept.parquet, removed.parquet, report.json, report.md."
        ),
    )
    parser.add_argument("input", metavar="INPUT", help="parquet/jsonl file or folder, path or fsspec URI")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder, path or fsspec URI")
    _add_columns(parser)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    parser.set_defaults(func=run_decontaminate)


def _register_decontaminator(
    subparsers: Any, index: argparse.ArgumentParser, log_format: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser(
        "decontaminator",
        parents=[index, log_format, server_options(50052)],
        help="serve benchmark decontamination over gRPC (Check a stream of documents, Report)",
        description="Build the benchmark index once, then serve the Decontaminator gRPC service "
        "and the gRPC health service until SIGTERM/SIGINT.",
    )
    parser.add_argument("--workers", type=int, default=None, help="checking processes (default: every core)")
    parser.set_defaults(func=run_decontaminator)


def _register_submit(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "decontaminate-submit",
        help="queue a run's decontamination as tasks for decontaminate-worker processes",
        description="Cut the run's decontamination input (dedup/kept.parquet, or dataset/) into row "
        "ranges, one NATS JetStream task each, with the settings of the run's "
        "spec.postprocess.decontaminate; the workers write <run>/decontam/ as `cosmo decontaminate` "
        "does. Submitting again resumes: finished and queued ranges are not queued again, failed "
        "ones are. With --wait, a range whose worker died on each of its --max-deliver deliveries "
        "fails the command; the run's task stream is removed once the outputs are written.",
    )
    add_run_location(parser)
    parser.add_argument(
        "--nats", help="NATS URL (JetStream enabled); with --spawn, default: an embedded server"
    )
    parser.add_argument("--input", help="decontaminate this instead (default: what the previous stage kept)")
    _add_columns(parser)
    parser.add_argument(
        "--rows-per-task", type=int, default=20_000, help="rows per task at most (default: 20000)"
    )
    parser.add_argument(
        "--ack-wait",
        type=float,
        help="seconds before a dead worker's task goes to another (default: the stage queue's, 60; live "
        "workers heartbeat)",
    )
    parser.add_argument(
        "--max-deliver",
        type=int,
        help="deliveries of a task at most (default: the stage queue's, 10)",
    )
    parser.add_argument(
        "--replan", action="store_true", help="start over with a new plan even if one for this work exists"
    )
    parser.add_argument("--wait", action="store_true", help="wait until the workers have written the outputs")
    parser.add_argument(
        "--spawn",
        type=int,
        default=0,
        metavar="N",
        help="run N worker processes here until done (implies --wait)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="with --spawn: checking processes per worker (default: cores / N)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    parser.set_defaults(func=run_decontaminate_submit)


def _register_worker(subparsers: Any, log_format: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "decontaminate-worker",
        parents=[log_format],
        help="a decontamination worker: JetStream tasks -> checked ranges -> partial outputs",
        description="Pull a run's decontamination tasks one at a time, check each range on every core "
        "with the benchmark index built once, write its partial outputs, then ack; the worker that "
        "completes a plan queues the merge, which any worker performs. Stops on SIGTERM/SIGINT after "
        "the task in hand.",
    )
    parser.add_argument("--nats", required=True, help="NATS URL")
    parser.add_argument(
        "--run",
        required=True,
        help="run key (<namespace>/<name> for an operator run, else the name): names the task stream",
    )
    parser.add_argument(
        "--out", help="the run's output URI: build the index from <out>/<run>/spec.yaml before the first task"
    )
    parser.add_argument("--workers", type=int, default=None, help="checking processes (default: every core)")
    parser.add_argument("--worker-id")
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=0.0,
        help="exit after this many seconds without a task, counted from the first time the run's "
        "queue was found (0: never)",
    )
    parser.set_defaults(func=run_decontaminate_worker)


def _register_dedup(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dedup",
        help="remove exact and near duplicates (content hash + datatrove MinHash)",
        description="Remove exact duplicates, then near-duplicates with datatrove's MinHash; "
        "write kept.parquet, removed.parquet (with cluster ids) and counts.json.",
    )
    parser.add_argument("input", metavar="INPUT", help="parquet/jsonl file or folder, path or fsspec URI")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder, path or fsspec URI")
    parser.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    parser.add_argument("--ngram", type=int, default=5, help="MinHash word n-gram size (default: 5)")
    parser.add_argument("--buckets", type=int, default=14, help="MinHash bands (default: 14)")
    parser.add_argument("--hashes-per-bucket", type=int, default=8, help="hashes per band (default: 8)")
    parser.add_argument("--workers", type=int, default=1, help="processes for the MinHash steps (default: 1)")
    parser.add_argument("--no-exact", action="store_true", help="skip exact (content hash) dedup")
    parser.add_argument(
        "--step",
        # dedup_ranks.STEPS, spelled out so that --help does not import numpy and datatrove
        choices=("signatures", "buckets", "cluster", "filter", "finish"),
        help="run one rank of one step (an Indexed Job's pod) instead of everything here; steps hand "
        "their files on under OUT/.work/ and finish writes OUT's files (--workers is ignored)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks of this step: N for signatures and filter, --buckets for buckets, 1 for cluster and "
        "finish (default: those, N=1 for signatures and the signatures' N for filter)",
    )
    add_rank(parser, "--step")
    parser.set_defaults(func=run_dedup)


def _fail(command: str, error: Exception) -> int:
    print(f"cosmo {command}: error: {error}", file=sys.stderr)
    return 2


def run_decontaminate(args: argparse.Namespace) -> int:
    from cosmoforge.postprocess.stages import decontam, decontaminate_dataset

    try:
        config = decontam.Config(args.ngram, args.threshold, args.min_block_chars)
        if args.workers is not None and args.workers < 1:
            raise decontam.DecontamError(f"--workers must be at least 1, got {args.workers}")
        report = decontaminate_dataset(
            args.input, args.out, args.benchmark, config, args.text_field, args.group_field, args.workers
        )
    except (decontam.DecontamError, OSError) as error:
        return _fail("decontaminate", error)
    print(_summary_line(report, args.out))
    return 0


def run_decontaminator(args: argparse.Namespace) -> int:
    import asyncio

    from cosmoforge import logs
    from cosmoforge.postprocess.stages import decontam
    from cosmoforge.services import decontaminator as decontam_service
    from cosmoforge.services.grpcbase import CredentialsError

    logs.configure(args.log_format)
    try:
        security = server_security(args)
        config = decontam.Config(args.ngram, args.threshold, args.min_block_chars)
        _check_workers(args.workers)
        index = decontam_service.build_index(args.benchmark, config)
        serving = decontam_service.serve(index, args.port, args.host, workers=args.workers, security=security)
        asyncio.run(serving)
    except (decontam.DecontamError, CredentialsError, OSError) as error:  # bad benchmark, setting, port
        return _fail("decontaminator", error)
    return 0


def _check_workers(workers: int | None, flag: str = "--workers") -> None:
    from cosmoforge.postprocess.decontam import DecontamError

    if workers is not None and workers < 1:
        raise DecontamError(f"{flag} must be at least 1, got {workers}")


def _summary_line(report: dict[str, Any], out: str) -> str:
    per_benchmark = ", ".join(
        f"{name} {entry['removed']} ({entry['unique_items']})" for name, entry in report["benchmarks"].items()
    )
    return (
        f"{report['documents']} documents: kept {report['documents_kept']}, "
        f"removed {report['documents_removed']} "
        f"[{per_benchmark}]; {report['near_miss_count']} near-misses; wrote {out}"
    )


def run_decontaminate_submit(args: argparse.Namespace) -> int:
    import asyncio

    from cosmoforge.postprocess import decontam
    from cosmoforge.postprocess.decontam import plan as plans
    from cosmoforge.postprocess.decontam import submit, tasks
    from cosmoforge.queue.topology import DECONTAM_ACK_WAIT_SECONDS, DECONTAM_MAX_DELIVER

    if args.ack_wait is None:
        args.ack_wait = DECONTAM_ACK_WAIT_SECONDS
    if args.max_deliver is None:
        args.max_deliver = DECONTAM_MAX_DELIVER
    try:
        _check_workers(args.workers)
        if args.spawn < 0:
            raise decontam.DecontamError(f"--spawn must be at least 0, got {args.spawn}")
        if not args.spawn and not args.nats:
            raise decontam.DecontamError("--nats is needed unless --spawn starts workers here")
        plan = plans.store_plan(
            plans.plan_for_run(
                args.out, args.run, args.input, args.text_field, args.group_field, args.rows_per_task
            ),
            replace=args.replan,
        )
        if plans.is_done(plan):
            if args.nats:  # a submitter stopped before it removed the stage's stream
                asyncio.run(tasks.remove_stream_at(args.nats, args.run))
            print(f"already decontaminated: {plan.out}")
            return 0
        if args.spawn:
            print(f"{len(plan.tasks)} tasks over {plan.documents} documents; {args.spawn} local workers")
            report = submit.run_local(
                plan,
                args.run,
                args.spawn,
                args.nats,
                args.workers,
                args.timeout,
                args.ack_wait,
                args.max_deliver,
            )
            print(_summary_line(report, plan.out))
            return 0
        submitted = asyncio.run(submit.submit(args.nats, args.run, plan, args.ack_wait, args.max_deliver))
        plan = submitted.plan
        requeued = f" ({submitted.requeued} given up before)" if submitted.requeued else ""
        print(
            f"plan {plan.nonce}: {len(plan.tasks)} tasks over {plan.documents} documents; "
            f"{submitted.published} queued now{requeued}, {submitted.queued} already queued, "
            f"{submitted.finished} already done"
        )
        if args.wait:
            report = submit.wait_done(plan, args.timeout, nats_url=args.nats, run=args.run)
            print(_summary_line(report, plan.out))
    except (decontam.DecontamError, OSError, TimeoutError) as error:
        return _fail("decontaminate-submit", error)
    return 0


def run_decontaminate_worker(args: argparse.Namespace) -> int:
    import asyncio

    from cosmoforge import logs
    from cosmoforge.postprocess import decontam
    from cosmoforge.postprocess.decontam import plan as plans
    from cosmoforge.postprocess.decontam import worker

    logs.configure(args.log_format)
    try:
        _check_workers(args.workers)
        settings = None
        if args.out:
            settings = plans.settings_of(plans.read_spec(args.out, args.run))
        config = worker.WorkerConfig(args.nats, args.run, processes=args.workers, idle_exit=args.idle_exit)
        if args.worker_id:
            config.worker_id = args.worker_id
        asyncio.run(worker.run_worker(config, settings))
    except (decontam.DecontamError, OSError) as error:
        return _fail("decontaminate-worker", error)
    return 0


def run_dedup(args: argparse.Namespace) -> int:
    from cosmoforge.postprocess import dedup, dedup_ranks
    from cosmoforge.postprocess.stages import dedup_dataset
    from cosmoforge.tables import TableError

    try:
        config = dedup.DedupConfig(
            ngram=args.ngram,
            buckets=args.buckets,
            hashes_per_bucket=args.hashes_per_bucket,
            exact=not args.no_exact,
        )
        if args.workers < 1:
            raise dedup.DedupError(f"--workers must be at least 1, got {args.workers}")
        if args.step:
            rank = job_rank(args.rank)
            counts = dedup_ranks.run_step(
                args.step, args.input, args.out, config, rank, args.world_size, args.text_field
            )
            if args.step != "finish":
                print(f"dedup {args.step}: rank {rank} of {counts['world_size']} done; wrote {args.out}")
                return 0
        else:
            counts = dedup_dataset(args.input, args.out, config, args.text_field, args.workers)
    except (TableError, dedup.DedupError, RankError, OSError) as error:
        return _fail("dedup", error)
    print(
        f"{counts['documents']} documents: kept {counts['kept']}, "
        f"removed {counts['removed_exact']} exact and "
        f"{counts['removed_minhash']} near duplicates in {counts['clusters']} clusters; wrote {args.out}"
    )
    return 0
