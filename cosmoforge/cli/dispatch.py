"""Commands for generation as services: serve the dispatcher, submit a spec to one, follow runs.

`cosmo run` does everything in one process tree on one machine; these commands split the same
path the way a cluster runs it — a dispatcher service that owns the queue, generator workers
(`cosmo worker`) that drain it, and clients that start and watch runs over gRPC.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cosmoforge.cli.grpcauth import client_options, client_security, server_options, server_security

T = TypeVar("T")


def register(subparsers: Any) -> None:
    client = client_options()
    p = subparsers.add_parser(
        "dispatcher",
        parents=[server_options(50051)],
        help="serve the dispatcher: specs in over gRPC, prompts to NATS",
    )
    p.add_argument("--nats", required=True, help="NATS URL (JetStream enabled)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    p.add_argument("--ui-port", type=int, help="serve each run's page over HTTP on this port (default: off)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--no-compact", action="store_true", help="leave compaction to a later stage")
    p.add_argument("--wandb", action="store_true", help="log run progress to wandb (offline) if installed")
    p.add_argument(
        "--ack-wait",
        type=float,
        help="seconds before a dead worker's prompts are redelivered (default: the queue's, 30)",
    )
    p.set_defaults(func=dispatcher)

    p = subparsers.add_parser("submit", parents=[client], help="start (or resume) a run on a dispatcher")
    p.add_argument("file", help="GenerationRun YAML")
    p.add_argument("--dispatcher", required=True, metavar="HOST:PORT")
    p.add_argument("--watch", action="store_true", help="follow the run until it ends")
    p.set_defaults(func=submit)

    p = subparsers.add_parser("runs", parents=[client], help="list the runs a dispatcher knows")
    p.add_argument("--dispatcher", required=True, metavar="HOST:PORT")
    p.set_defaults(func=runs)

    p = subparsers.add_parser("cancel", parents=[client], help="cancel a run on a dispatcher")
    p.add_argument("run", help="the run's key as `cosmo runs` lists it: <namespace>/<name>, or <name>")
    p.add_argument("--dispatcher", required=True, metavar="HOST:PORT")
    p.set_defaults(func=cancel)


def dispatcher(args: argparse.Namespace) -> int:
    from cosmoforge import logs
    from cosmoforge.queue.topology import ACK_WAIT_SECONDS
    from cosmoforge.services.dispatcher.server import main
    from cosmoforge.services.grpcbase import CredentialsError

    logs.configure(args.log_format)
    try:
        security = server_security(args)
    except CredentialsError as error:
        print(f"cosmo dispatcher: error: {error}", file=sys.stderr)
        return 2
    return main(
        args.nats,
        args.port,
        args.host,
        metrics_port=args.metrics_port,
        compact=not args.no_compact,
        use_wandb=args.wandb,
        ack_wait=ACK_WAIT_SECONDS if args.ack_wait is None else args.ack_wait,
        ui_port=args.ui_port,
        security=security,
    )


def status_line(status: dict[str, Any]) -> str:
    line = (
        f"{status['run']}: {status['phase']} {status['generated']}/{status['prompts']} generated, "
        f"{status['failed']} failed, {status['queued']} queued, {status['tokens_per_second']:.1f} tok/s"
    )
    return f"{line} - {status['message']}" if status.get("message") else line


def _exit_code(status: dict[str, Any]) -> int:
    """Like `cosmo run`: 3 when prompts failed, and 4 for a cancelled run."""
    codes = {"Succeeded": 0 if status["failed"] == 0 else 3, "Failed": 3, "Cancelled": 4}
    return codes.get(status["phase"], 0)


def submit(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from cosmoforge.services.dispatcher.client import DispatcherClient, DispatcherError
    from cosmoforge.services.grpcbase import CredentialsError

    try:
        security = client_security(args)
    except CredentialsError as error:
        print(f"dispatcher: {error}", file=sys.stderr)
        return 1

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except OSError as error:
        print(f"{args.file}: {error.strerror or error}", file=sys.stderr)
        return 1

    async def go() -> int:
        async with DispatcherClient(args.dispatcher, security=security) as client:
            status = await client.start_run(text)
            print(status_line(status), flush=True)
            if not args.watch:
                return 0
            async for event in client.watch(status["run"]):
                if event["reason"] != "heartbeat":
                    print(status_line(event), flush=True)
                status = event
            return _exit_code(status)

    try:
        return asyncio.run(go())
    except DispatcherError as error:
        for field, reason in error.problems:
            print(f"{args.file}: {field}: {reason}", file=sys.stderr)
        if not error.problems:
            print(f"dispatcher: {error}", file=sys.stderr)
        return 1


def _call(args: argparse.Namespace, call: Callable[[Any], Awaitable[T]]) -> T:
    """`call` with a client of `--dispatcher`, its token and TLS from the flags or the
    environment; raises CredentialsError or DispatcherError, which the commands print."""
    import asyncio

    from cosmoforge.services.dispatcher.client import DispatcherClient

    security = client_security(args)

    async def go() -> T:
        async with DispatcherClient(args.dispatcher, security=security) as client:
            return await call(client)

    return asyncio.run(go())


def runs(args: argparse.Namespace) -> int:
    from cosmoforge.services.dispatcher.client import DispatcherError
    from cosmoforge.services.grpcbase import CredentialsError

    try:
        statuses: list[dict[str, Any]] = _call(args, lambda client: client.list_runs())
    except (CredentialsError, DispatcherError) as error:
        print(f"dispatcher: {error}", file=sys.stderr)
        return 1
    for status in statuses:
        print(status_line(status))
    return 0


def cancel(args: argparse.Namespace) -> int:
    from cosmoforge.services.dispatcher.client import DispatcherError
    from cosmoforge.services.grpcbase import CredentialsError

    try:
        status: dict[str, Any] = _call(args, lambda client: client.cancel(args.run))
    except (CredentialsError, DispatcherError) as error:
        print(f"dispatcher: {error}", file=sys.stderr)
        return 1
    print(status_line(status))
    return 0
