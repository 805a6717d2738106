"""Publishing a run to the Hub: `cosmo push` and the operator's publish stage.

The real Hugging Face Hub cannot be reached from the test machine, so these tests push with
the real `huggingface_hub` client to `tests/hubserver.py`, a local server that stands in for
the Hub and speaks the same HTTP calls (repo create, repo info, tree listing, preupload, git-LFS
batch and upload, ndjson commits), keeping what it receives on disk. The run pushed is made by
the real stages: generation shards compacted into the dataset, dedup, then decontamination
against a local benchmark file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import huggingface_hub
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from hubserver import HubServer
from huggingface_hub import DatasetCard
from huggingface_hub.errors import HfHubHTTPError

from conftest import COSMO, small_run
from cosmoforge.cli.main import build_parser
from cosmoforge.generation.compact import compact_dataset
from cosmoforge.operator.render import Platform, stages
from cosmoforge.operator.render.jobs import stage_job
from cosmoforge.postprocess import decontam, evalsets
from cosmoforge.postprocess.decontam import cache
from cosmoforge.postprocess.dedup import DedupConfig
from cosmoforge.postprocess.stages import decontaminate_dataset, dedup_dataset
from cosmoforge.publish.files import stage_data
from cosmoforge.publish.hub import CARD, LocalFile, RemoteFile, plan_push
from cosmoforge.publish.run import RECORD, Settings, publish_run
from cosmoforge.runs.stages import final_data, post_stages
from cosmoforge.spec import records
from cosmoforge.spec.model import Phase, dump_run, parse_run
from cosmoforge.storage import RunStore

TOKEN = "hf_" + "StandInHubToken0123456789abcdef"
REPO = "cosmo-tester/tiny-pub"
BENCHMARK = str(Path(__file__).parents[1] / "data" / "benchmarks" / "piqa.jsonl")
WORDS = "soil seedlings frost spring river valley engine circuit theorem proof orbit comet".split()
SOURCES = {"web": "web", "math": "math"}


def run_document() -> dict[str, Any]:
    document = small_run("pub")
    document["spec"]["postprocess"] = {"decontaminate": {"enabled": True, "benchmarks": [BENCHMARK]}}
    document["spec"]["output"] = {"hub": {"repo": REPO}}
    return document


def write_run(root: Path) -> RunStore:
    """A finished run as the stages leave it: dataset/, dedup/ and decontam/ with their reports."""
    run = parse_run(run_document())
    spec_yaml = dump_run(run)
    store = RunStore.open(str(root), run.name)
    store.write_text("spec.yaml", spec_yaml)
    rng = random.Random(7)
    items = evalsets.load_benchmarks([BENCHMARK])
    now = datetime(2026, 1, 1, tzinfo=UTC)
    rows: list[dict[str, Any]] = []
    for number in range(90):
        source = rng.choice(list(SOURCES))
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(40, 80)))
        if number % 15 == 0:
            words += " " + items[number % len(items)].text  # contaminated: decontamination removes it
        if number % 20 == 1:
            words = rows[-1]["text"]  # an exact duplicate: dedup removes it
        rows.append(
            {
                "prompt_id": f"{number:04d}" + "ab" * 6,
                "run": run.name,
                "seed_source": source,
                "seed_kind": SOURCES[source],
                "seed_id": str(number),
                "audience": rng.choice(["young_children", "researchers", "college_students"]),
                "style": rng.choice(["textbook", "blog_post"]),
                "template_id": SOURCES[source],
                "template_version": "1",
                "prompt": f"write about {number}",
                "text": words,
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "engine": "embedded",
                "sampling": "{}",
                "prompt_tokens": 20,
                "completion_tokens": len(words.split()),
                "finish_reason": "length",
                "started_at": now,
                "finished_at": now,
                "worker": "w0",
                "attempt": 1,
            }
        )
    store.write_table("generations/w0-0.parquet", pa.Table.from_pylist(rows, schema=records.GENERATIONS))
    compact_dataset(store, run.name, spec_yaml, [row["prompt_id"] for row in rows])
    dedup_dataset(store.url("dataset"), store.url("dedup"), DedupConfig())
    decontaminate_dataset(
        store.url("dedup/kept.parquet"), store.url("decontam"), [BENCHMARK], decontam.Config()
    )
    return store


@pytest.fixture(scope="module")
def run_store(tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cache.ENV, str(tmp_path_factory.mktemp("index-cache")))
        return write_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # conftest makes the process offline for the Hub; these tests talk to the stand-in only.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.utils.reset_sessions()
    yield
    huggingface_hub.utils.reset_sessions()


@contextlib.contextmanager
def stand_in_hub(root: Path, page_size: int = 1000) -> Iterator[HubServer]:
    """The stand-in Hub, and huggingface_hub pointed at it as HF_ENDPOINT would."""
    with HubServer(root, TOKEN, page_size=page_size) as server, pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        yield server


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with stand_in_hub(tmp_path / "hub", page_size=4) as server:  # small pages: the client follows Link
        yield server


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"token": TOKEN, "rows_per_file": 9, "files_per_commit": 2}
    return Settings(**(base | overrides))


def final_rows(store: RunStore) -> pa.Table:
    spec = parse_run(yaml.safe_load(store.read_text("spec.yaml") or "")).spec
    return pq.read_table(store.path(final_data(spec)))


def config_table(files: dict[str, bytes], config: str) -> pa.Table:
    parts = sorted(path for path in files if path.startswith(f"data/{config}/"))
    return pa.concat_tables(pq.read_table(io.BytesIO(files[path])) for path in parts)


def test_a_push_publishes_one_config_per_source_with_its_card(run_store: RunStore, hub: HubServer) -> None:
    pushed = publish_run(run_store.uri, settings())

    files = hub.files(REPO)
    final = final_rows(run_store)
    assert final.num_rows < 90  # dedup and decontamination removed documents before publishing
    by_source = {s: final.filter(pc.equal(final["seed_source"], s)) for s in SOURCES}
    for source, expected in by_source.items():
        count = -(-expected.num_rows // 9)
        names = {f"data/{source}/train-{i:05d}-of-{count:05d}.parquet" for i in range(count)}
        assert {p for p in files if p.startswith(f"data/{source}/")} == names
        assert config_table(files, source).equals(expected)
    assert set(files) == {".gitattributes", CARD} | {p for p in files if p.startswith("data/")}
    assert not hub.repos[REPO].private
    assert sorted(pushed.uploaded) == sorted(p for p in files if p != ".gitattributes")

    card = DatasetCard(files[CARD].decode())
    configs = {c["config_name"]: c["data_files"] for c in card.data.to_dict()["configs"]}
    assert configs == {s: [{"split": "train", "path": f"data/{s}/train-*"}] for s in SOURCES}
    text = files[CARD].decode()
    for source, expected in by_source.items():
        tokens = pc.sum(expected["completion_tokens"]).as_py()
        assert f"| {source} | {source} | {expected.num_rows:,} | {tokens:,} |" in text
    dedup = json.loads(run_store.read_text("dedup/counts.json") or "")
    assert dedup["removed"] > 0 and f"| removed | {dedup['removed']:,} |" in text
    assert "### Decontamination report" in text and "piqa" in text
    assert "| text | string | the generated document |" in text
    assert "apiVersion: cosmoforge.io/v1alpha1" in text  # the spec, to reproduce the run
    record = json.loads(run_store.read_text(RECORD) or "")
    assert (record["repo"], record["commit"]) == (REPO, hub.repos[REPO].head.oid)


def test_an_interrupted_push_resumes_and_uploads_only_what_was_missing(
    run_store: RunStore, tmp_path: Path
) -> None:
    with stand_in_hub(tmp_path / "whole") as whole:
        publish_run(run_store.uri, settings())
    expected, uploads = whole.files(REPO), len(whole.uploads)
    assert uploads == len([p for p in expected if p.endswith(".parquet")])  # parquet goes by LFS

    with stand_in_hub(tmp_path / "cut") as cut:
        cut.fail_commits = {2}  # the push dies on its second commit, after the first landed
        with pytest.raises(HfHubHTTPError, match="500"):
            publish_run(run_store.uri, settings())
        landed = set(cut.files(REPO))
        assert ".gitattributes" in landed and 1 < len(landed) < len(expected)

        resumed = publish_run(run_store.uri, settings())
        assert cut.files(REPO) == expected
        assert set(resumed.unchanged) == landed - {".gitattributes"}
        # Every object went over the wire once: those of the failed commit were not sent again.
        assert len(cut.uploads) == uploads == len(set(cut.uploads))

        commits = len(cut.repos[REPO].commits)
        again = publish_run(run_store.uri, settings())
        assert (again.commits, again.uploaded, len(cut.repos[REPO].commits)) == (0, [], commits)
        assert len(cut.uploads) == uploads


def test_a_smaller_layout_deletes_the_files_it_no_longer_has(run_store: RunStore, hub: HubServer) -> None:
    publish_run(run_store.uri, settings(rows_per_file=5))
    publish_run(run_store.uri, settings(rows_per_file=1000))
    data = sorted(p for p in hub.files(REPO) if p.startswith("data/"))
    assert data == [f"data/{s}/train-00000-of-00001.parquet" for s in sorted(SOURCES)]


def local_file(path: str, size: int, digest: str) -> LocalFile:
    return LocalFile(path, Path(path), size, digest * 64, digest * 40)


def test_plan_chunks_changed_files_and_commits_the_card_last_with_the_deletions() -> None:
    local = [local_file(f"data/s/{n}.parquet", 10, str(n)) for n in range(5)] + [local_file(CARD, 3, "c")]
    remote = {
        "data/s/0.parquet": RemoteFile("data/s/0.parquet", 10, "x" * 40, "0" * 64),  # same LFS object
        "data/s/1.parquet": RemoteFile("data/s/1.parquet", 10, "x" * 40, "f" * 64),  # changed
        "data/s/old.parquet": RemoteFile("data/s/old.parquet", 10, "x" * 40, "e" * 64),  # stale
        ".gitattributes": RemoteFile(".gitattributes", 5, "a" * 40, None),  # not ours: stays
        CARD: RemoteFile(CARD, 3, "c" * 40, None),  # a regular file, same git blob id
    }
    plan = plan_push(local, remote, "data", files_per_commit=2, bytes_per_commit=1000)
    commits = [([f.path for f in added], deleted) for added, deleted in plan.commits]
    assert commits == [
        (["data/s/1.parquet", "data/s/2.parquet"], []),
        (["data/s/3.parquet", "data/s/4.parquet"], []),
        ([], ["data/s/old.parquet"]),
    ]
    assert plan.unchanged == ["data/s/0.parquet", CARD]
    by_bytes = plan_push(local, {}, "data", files_per_commit=50, bytes_per_commit=25)
    assert [len(added) for added, _ in by_bytes.commits] == [2, 2, 1, 1]


def test_the_split_is_byte_for_byte_the_same_on_every_run(run_store: RunStore, tmp_path: Path) -> None:
    uri = run_store.url("decontam/kept.parquet")
    first, second = stage_data(uri, tmp_path / "a", 7), stage_data(uri, tmp_path / "b", 7)
    names = [name for config in first.configs.values() for name in config.files]
    assert names == [name for config in second.configs.values() for name in config.files]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def cosmo_push(
    run_uri: str, server: HubServer, home: Path, token: str | None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": server.url, "HF_HOME": str(home)}  # HF_HOME: no token stored there
    if token is not None:
        env["HF_TOKEN"] = token
    command = [
        *COSMO,
        "push",
        run_uri,
        "--repo",
        "cosmo-tester/cli-pub",
        "--private",
        "--rows-per-file",
        "20",
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_cosmo_push_takes_the_token_from_the_environment_and_never_shows_it(
    run_store: RunStore, hub: HubServer, tmp_path: Path
) -> None:
    missing = cosmo_push(run_store.uri, hub, tmp_path, None)
    assert missing.returncode == 2 and "no Hugging Face token: set HF_TOKEN" in missing.stderr

    hub.fail_commits = {1}
    failed = cosmo_push(run_store.uri, hub, tmp_path, TOKEN)
    assert failed.returncode == 1, failed.stderr
    assert "the Hub refused" in failed.stderr and re.search(r"\b500\b", failed.stderr)

    done = cosmo_push(run_store.uri, hub, tmp_path, TOKEN)
    assert done.returncode == 0, done.stderr
    assert "cosmo-tester/cli-pub at " in done.stdout
    assert hub.repos["cosmo-tester/cli-pub"].private
    assert hub.authorizations == {f"Bearer {TOKEN}"}  # the token was sent, and only to the Hub's API
    card = hub.files("cosmo-tester/cli-pub")[CARD].decode()
    for shown in (failed.stdout, failed.stderr, done.stdout, done.stderr, card, run_store.read_text(RECORD)):
        assert TOKEN not in (shown or "")

    wrong = cosmo_push(run_store.uri, hub, tmp_path, "hf_not_the_token")
    assert wrong.returncode == 2 and re.search(r"\b401\b", wrong.stderr)
    assert "hf_not_the_token" not in wrong.stderr


def test_the_operator_publishes_last_with_the_token_from_the_secret() -> None:
    document = run_document()
    document["spec"]["output"] = {
        "uri": "s3://bucket/runs",
        "hub": {"repo": REPO, "private": True, "tokenSecret": {"name": "hub-writer", "key": "hf"}},
    }
    run = parse_run(document)
    planned = post_stages(run.spec)
    assert (planned[-1].name, planned[-1].phase, planned[-1].input) == (
        "publish",
        Phase.publishing,
        final_data(run.spec),
    )
    last = stages(run, Platform())[-1]
    job = stage_job(run, Platform(), last)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["publish", "s3://bucket/runs/pub", "--repo", REPO, "--private"]
    args = build_parser().parse_args(container["args"])  # `cosmo publish` is `cosmo push`
    assert (args.command, args.func.__name__, args.private) == ("publish", "run_push", True)
    assert {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hub-writer", "key": "hf"}},
    } in container["env"]
    document["spec"]["output"].pop("hub")
    assert [s.name for s in post_stages(parse_run(document).spec)] == ["compact", "dedup", "decontaminate"]


def test_cosmo_run_publishes_last_when_the_spec_names_a_repo(
    tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from cosmoforge.cli.embedded import RunSummary, postprocess

    monkeypatch.setenv(cache.ENV, str(tmp_path / "index-cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    store = write_run(tmp_path / "runs")
    run = parse_run(run_document())
    final = postprocess(run, store, Console(file=io.StringIO()), RunSummary(run=run.name, output=store.uri))

    assert final == store.url(final_data(run.spec))
    files = hub.files(REPO)
    assert CARD in files and sum(path.startswith("data/") for path in files) >= 2
    assert json.loads(store.read_text(RECORD) or "{}")["repo"] == REPO
