"""Arguments that more than one command group takes, defined once: number types, the run a
process works for, and the rank of a pod of an Indexed Job."""

from __future__ import annotations

import argparse
import os


class RankError(ValueError):
    """The pod's rank cannot be known."""


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def add_run_location(parser: argparse.ArgumentParser) -> None:
    """--out and --run: where a run's files are and which run, its spec read from there."""
    parser.add_argument("--out", required=True, help="the run's output URI (parent of the run folder)")
    parser.add_argument(
        "--run",
        required=True,
        help="run key (<namespace>/<name> for an operator run, else the name); "
        "the spec is read from <out>/<run>/spec.yaml",
    )


def add_rank(parser: argparse.ArgumentParser, step: str) -> None:
    parser.add_argument(
        "--rank",
        type=non_negative,
        default=None,
        metavar="R",
        help=f"this rank, 0..N-1, for {step} (default: $JOB_COMPLETION_INDEX, else 0)",
    )


def job_rank(given: int | None) -> int:
    """--rank, else the index Kubernetes gives each pod of an Indexed Job, else 0."""
    if given is not None:
        return given
    index = os.environ.get("JOB_COMPLETION_INDEX", "0")
    if not index.isdigit():
        raise RankError(f"JOB_COMPLETION_INDEX={index!r} is not a rank: pass --rank")
    return int(index)
