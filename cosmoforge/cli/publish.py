"""`cosmo push RUN_URI --repo ID [--private]`: publish a run's final dataset and card on the Hub.

The token comes from HF_TOKEN (the operator's publish Job sets it from the spec's Secret) or
from `hf auth login`; it is never an argument, so it never shows in a process list or a Job.
HF_ENDPOINT points it at another Hub, as it does every Hugging Face tool.
Bad input (no run there, no repo, no token, a token the Hub refuses) exits 2, which fails the
Job at once; a Hub or network failure exits 1, and running the command again resumes the push.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

USER_ERROR = 2
FAILED = 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "push",
        aliases=["publish"],  # the name of the run's stage, which its Job runs
        help="publish a run's final dataset (one config per seed source) and its card on the Hub",
    )
    p.add_argument("run", help="the run's folder or URI: <output.uri>/<run-name>")
    p.add_argument("--repo", help="dataset repo id <owner>/<name> (default: spec.output.hub.repo)")
    p.add_argument(
        "--private",
        action="store_true",
        default=None,
        help="create the repo private (default: spec.output.hub.private, else public)",
    )
    p.add_argument("--rows-per-file", type=int, default=100_000, help="documents per parquet file")
    p.add_argument("--files-per-commit", type=int, default=50, help="files per commit")
    p.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    import logging

    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import disable_progress_bars
    from requests import RequestException

    from cosmoforge import logs
    from cosmoforge.publish.run import Settings, publish_run
    from cosmoforge.spec.model import SpecError
    from cosmoforge.tables import TableError

    logs.configure("text")
    logging.getLogger("huggingface_hub").setLevel(logging.WARNING)
    disable_progress_bars()  # one line per commit in a Job's log, not a bar per file
    settings = Settings(
        repo=args.repo,
        private=args.private,
        rows_per_file=args.rows_per_file,
        files_per_commit=args.files_per_commit,
    )
    try:
        pushed = publish_run(args.run, settings)
    except SpecError as error:
        print(f"cosmo push: {str(error).splitlines()[0]}", file=sys.stderr)
        return USER_ERROR
    except (ValueError, TableError) as error:  # PublishError, NothingToPublish, a bad repo id
        print(f"cosmo push: {error}", file=sys.stderr)
        return USER_ERROR
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        print(f"cosmo push: the Hub refused: {str(error).splitlines()[0]}", file=sys.stderr)
        return USER_ERROR if status in (401, 403) else FAILED
    except RequestException as error:
        print(f"cosmo push: cannot reach the Hub: {error}", file=sys.stderr)
        return FAILED
    except RuntimeError as error:  # huggingface_hub wraps a failed upload, naming the file
        cause = f": {error.__cause__}" if error.__cause__ is not None else ""
        print(f"cosmo push: {error}{cause}", file=sys.stderr)
        return FAILED
    print(
        f"{pushed.repo} at {pushed.commit}: {len(pushed.uploaded)} files uploaded in {pushed.commits} "
        f"commits, {len(pushed.unchanged)} already there, {len(pushed.deleted)} deleted"
    )
    return 0
