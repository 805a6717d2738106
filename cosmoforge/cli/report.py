"""`cosmo report RUN_URI --out report.html`: a run's page as one file that opens offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="write a run's page (progress, cost, samples) as one HTML file")
    p.add_argument("run", help="the run's folder or URI: <output.uri>/<run-name>")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--samples", type=int, default=300, help="documents in the sample browser")
    p.add_argument("--gpu-hour-price", type=float, help="price of one GPU-hour, for the cost")
    p.set_defaults(func=report)


def report(args: argparse.Namespace) -> int:
    from cosmoforge.report.data import collect
    from cosmoforge.report.page import render_page
    from cosmoforge.storage import RunStore

    parent, _, name = args.run.rstrip("/").rpartition("/")
    store = RunStore.open(parent or ".", name)
    if store.read_text("spec.yaml") is None:
        print(f"cosmo report: {args.run} is not a run folder (no spec.yaml)", file=sys.stderr)
        return 2
    if args.samples < 0:
        print("cosmo report: --samples must not be negative", file=sys.stderr)
        return 2
    data = collect(store, samples=args.samples, gpu_hour_price=args.gpu_hour_price)
    data["uri"] = args.run  # as the user names it: a report may be opened on another machine
    page = render_page(data)
    Path(args.out).write_text(page, encoding="utf-8")
    print(f"report of {store.uri} written to {args.out} ({len(page.encode()) / 1e6:.1f} MB)")
    return 0
