"""`cosmo compact RUN_ROOT`: a run's generation shards -> its dataset, from storage alone.

The run drivers compact at the end of a run; this command does it for a run folder on its own
(a run whose driver died, shards copied from elsewhere, a new `--rows-per-file`). Memory stays
about one bucket of rows whatever the run's size (`cosmoforge.generation.compact`). Bad input
(no shards, a truncated shard, one without the needed columns, an unreadable spec) is one line
naming the file and exit code 2, before anything in `dataset/` is touched.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cosmoforge.storage import RunStore


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compact",
        help="compact a run's generation shards into its dataset (one row per prompt, memory-bounded)",
        description="Keep the earliest completion of each prompt of the run's manifest (every prompt "
        "if it has none), write dataset/data-*.parquet sorted by prompt id with its README card and "
        "failed.parquet, and replace the old dataset only once the new one is whole.",
    )
    p.add_argument("run", metavar="RUN_ROOT", help="the run's folder or URI: <output.uri>/<run-name>")
    p.add_argument(
        "--rows-per-file", type=int, default=None, help="documents per dataset file (default: 100000)"
    )
    p.set_defaults(func=compact)


def compact(args: argparse.Namespace) -> int:
    from cosmoforge.generation.compact import CompactError, compact_run
    from cosmoforge.storage import DATASET, RunStore

    parent, _, folder = args.run.rstrip("/").rpartition("/")
    try:
        if args.rows_per_file is not None and args.rows_per_file < 1:
            raise CompactError(f"--rows-per-file must be at least 1, got {args.rows_per_file}")
        store = RunStore.open(parent or ".", folder)
        _check_shards(store)
        spec_yaml = store.read_text("spec.yaml") or ""
        run_name = _run_name(store, spec_yaml) or folder
        result = compact_run(store, run_name, spec_yaml, args.rows_per_file)
    except (CompactError, OSError) as error:
        print(f"cosmo compact: error: {error}", file=sys.stderr)
        return 2
    print(
        f"{result.rows} documents, {result.duplicates_dropped} duplicates dropped, "
        f"{result.failures} failures, {len(result.files)} files in {store.url(DATASET)}"
    )
    return 0


def _check_shards(store: RunStore) -> None:
    from cosmoforge.generation.compact import CompactError
    from cosmoforge.storage import GENERATIONS

    if not store.fs.exists(store.path(GENERATIONS)):
        raise CompactError(f"{store.url(GENERATIONS)}: no such folder, so no generation shards to compact")
    if not store.list_parquet(GENERATIONS):
        raise CompactError(f"{store.url(GENERATIONS)}: no generation shards (*.parquet) in this folder")


def _run_name(store: RunStore, spec_yaml: str) -> str | None:
    """`metadata.name` of the run's spec, if it names one."""
    import yaml

    from cosmoforge.generation.compact import CompactError
    from cosmoforge.spec.safe_yaml import load_documents

    try:
        documents = list(load_documents(spec_yaml))
    except yaml.YAMLError as error:
        raise CompactError(f"{store.url('spec.yaml')}: not a readable spec ({error})") from error
    metadata = documents[0].get("metadata") if documents and isinstance(documents[0], dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) and name else None
