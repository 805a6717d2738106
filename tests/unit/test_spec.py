"""The spec model and `cosmo validate`: good specs pass, bad ones name the field and the reason."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import COSMO, EXAMPLES, small_run, write_spec
from cosmoforge.cli.main import main
from cosmoforge.spec.model import Engine, GenerationRun, SpecError, dump_run, load_run, parse_run


def test_quickstart_is_valid_and_defaults_follow_the_recipe() -> None:
    run = load_run(EXAMPLES / "quickstart.yaml")
    assert run.name == "quickstart"
    assert run.spec.generation.engine == Engine.embedded
    defaults = parse_run(small_run()).spec
    assert defaults.prompts.topic_conditioning == 0.5
    assert set(defaults.prompts.audiences) == {
        "young_children",
        "high_school_students",
        "college_students",
        "researchers",
    }
    assert set(defaults.prompts.styles) == {"textbook", "blog_post", "wikihow"}
    assert defaults.postprocess.decontaminate.ngram == 10
    assert defaults.postprocess.decontaminate.threshold == 0.5
    assert defaults.postprocess.decontaminate.workers == 1  # one Job, as before the field existed
    assert (defaults.postprocess.dedup.buckets, defaults.postprocess.dedup.hashes_per_bucket) == (14, 8)
    assert "Once upon a time" in defaults.prompts.banned_openings


def test_dump_round_trips_with_defaults_filled_in() -> None:
    run = parse_run(small_run())
    again = parse_run(yaml.safe_load(dump_run(run)))
    assert again == run
    assert "topicConditioning" in dump_run(run)


def _set(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    document = copy.deepcopy(document)
    node: Any = document
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if value is _DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return document


_DELETE = object()

BAD_SPECS = [
    # (what is wrong, path to change, new value, expected field, expected reason fragment)
    ("unknown field", "spec.generation.temprature", 0.7, "spec.generation.temprature", "unknown field"),
    ("wrong type", "spec.generation.maxNewTokens", "many", "spec.generation.maxNewTokens", "valid integer"),
    (
        "out of range",
        "spec.generation.maxNewTokens",
        0,
        "spec.generation.maxNewTokens",
        "greater than or equal to 1",
    ),
    (
        "unknown audience",
        "spec.prompts.audiences",
        ["toddlers"],
        "spec.prompts.audiences[0]",
        "young_children",
    ),
    ("unknown style", "spec.prompts.styles", ["poem"], "spec.prompts.styles[0]", "textbook"),
    ("unknown engine", "spec.generation.engine", "ollama", "spec.generation.engine", "'tgi'"),
    (
        "threshold above 1",
        "spec.postprocess.decontaminate.threshold",
        1.5,
        "spec.postprocess.decontaminate.threshold",
        "less than or equal to 1",
    ),
    (
        "topic share below 0",
        "spec.prompts.topicConditioning",
        -0.1,
        "spec.prompts.topicConditioning",
        "greater than or equal to 0",
    ),
    ("unknown seed kind", "spec.seeds.0.kind", "tweets", "spec.seeds[0].kind", "outline"),
    ("missing seed uri", "spec.seeds.0.uri", _DELETE, "spec.seeds[0].uri", "required field is missing"),
    ("bad run name", "metadata.name", "Not_A_DNS_Name", "metadata.name", "should match pattern"),
    ("wrong api version", "apiVersion", "cosmoforge.io/v2", "apiVersion", "cosmoforge.io/v1alpha1"),
    (
        "replicas min above max",
        "spec.generation.replicas",
        {"min": 4, "max": 2},
        "spec.generation.replicas",
        "must not exceed",
    ),
    ("openai without endpoint", "spec.generation.engine", "openai", "spec.generation", "needs an endpoint"),
    (
        "endpoint not a URL",
        "spec.generation.endpoint",
        "localhost:8080",
        "spec.generation.endpoint",
        "http://",
    ),
    (
        "unknown benchmark",
        "spec.postprocess.decontaminate.benchmarks",
        ["mmlu", "gsm9k"],
        "spec.postprocess.decontaminate.benchmarks",
        "unknown benchmark 'gsm9k'",
    ),
    (
        "no decontamination worker",
        "spec.postprocess.decontaminate.workers",
        0,
        "spec.postprocess.decontaminate.workers",
        "greater than or equal to 1",
    ),
    (
        "too many decontamination workers",
        "spec.postprocess.decontaminate.workers",
        5000,
        "spec.postprocess.decontaminate.workers",
        "less than or equal to 1024",
    ),
    (
        "decontamination workers not a number",
        "spec.postprocess.decontaminate.workers",
        "many",
        "spec.postprocess.decontaminate.workers",
        "valid integer",
    ),
    (
        "duplicate audiences",
        "spec.prompts.audiences",
        ["researchers", "researchers"],
        "spec.prompts.audiences",
        "unique",
    ),
    ("duplicate seed names", "spec.seeds.1.name", "web", "spec.seeds", "repeated: web"),
    ("no seeds", "spec.seeds", [], "spec.seeds", "at least 1 item"),
    (
        "bad template field",
        "spec.prompts.templates",
        {"web": "Write about {{ nonsense_field }}"},
        "spec.prompts.templates.web",
        "unknown field",
    ),
    (
        "unknown template id",
        "spec.prompts.templates",
        {"poem": "{{ text }}"},
        "spec.prompts.templates.poem",
        "unknown template id",
    ),
    (
        "template syntax",
        "spec.prompts.templates",
        {"web": "{% if text %}unclosed"},
        "spec.prompts.templates.web",
        "syntax error",
    ),
]


@pytest.mark.parametrize(
    ("what", "path", "value", "field", "reason"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS]
)
def test_validate_rejects_bad_specs_with_field_and_reason(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    what: str,
    path: str,
    value: Any,
    field: str,
    reason: str,
) -> None:
    spec = write_spec(tmp_path / "run.yaml", _set(small_run(), path, value))
    assert main(["validate", str(spec)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert any(f": {field}: " in line and reason in line for line in lines), lines
    assert all(line.startswith(str(spec)) for line in lines)


def test_validate_reports_every_problem_not_just_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = _set(
        _set(small_run(), "spec.generation.maxNewTokens", -1), "spec.prompts.topicConditioning", 2
    )
    spec = write_spec(tmp_path / "run.yaml", document)
    assert main(["validate", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "spec.generation.maxNewTokens" in err and "spec.prompts.topicConditioning" in err


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("spec: [unclosed", "invalid YAML"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("", "expected one YAML document, found 0"),
        ("a: 1\n---\nb: 2\n", "expected one YAML document, found 2"),
    ],
)
def test_validate_rejects_unusable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, reason: str
) -> None:
    spec = tmp_path / "run.yaml"
    spec.write_text(content)
    assert main(["validate", str(spec)]) == 1
    assert reason in capsys.readouterr().err


def test_validate_missing_file_and_non_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 1
    assert "no such file" in capsys.readouterr().err
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00spec")
    assert main(["validate", str(binary)]) == 1
    assert "not UTF-8" in capsys.readouterr().err


def test_validate_cli_prints_no_traceback(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "run.yaml", _set(small_run(), "spec.generation.engine", "nonsense"))
    result = subprocess.run(
        [*COSMO, "validate", str(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "spec.generation.engine" in result.stderr


def test_every_example_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    examples = sorted(EXAMPLES.glob("*.yaml"))
    assert examples
    for example in examples:
        assert main(["validate", str(example)]) == 0, capsys.readouterr().err


def test_spec_error_lists_problems() -> None:
    with pytest.raises(SpecError) as caught:
        parse_run(
            {"apiVersion": "cosmoforge.io/v1alpha1", "kind": "GenerationRun", "metadata": {"name": "x"}}
        )
    assert caught.value.problems == [("spec", "required field is missing")]
    assert isinstance(parse_run(small_run()), GenerationRun)
