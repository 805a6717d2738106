"""`cosmo operator` (run the Kubernetes operator) and `cosmo render` (what it would create).

`cosmo render FILE` is to the operator what `helm template` is to a chart: every manifest the
operator would create for a spec, printed for review, for diffs and for offline validation.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("operator", help="run the Kubernetes operator for GenerationRuns")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", action="append", default=[], metavar="NS", help="watch this namespace (repeatable)"
    )
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--liveness", default=None, metavar="URL", help="e.g. http://0.0.0.0:8080/healthz")
    p.add_argument(
        "--metrics-port", type=int, default=0, help="serve the runs' cost and ETA gauges on /metrics (0: off)"
    )
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=operator)

    p = subparsers.add_parser("render", help="print every manifest the operator would create for a spec")
    p.add_argument("file")
    p.add_argument("--namespace", default=None, help="namespace to render into (default: the spec's)")
    p.add_argument(
        "--storage-uri",
        default=None,
        metavar="URI",
        help="where relative output.uri paths land (chart: storage.uri)",
    )
    p.set_defaults(func=render)


def operator(args: argparse.Namespace) -> int:
    import os

    import kopf

    import cosmoforge.operator.main  # noqa: F401  (reads the settings, registers the handlers)

    namespaces = list(args.namespace) or [
        ns for ns in os.environ.get("COSMO_WATCH_NAMESPACES", "").split(",") if ns
    ]
    kopf.configure(verbose=args.verbose)
    if args.metrics_port:
        from cosmoforge.generation.metrics import serve

        serve(args.metrics_port)
    kopf.run(
        clusterwide=args.all_namespaces or not namespaces,
        namespaces=namespaces,
        standalone=True,
        liveness_endpoint=args.liveness,
    )
    return 0


def render(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import yaml

    from cosmoforge.operator.render import Platform, RenderError, render_all
    from cosmoforge.spec.model import SpecError, load_run
    from cosmoforge.spec.validation import semantic_problems

    try:
        run = load_run(args.file)
        problems = semantic_problems(run)
        if problems:
            raise SpecError(args.file, problems)
    except SpecError as error:
        for field, reason in error.problems:
            print(f"{error.source}: {field}: {reason}", file=sys.stderr)
        return 1
    if args.namespace:
        run.metadata.namespace = args.namespace
    platform = Platform.from_env()
    if args.storage_uri:
        platform = replace(platform, output_base=args.storage_uri)
    try:
        manifests = render_all(run, platform)
    except RenderError as error:
        print(f"{args.file}: {error.field}: {error.reason}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(manifests, sort_keys=False))
    return 0
