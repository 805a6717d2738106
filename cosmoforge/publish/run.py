"""Publish one run: its final documents and their card, from the run's folder to a Hub repo.

`cosmo push` and the operator's publish Job both end here. What to publish is the run's stage
chain's answer (`final_data`: what the last data stage kept), the card's dedup and
decontamination sections are what those stages wrote beside their kept files, and a record of
the push lands in the run's `publish/` folder.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from cosmoforge.publish import card as cards
from cosmoforge.publish.files import DATA, ROWS_PER_FILE, StagedData, stage_data
from cosmoforge.publish.hub import BYTES_PER_COMMIT, CARD, FILES_PER_COMMIT, Pushed, describe, push
from cosmoforge.runs.stages import PUBLISH, StageDisabled, StageName, final_data, stage
from cosmoforge.spec.model import GenerationRun, parse_run
from cosmoforge.storage import RunStore

RECORD = f"{PUBLISH}/hub.json"


class PublishError(ValueError):
    """A push that cannot start as asked (no run there, no repo named, no token); one line."""


@dataclass(frozen=True)
class Settings:
    repo: str | None = None  # default: spec.output.hub.repo
    private: bool | None = None  # default: spec.output.hub.private, else public
    token: str | None = None  # default: HF_TOKEN, else the token `hf auth login` stored
    rows_per_file: int = ROWS_PER_FILE
    files_per_commit: int = FILES_PER_COMMIT
    bytes_per_commit: int = BYTES_PER_COMMIT


def open_run(run_uri: str) -> tuple[RunStore, GenerationRun, str]:
    """The run's store, its spec as it ran, and that spec's text."""
    parent, _, name = run_uri.rstrip("/").rpartition("/")
    store = RunStore.open(parent or ".", name)
    text = store.read_text("spec.yaml")
    if text is None:
        raise PublishError(f"{run_uri} is not a run folder (no spec.yaml)")
    return store, parse_run(yaml.safe_load(text), f"{run_uri}/spec.yaml"), text


def _written(store: RunStore, run: GenerationRun, name: StageName, file: str) -> str | None:
    """A file a stage wrote in its output folder, when the spec ran that stage."""
    try:
        folder = stage(run.spec, name)
    except StageDisabled:
        return None
    return store.read_text(f"{folder.output}/{file}")


def render(repo: str, store: RunStore, run: GenerationRun, spec_text: str, staged: StagedData) -> str:
    dedup = _written(store, run, "dedup", "counts.json")
    return cards.render_card(
        cards.Card(
            repo=repo,
            run=run.name,
            spec_yaml=spec_text,
            configs=list(staged.configs.values()),
            columns=[(field.name, str(field.type)) for field in staged.schema],
            dedup=json.loads(dedup) if dedup else None,
            decontamination=_written(store, run, "decontaminate", "report.md"),
        )
    )


def _token(settings: Settings) -> str:
    if settings.token:
        return settings.token
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN to a token that may write to the repo")
    return token


def publish_run(run_uri: str, settings: Settings, workdir: str | None = None) -> Pushed:
    """Push the run's final documents (one config per seed source) and card to the Hub repo.

    The data files are written to a temporary folder first (under `workdir`): the push needs
    their hashes before it decides what to upload. Rerun after a failure, it uploads only the
    files the repo does not already hold."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    store, run, spec_text = open_run(run_uri)
    hub = run.spec.output.hub
    repo = settings.repo or (hub.repo if hub is not None else None)
    if not repo:
        raise PublishError("no repo to publish to: name one (--repo) or set spec.output.hub.repo")
    if "/" not in repo:
        raise PublishError(f"repo {repo!r}: name it <owner>/<name>")
    validate_repo_id(repo)  # before the documents are split: a bad name fails at once
    private = settings.private if settings.private is not None else bool(hub is not None and hub.private)
    token = _token(settings)
    final = final_data(run.spec)
    with tempfile.TemporaryDirectory(prefix="cosmo-push-", dir=workdir) as folder:
        staged = stage_data(store.url(final), Path(folder), settings.rows_per_file)
        readme = Path(folder) / CARD
        readme.write_text(render(repo, store, run, spec_text, staged), encoding="utf-8")
        local = [describe(name, Path(folder) / name) for c in staged.configs.values() for name in c.files]
        local.append(describe(CARD, readme))
        pushed = push(
            HfApi(token=token),  # the Hub at HF_ENDPOINT, else huggingface.co
            repo,
            local,
            private=private,
            owned=DATA,
            title=f"cosmoforge: publish run {run.name}",
            files_per_commit=settings.files_per_commit,
            bytes_per_commit=settings.bytes_per_commit,
        )
    store.write_text(RECORD, json.dumps(pushed.as_dict() | {"run": run.name, "data": final}, indent=2))
    return pushed
