"""The seed reader on real-shaped data: field paths, filters, sampling, Hub configs and splits,
and one-line errors for seeds that cannot be read (real moto S3 server, a real closed port)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import COSMO, small_run, write_spec
from cosmoforge.prompts.seeds import (
    SeedCounts,
    SeedError,
    detect_format,
    read_seed,
    record_hash,
    unreadable_reason,
)
from cosmoforge.spec.model import SeedSource

TURN = pa.struct([("from", pa.string()), ("value", pa.string()), ("weight", pa.float64())])
HERMES_SCHEMA = pa.schema(
    [
        ("conversations", pa.list_(TURN)),
        ("source", pa.string()),
        ("category", pa.string()),
        ("id", pa.string()),
        ("system_prompt", pa.string()),
        ("skip_prompt_formatting", pa.bool_()),
    ]
)


def hermes_rows() -> list[dict[str, Any]]:
    """OpenHermes-2.5-shaped rows: some open with a system turn, some come from excluded sources
    or categories, one has a null source (never excluded)."""
    rows = []
    for i, (source, category) in enumerate(
        [
            ("airoboros2.2", "orca"),
            ("glaive-code-assist", None),
            ("camelai", None),
            (None, "general"),
            ("airoboros2.2", "rp"),
            ("airoboros2.2", "gtkm"),
            ("airoboros2.2", "coding"),
            ("airoboros2.2", "wordgame"),
            ("airoboros2.2", "riddle"),
            ("CamelAI", None),  # another spelling: kept, filters compare exactly
            ("metamath", None),
        ]
    ):
        turns = [{"from": "human", "value": f"question {i}?", "weight": 0.0}]
        if i % 2:
            turns.insert(0, {"from": "system", "value": f"system {i}", "weight": None})
        turns.append({"from": "gpt", "value": f"answer {i}", "weight": 1.0})
        rows.append(
            {
                "conversations": turns,
                "source": source,
                "category": category,
                "id": None,
                "system_prompt": "",
                "skip_prompt_formatting": bool(i % 3),
            }
        )
    return rows


HERMES_EXCLUDE = {
    "source": ["glaive-code-assist", "camelai"],
    "category": ["rp", "gtkm", "coding", "wordgame", "riddle"],
}
HERMES_KEPT = [0, 3, 9, 10]


def write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def source(uri: str, **extra: Any) -> SeedSource:
    return SeedSource.model_validate({"name": "s", "kind": "instruction", "uri": uri, **extra})


def test_nested_fields_and_exclusions_pick_the_first_human_turn(tmp_path: Path) -> None:
    uri = write_parquet(tmp_path / "hermes.parquet", hermes_rows(), HERMES_SCHEMA)
    counts = SeedCounts()
    spec = source(
        uri,
        textField="conversations[from=human].value",
        categoryField="category",
        excludeCategories=[],
        exclude=HERMES_EXCLUDE,
    )
    records = list(read_seed(spec, counts))
    assert [r.text for r in records] == [f"question {i}?" for i in HERMES_KEPT]
    assert counts.read == 4 and counts.excluded == 7
    assert records[0].fields["source"] == "airoboros2.2" and "conversations" in records[0].fields
    first_turn = list(read_seed(source(uri, textField="conversations[0].value", excludeCategories=[])))
    assert first_turn[1].text == "system 1"


def test_include_keeps_only_listed_values_and_booleans_read_as_yaml(tmp_path: Path) -> None:
    uri = write_parquet(tmp_path / "hermes.parquet", hermes_rows(), HERMES_SCHEMA)
    only = list(read_seed(source(uri, textField="conversations[from=human].value",
                                 include={"source": ["metamath", "camelai"]})))  # fmt: skip
    assert [r.text for r in only] == ["question 2?", "question 10?"]
    skipped = list(read_seed(source(uri, textField="conversations[0].value",
                                    include={"skip_prompt_formatting": [False]})))  # fmt: skip
    assert len(skipped) == 4  # rows 0, 3, 6, 9


def test_ultrachat_turns_and_missing_fields_list_what_exists(tmp_path: Path) -> None:
    rows = [{"id": str(i), "data": [f"ask {i}", f"reply {i}"]} for i in range(3)]
    rows.append({"id": "3", "data": []})  # no first turn: skipped as empty, not an error
    uri = write_parquet(tmp_path / "ultrachat.parquet", rows)
    counts = SeedCounts()
    records = list(read_seed(source(uri, textField="data[0]", idField="id"), counts))
    assert [(r.id, r.text) for r in records] == [("0", "ask 0"), ("1", "ask 1"), ("2", "ask 2")]
    assert counts.skipped_empty == 1
    with pytest.raises(SeedError) as caught:
        list(read_seed(source(uri, textField="turns[0]")))
    assert str(caught.value) == f"seed 's': {uri}: row 0: field 'turns' in 'turns[0]' missing (has: data, id)"
    with pytest.raises(SeedError, match=r"field 'data' is not text \(list\); name an item, e.g. \[0\]"):
        list(read_seed(source(uri, textField="data")))


def test_record_ids_follow_content_and_sample_is_seeded_and_stable(tmp_path: Path) -> None:
    rows = [{"text": f"extract {i}", "url": f"u{i}"} for i in range(400)]
    uri = write_parquet(tmp_path / "web.parquet", rows)
    records = list(read_seed(source(uri)))
    assert [r.id for r in records] == [record_hash(row) for row in rows]
    assert len({r.id for r in records}) == 400
    assert [r.id for r in read_seed(source(uri, idField="url"))][:2] == ["u0", "u1"]

    kept = [r.text for r in read_seed(source(uri, sample=0.25, sampleSeed=7))]
    assert kept == [r.text for r in read_seed(source(uri, sample=0.25, sampleSeed=7))]
    assert 60 < len(kept) < 140
    assert kept != [r.text for r in read_seed(source(uri, sample=0.25, sampleSeed=8))]
    # Changing one row changes its id only, and which other rows are sampled stays the same.
    rows[5]["text"] = "extract five, corrected"
    edited = write_parquet(tmp_path / "web2.parquet", rows)
    again = [r.text for r in read_seed(source(edited, sample=0.25, sampleSeed=7))]
    assert [t for t in again if t != rows[5]["text"]] == [t for t in kept if t != "extract 5"]
    assert [r.text for r in read_seed(source(uri, sample=0.25, sampleSeed=7, limit=10))] == kept[:10]


def test_hub_dataset_uris_are_told_apart_from_files() -> None:
    assert detect_format(source("hf://datasets/teknium/OpenHermes-2.5")) == "hf"
    assert detect_format(source("hf://datasets/math-ai/AutoMathText@v1.0")) == "hf"
    assert (
        detect_format(source("hf://datasets/HuggingFaceFW/fineweb/sample/10BT/000_00000.parquet"))
        == "parquet"
    )


def _hub_folder(root: Path) -> None:
    """A dataset repository laid out as on the Hub: parquet per config and split, configs in the
    card. `datasets` loads a local folder with the same code path as a Hub repository."""
    card = ["---", "configs:"]
    for config in ("stanford", "wikihow"):
        card += [f"- config_name: {config}", "  data_files:"]
        for split in ("train", "test"):
            rows = [
                {"seed_data": f"{config} {split} {i}", "format": "textbook_academic_tone"} for i in range(3)
            ]
            write_parquet(root / "data" / config / f"{split}-00000-of-00001.parquet", rows)
            card += [f"  - split: {split}", f"    path: data/{config}/{split}-*.parquet"]
    (root / "README.md").write_text("\n".join([*card, "---", ""]))


def test_hub_configs_and_splits_are_checked_and_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _hub_folder(tmp_path / "teknium" / "OpenHermes-2.5")
    uri = "hf://datasets/teknium/OpenHermes-2.5"
    hub = source(uri, config="wikihow", split="test", textField="seed_data", excludeCategories=[])
    assert [r.text for r in read_seed(hub)] == [f"wikihow test {i}" for i in range(3)]
    with pytest.raises(SeedError) as caught:
        list(read_seed(source(uri, textField="seed_data")))
    assert str(caught.value) == (
        f"seed 's' ({uri}): the dataset has several configs, set seeds[].config to one of: stanford, wikihow"
    )
    with pytest.raises(SeedError, match=r"no config 'openstax'; configs: stanford, wikihow$"):
        list(read_seed(source(uri, config="openstax", textField="seed_data")))
    with pytest.raises(SeedError, match=r"no split 'validation' in config 'stanford'; splits: train, test$"):
        list(read_seed(source(uri, config="stanford", split="validation", textField="seed_data")))


def test_missing_bucket_on_a_real_s3_server_is_one_line(s3_endpoint: str) -> None:
    with pytest.raises(SeedError) as caught:
        list(read_seed(source("s3://no-such-seed-bucket/hermes.parquet")))
    message = str(caught.value)
    assert message.startswith("seed 's': s3://no-such-seed-bucket/hermes.parquet: ")
    assert "no such file" in message and "\n" not in message


def test_unreachable_s3_endpoint_and_missing_file_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses clients across tests otherwise
    try:
        with pytest.raises(SeedError) as caught:
            list(read_seed(source("s3://seeds/hermes.parquet")))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    message = str(caught.value)
    assert message.startswith("seed 's' (s3://seeds/hermes.parquet): unreachable (") and "\n" not in message
    with pytest.raises(SeedError, match=r"^seed 's': .*absent.parquet: no such file or folder$"):
        list(read_seed(source(str(tmp_path / "absent.parquet"))))


def test_a_status_code_is_read_as_a_word_not_inside_a_port_number() -> None:
    """A refused connection to port 40191 is unreachable; an HTTP 401 or 403 is access denied."""
    import requests

    refused = requests.exceptions.ConnectionError(
        "HTTPConnectionPool(host='127.0.0.1', port=40191): Max retries exceeded "
        "(Caused by NewConnectionError: [Errno 111] Connection refused)"
    )
    assert unreadable_reason(refused).startswith("unreachable (ConnectionError: ")
    for status in (401, 403):
        denied = requests.exceptions.HTTPError(f"{status} Client Error: for url: https://hub/api/datasets/x")
        assert unreadable_reason(denied).startswith("no credentials or access denied (HTTPError: ")


def test_missing_credentials_are_one_line(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The moto server is up; the client has no credentials to sign with."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(SeedError) as caught:
            list(read_seed(source("s3://seeds/hermes.parquet")))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert str(caught.value) == (
        "seed 's' (s3://seeds/hermes.parquet): no credentials or access denied "
        "(NoCredentialsError: Unable to locate credentials)"
    )


def test_cosmo_prompts_builds_stories_from_first_human_turns_of_kept_rows(tmp_path: Path) -> None:
    """The done-when check: OpenHermes-shaped parquet, Cosmopedia's exclusions, `cosmo prompts`."""
    uri = write_parquet(tmp_path / "hermes.parquet", hermes_rows(), HERMES_SCHEMA)
    document = small_run("hermes")
    document["spec"]["seeds"] = [
        {"name": "openhermes", "kind": "instruction", "uri": uri,
         "textField": "conversations[from=human].value", "excludeCategories": [], "exclude": HERMES_EXCLUDE}
    ]  # fmt: skip
    document["spec"]["prompts"]["variantsPerSeed"] = 2
    spec = write_spec(tmp_path / "hermes.yaml", document)
    out = tmp_path / "out"
    result = subprocess.run([*COSMO, "prompts", str(spec), "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    prompts = pq.read_table(out / "prompts").to_pylist()
    assert len(prompts) == 2 * len(HERMES_KEPT)
    assert {p["style"] for p in prompts} == {"story"} and {p["template_id"] for p in prompts} == {"story"}
    quoted = sorted({next(f"question {i}?" for i in range(11) if f'"""\nquestion {i}?\n"""' in p["prompt"])
                     for p in prompts})  # fmt: skip
    assert quoted == sorted(f"question {i}?" for i in HERMES_KEPT)
    assert not any("system " in p["prompt"] or "answer " in p["prompt"] for p in prompts)


def test_a_bad_field_path_is_a_spec_problem_with_its_location() -> None:
    from cosmoforge.spec.model import SpecError, parse_run

    document = small_run()
    document["spec"]["seeds"][0]["textField"] = "conversations[from=human"
    document["spec"]["seeds"][0]["exclude"] = {"meta..x": ["a"]}
    with pytest.raises(SpecError) as caught:
        parse_run(document)
    assert [path for path, _ in caught.value.problems] == ["spec.seeds[0].textField", "spec.seeds[0].exclude"]
    assert "cannot read '[from=human' at character 14" in caught.value.problems[0][1]
    document["spec"]["seeds"][0]["textField"] = "text"
    document["spec"]["seeds"][0]["exclude"] = {"flag": [True, 3]}
    assert parse_run(document).spec.seeds[0].exclude == {"flag": ["true", "3"]}
