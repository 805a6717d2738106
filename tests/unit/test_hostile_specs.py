"""Hostile specs: every payload of issue 18 is refused with one line per problem naming the field.

A few run the real `cosmo validate` in a child process (exit 1, the lines on stderr); the rest
call the same validation the CLI, the dispatcher and the operator call. A property test feeds
random documents and random YAML text to validation: it answers with problems, never a traceback.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import COSMO, small_run, write_spec
from cosmoforge.prompts.builder import build_prompts
from cosmoforge.spec.confinement import StoragePolicy, host_problem, input_problem, output_problem
from cosmoforge.spec.model import SpecError, single_document
from cosmoforge.spec.problems import summary
from cosmoforge.spec.safe_yaml import MAX_SPEC_BYTES
from cosmoforge.spec.template_check import check_isolated, check_text
from cosmoforge.spec.validation import resolve_uri, validate_document

LAPTOP = StoragePolicy()
CLUSTER = StoragePolicy(root="s3://datasets/runs", allowed=("s3://shared/published",), local_paths=False)

ALIAS_BOMB = """\
apiVersion: cosmoforge.io/v1alpha1
kind: GenerationRun
metadata:
  name: bomb
  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
  b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
  c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
  d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
  e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
  f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
spec:
  seeds: [{name: web, kind: web, uri: "cosmoforge://samples/web.jsonl"}]
"""


def problems_of(text: str, policy: StoragePolicy = LAPTOP) -> list[tuple[str, str]]:
    """What validation says of a spec's text: [] for a valid spec."""
    try:
        validate_document(single_document(text, "t.yaml"), "t.yaml", policy)
    except SpecError as error:
        return error.problems
    return []


def spec_text(path: str, value: Any) -> str:
    """small_run with one field set (a dotted path; digits index lists), as YAML text."""
    document = copy.deepcopy(small_run("hostile"))
    node: Any = document
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[parts[-1]] = value
    return yaml.safe_dump(document, sort_keys=False)


def cosmo_validate(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [*COSMO, "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


# --- the real CLI ---------------------------------------------------------------------------


def test_cosmo_validate_refuses_an_alias_bomb_under_metadata(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    done = cosmo_validate(path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{path}: line 5:") and "anchors (&a) are not allowed" in lines[0]
    assert "Traceback" not in done.stderr


def test_cosmo_validate_names_each_field_of_a_spec_with_several_problems(tmp_path: Path) -> None:
    document = small_run("several")
    document["spec"]["prompts"]["templates"] = {"web": "{{ 9 ** 29999999 }}", "math": "{{ 1/0 }}"}
    document["spec"]["output"] = {"uri": "local:///etc"}
    document["spec"]["generation"]["replicas"] = {"max": 10**10}
    document["spec"]["generation"]["timeoutSeconds"] = float("inf")
    document["spec"]["seeds"][0]["uri"] = "http://169.254.169.254/latest/meta-data/"
    path = write_spec(tmp_path / "several.yaml", document)
    done = cosmo_validate(path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    fields = [line.split(": ")[1] for line in lines]
    assert fields == ["spec.generation.timeoutSeconds", "spec.generation.replicas.max"], done.stderr
    assert "finite" in lines[0] and "less than or equal to 1000" in lines[1]
    # Schema problems come first; once the schema holds, the rest are reported together.
    document["spec"]["generation"].pop("replicas")
    document["spec"]["generation"].pop("timeoutSeconds")
    done = cosmo_validate(write_spec(path, document))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    by_field = dict(line.split(": ", 2)[1:] for line in lines)
    assert set(by_field) == {
        "spec.output.uri",
        "spec.seeds[0].uri",
        "spec.prompts.templates.web",
        "spec.prompts.templates.math",
    }, done.stderr
    assert "local:// is not allowed" in by_field["spec.output.uri"]
    assert "metadata" in by_field["spec.seeds[0].uri"]
    assert "'**'" in by_field["spec.prompts.templates.web"]
    assert "ZeroDivisionError" in by_field["spec.prompts.templates.math"]
    assert "Traceback" not in done.stderr


def test_cosmo_validate_confines_outputs_to_the_configured_storage_root(tmp_path: Path) -> None:
    document = small_run("other")
    document["spec"]["output"] = {"uri": "s3://other-tenant/runs"}
    path = write_spec(tmp_path / "other.yaml", document)
    done = cosmo_validate(path, COSMO_OUTPUT_BASE="s3://datasets/runs")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"{path}: spec.output.uri: is outside the storage root s3://datasets/runs "
        "(the chart's storage.allowedOutputs adds places)"
    )
    allowed = cosmo_validate(
        path, COSMO_OUTPUT_BASE="s3://datasets/runs", COSMO_OUTPUT_ALLOW="s3://x,s3://other-tenant"
    )
    assert allowed.returncode == 0, allowed.stderr


def test_cosmo_validate_refuses_a_file_over_the_size_cap(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(spec_text("metadata.annotations", {"note": "x" * MAX_SPEC_BYTES}))
    done = cosmo_validate(path)
    assert done.returncode == 1
    assert (
        done.stderr.strip() == f"{path}: (file): the spec is larger than the limit of {MAX_SPEC_BYTES} bytes"
    )


# --- YAML -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        (ALIAS_BOMB, "line 5", "YAML anchors (&a) are not allowed in a spec"),
        ("a: &x 1\nb: 2\n", "line 1", "YAML anchors (&x) are not allowed in a spec"),
        ("a: !!str &x 1\n", "line 1", "anchors (&x)"),
        ("a: 1\nb: *x\n", "line 2", "invalid YAML"),  # an undefined alias: PyYAML's own error
        ("a: " + "[" * 40 + "]" * 40, "line 1", "nested deeper than 32 levels"),
        ("a: " + "[" * 5000, "line 1", "nested deeper than 32 levels"),
        ("a: " + "1" * 5000, "(root)", "a value cannot be read"),
        ("a: 2001-13-45\n", "(root)", "a value cannot be read: month must be in 1..12"),
    ],
)
def test_yaml_that_could_blow_up_is_refused_in_one_line(text: str, where: str, reason: str) -> None:
    with pytest.raises(SpecError) as caught:
        single_document(text, "t.yaml", whole="(root)")
    [(found_where, found_reason)] = caught.value.problems
    assert found_where == where
    assert reason in found_reason


# --- metadata -------------------------------------------------------------------------------


def test_metadata_is_strict_but_takes_what_kubectl_prints() -> None:
    printed = small_run("printed")
    printed["metadata"].update(
        namespace="team-a",
        uid="0b1c7a5e-55d4-4cbb-9b4f-0b0a2b1d8f11",
        resourceVersion="123456",
        generation=2,
        creationTimestamp="2026-01-02T03:04:05Z",
        labels={"app.kubernetes.io/part-of": "cosmoforge"},
        annotations={"kubectl.kubernetes.io/last-applied-configuration": json.dumps(small_run("printed"))},
        managedFields=[{"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:spec": {}}}],
        finalizers=["cosmoforge.io/cleanup"],
    )
    text = yaml.safe_dump(printed)
    assert problems_of(text) == []
    run = validate_document(single_document(text, "t"), "t", LAPTOP)
    from cosmoforge.spec.model import dump_run

    dumped = yaml.safe_load(dump_run(run))["metadata"]
    assert dumped == {
        "name": "printed",
        "namespace": "team-a",
        "labels": {"app.kubernetes.io/part-of": "cosmoforge"},
    }


@pytest.mark.parametrize(
    ("key", "value", "field", "reason"),
    [
        ("payload", ["x"] * 10, "metadata.payload", "unknown field"),
        ("namespace", "Not A Namespace", "metadata.namespace", "should match pattern"),
        ("labels", {"a": "x" * 64}, "metadata.labels.a", "at most 63 characters"),
        ("labels", {"bad key!": "v"}, "metadata.labels.bad key!", "should match pattern"),
        ("annotations", {"a": "x" * (300 * 1024)}, "metadata.annotations", "more than 262144"),
        ("generation", 10**30, "metadata.generation", "less than or equal to"),
    ],
)
def test_metadata_refuses_what_a_user_does_not_send(key: str, value: Any, field: str, reason: str) -> None:
    problems = problems_of(spec_text(f"metadata.{key}", value))
    assert len(problems) == 1, problems
    assert problems[0][0] == field and reason in problems[0][1]


# --- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "field", "reason"),
    [
        (
            "spec.generation.replicas",
            {"max": 10**10},
            "spec.generation.replicas.max",
            "less than or equal to 1000",
        ),
        (
            "spec.generation.replicas",
            {"max": 1e10},
            "spec.generation.replicas.max",
            "less than or equal to 1000",
        ),
        ("spec.generation.timeoutSeconds", float("inf"), "spec.generation.timeoutSeconds", "finite number"),
        ("spec.generation.timeoutSeconds", float("nan"), "spec.generation.timeoutSeconds", "finite number"),
        (
            "spec.generation.timeoutSeconds",
            0.5,
            "spec.generation.timeoutSeconds",
            "greater than or equal to 1",
        ),
        (
            "spec.generation.timeoutSeconds",
            10**6,
            "spec.generation.timeoutSeconds",
            "less than or equal to 86400",
        ),
        ("spec.prompts.maxSeedChars", 10**7, "spec.prompts.maxSeedChars", "less than or equal to 100000"),
        ("spec.seeds.0.weight", float("inf"), "spec.seeds[0].weight", "finite number"),
        ("spec.prompts.seed", 2**70, "spec.prompts.seed", "less than or equal to"),
        (
            "spec.generation.sampling",
            {"temperature": float("nan")},
            "spec.generation.sampling.temperature",
            "finite",
        ),
        (
            "spec.generation.autoscaling",
            {"stabilizationSeconds": 10**9},
            "spec.generation.autoscaling.stabilizationSeconds",
            "86400",
        ),
        (
            "spec.prompts.bannedOpenings",
            ["x" * 201],
            "spec.prompts.bannedOpenings[0]",
            "at most 200 characters",
        ),
    ],
)
def test_numbers_are_finite_and_bounded(path: str, value: Any, field: str, reason: str) -> None:
    problems = problems_of(spec_text(path, value))
    assert len(problems) == 1, problems
    assert problems[0][0] == field and reason in problems[0][1], problems


def test_yaml_infinity_is_refused_as_written() -> None:
    text = spec_text("spec.generation.timeoutSeconds", 1).replace("timeoutSeconds: 1", "timeoutSeconds: .inf")
    assert problems_of(text) == [("spec.generation.timeoutSeconds", "Input should be a finite number")]


# --- URIs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "policy", "reason"),
    [
        ("../../other-tenant", LAPTOP, "must not contain '..'"),
        ("runs/%2e%2e/%2E%2E/other-tenant", LAPTOP, "must not contain '..'"),
        ("s3://datasets/runs/../other-tenant", CLUSTER, "must not contain '..'"),
        ("local:///etc", LAPTOP, "local:// is not allowed"),
        ("file:///etc", LAPTOP, "file:// is not allowed"),
        ("memory://shared", LAPTOP, "scheme 'memory' is not allowed for outputs"),
        ("simplecache::s3://datasets/runs", LAPTOP, "chained fsspec URLs"),
        ("s3://other-tenant/runs", CLUSTER, "outside the storage root s3://datasets/runs"),
        ("s3://datasets/runs-evil", CLUSTER, "outside the storage root"),
        ("gs://datasets/runs", CLUSTER, "outside the storage root"),
        ("/etc", CLUSTER, "this pod's own disk"),
        ("runs\n", LAPTOP, "control characters"),
    ],
)
def test_outputs_stay_under_the_storage_root(uri: str, policy: StoragePolicy, reason: str) -> None:
    problem = output_problem(uri, policy)
    assert problem is not None and reason in problem


@pytest.mark.parametrize(
    ("uri", "policy"),
    [
        ("cosmoforge-runs", CLUSTER),
        ("team-a/run-1", CLUSTER),
        ("s3://datasets/runs", CLUSTER),
        ("s3://datasets/runs/team-a/", CLUSTER),
        ("s3://shared/published/x", CLUSTER),
        ("s3://anywhere/at-all", LAPTOP),
        ("/tmp/my-runs", LAPTOP),
    ],
)
def test_outputs_under_the_root_or_allowed_pass(uri: str, policy: StoragePolicy) -> None:
    assert output_problem(uri, policy) is None


@pytest.mark.parametrize(
    ("uri", "policy", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", LAPTOP, "link-local"),
        ("https://169.254.169.254./latest", LAPTOP, "link-local"),
        ("http://2852039166/latest", LAPTOP, "link-local"),  # 169.254.169.254 as one number
        ("http://0xa9fea9fe/latest", LAPTOP, "link-local"),
        ("http://0251.0376.0251.0376/latest", LAPTOP, "link-local"),
        # fsspec splits URLs at '::', so an IPv6 literal never reaches its HTTP filesystem
        ("http://[::ffff:169.254.169.254]/latest", LAPTOP, "chained fsspec URLs"),
        ("http://metadata.google.internal/computeMetadata/v1/", LAPTOP, "cloud metadata"),
        ("http://user:pw@METADATA/computeMetadata", LAPTOP, "cloud metadata"),
        ("http://127.0.0.1:50051/x", CLUSTER, "loopback"),
        ("http://localhost/x", CLUSTER, "this pod itself"),
        ("cosmoforge://../..", LAPTOP, "must not contain '..'"),
        ("cosmoforge://samples/../../spec/model.py", LAPTOP, "must not contain '..'"),
        ("cosmoforge://", LAPTOP, "names no file"),
        ("local:///etc/passwd", LAPTOP, "scheme 'local' is not allowed for inputs"),
        ("memory://other-run/prompts", LAPTOP, "scheme 'memory'"),
        ("ssh://host/etc/passwd", LAPTOP, "scheme 'ssh'"),
        ("data:text/plain,hello", LAPTOP, "data: URLs"),
        ("zip::s3://bucket/seeds.zip", LAPTOP, "chained fsspec URLs"),
        ("/proc/self/environ", CLUSTER, "local paths are not readable here"),
        ("file:///proc/self/environ", CLUSTER, "file:// is not readable here"),
        ("s3://bucket/../other/seeds.parquet", LAPTOP, "must not contain '..'"),
    ],
)
def test_inputs_by_scheme_allow_list(uri: str, policy: StoragePolicy, reason: str) -> None:
    problem = input_problem(uri, policy)
    assert problem is not None and reason in problem, problem


@pytest.mark.parametrize(
    ("uri", "policy"),
    [
        ("cosmoforge://samples/web.jsonl", CLUSTER),
        ("s3://seeds/web.parquet", CLUSTER),
        ("hf://datasets/HuggingFaceTB/cosmopedia", CLUSTER),
        ("https://example.org/seeds.jsonl", CLUSTER),
        ("http://10.0.0.5:9000/seeds.jsonl", CLUSTER),  # an in-cluster service
        ("http://127.0.0.1:8080/seeds.jsonl", LAPTOP),
        ("../seeds/web.jsonl", LAPTOP),  # next to the spec on one's own disk
        ("/data/seeds.parquet", LAPTOP),
    ],
)
def test_ordinary_inputs_pass(uri: str, policy: StoragePolicy) -> None:
    assert input_problem(uri, policy) is None


def test_endpoints_never_reach_metadata_addresses() -> None:
    assert "link-local" in (host_problem("http://[::ffff:169.254.169.254]/v1", LAPTOP) or "")
    assert "link-local" in (host_problem("http://[fe80::1]/v1", LAPTOP) or "")
    assert "metadata" in (host_problem("http://[fd00:ec2::254]/v1", LAPTOP) or "")
    assert host_problem("http://localhost:8080/v1", LAPTOP) is None
    assert host_problem("https://llm.example.com/v1", CLUSTER) is None


def test_every_input_field_is_checked_and_named() -> None:
    document = small_run("inputs")
    document["spec"]["seeds"][0]["topicsUri"] = "memory://x"
    document["spec"]["postprocess"]["decontaminate"] = {"benchmarks": ["mmlu", "cosmoforge://../../x.jsonl"]}
    document["spec"]["training"] = {"evalData": "http://169.254.169.254/", "tokenizer": "local:///tok.json"}
    document["spec"]["generation"] = {"engine": "tgi", "endpoint": "http://169.254.169.254/v1"}
    assert [field for field, _ in problems_of(yaml.safe_dump(document))] == [
        "spec.seeds[0].topicsUri",
        "spec.postprocess.decontaminate.benchmarks[1]",
        "spec.training.evalData",
        "spec.training.tokenizer",
        "spec.generation.endpoint",
    ]


def test_a_package_path_never_resolves_outside_the_samples() -> None:
    with pytest.raises(SpecError):
        resolve_uri("cosmoforge://../../spec/model.py")
    assert resolve_uri("cosmoforge://samples/web.jsonl").endswith("samples/web.jsonl")


def test_the_dispatcher_reads_its_policy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from cosmoforge.runs.manager import load_spec

    monkeypatch.setenv("COSMO_OUTPUT_BASE", "s3://datasets/runs")
    monkeypatch.setenv("COSMO_LOCAL_PATHS", "0")
    with pytest.raises(SpecError) as caught:
        load_spec(spec_text("spec.seeds.0.uri", "/proc/self/environ"))
    assert caught.value.problems == [
        ("spec.seeds[0].uri", "local paths are not readable here: use object storage")
    ]
    assert load_spec(spec_text("spec.output", {"uri": "s3://datasets/runs/team-a"})).name == "hostile"


def test_the_operator_confines_outputs_to_the_chart_storage_root() -> None:
    from cosmoforge.operator.render import Platform

    platform = Platform.from_env(
        {"COSMO_OUTPUT_BASE": "s3://datasets/runs", "COSMO_OUTPUT_ALLOW": "s3://shared/a, s3://shared/b"}
    )
    assert platform.output_allow == ("s3://shared/a", "s3://shared/b")
    policy = platform.storage_policy()
    assert not policy.local_paths
    assert output_problem("s3://shared/b/x", policy) is None
    assert output_problem("s3://other/x", policy) is not None


# --- templates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("{{ 9 ** 29999999 }}", "'**' would compute a number of more than 4096 bits"),
        ("{{ 1/0 }}", "ZeroDivisionError: division by zero"),
        ("{% include 'x' %}", "TypeError: no loader for this environment specified"),
        ("{% extends 'base' %}", "TypeError: no loader"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "attribute '__class__' of 'str' object is unsafe"),
        ("{{ text.__init__.__globals__ }}", "is unsafe"),
        ("{{ cycler.__init__.__globals__.os }}", "is unsafe"),
        ("{{ self._TemplateReference__context }}", "is unsafe"),
        ("{{ fields.__class__ }}", "is unsafe"),
        ("{{ nope }}", "unknown field or attribute: 'nope' is undefined"),
        ("{% if %}", "template syntax error on line 1"),
        ("{{ 'x' * 10**9 }}", "'*' would build a value of more than 1000000"),
        ("{{ [0] * 10**9 }}", "'*' would build"),
        ("{{ 10**1000 * 10**1000 }}", "'*' would compute"),
        ("{{ range(10**9)|list }}", "range() of more than 10000 numbers"),
        ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
        ("{{ '%999999999d' % 1 }}", "format widths and precisions"),
        ("{{ '{:999999999}'.format(1) }}", "format widths and precisions"),
        ("{{ '%s'|format(1) }}{{ '%.99999f'|format(1) }}", "format widths and precisions"),
        ("{{ text|center(10**9) }}", "'center' with a width above 10000"),
        ("{{ 'a'.ljust(10**9) }}", "str.ljust with a width above 10000"),
        ("{{ text|replace(' ', 'x' * 100000) }}", "replace would build more than"),
        ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "recurses too deeply"),
        ("{{ 1" + "0" * 5000 + " }}", "ValueError: Exceeds the limit"),
        ("x" * 20_001, "more than the limit of 20000"),
    ],
)
def test_template_payloads_are_the_fields_problem(template: str, reason: str) -> None:
    problem = check_text(template)
    assert problem is not None and reason in problem, problem
    assert "\n" not in problem and len(problem) < 300


def test_templates_that_render_pass() -> None:
    template = "{{ audience.label }} {{ style.instructions }}: {{ text|truncate(100) }} {{ fields.title }}"
    template += "{{ 2 ** 10 }} {{ '%5d'|format(3) }} {{ text|wordwrap(60) }}"
    assert check_text(template) is None


# 10**12 empty iterations: hours at any speed, with no output, so only time grows (an output this
# size would hit the memory limit first). Two nested loops (10**8) took 4.9 s on a quiet machine
# and passed a 5 s check.
LOOPING = "".join(f"{{% for {name} in range(10000) %}}" for name in "abc") + "{% endfor %}" * 3


def test_a_template_that_runs_too_long_is_stopped_and_named() -> None:
    problems = check_isolated({"web": "{{ text }}", "math": LOOPING, "story": "{{ text }}"}, timeout=4)
    assert problems == {
        "math": "checking the template took longer than 4 s (a loop or a huge value?)",
        "story": "not checked: another template override failed its check",
    }


def test_a_template_that_needs_too_much_memory_is_stopped_and_named() -> None:
    doubling = "{% set ns = namespace(a='xxxxxxxxxx') %}"
    doubling += "{% for i in range(40) %}{% set ns.a = ns.a ~ ns.a %}{% endfor %}"
    problems = check_isolated({"web": doubling}, timeout=60)
    assert problems == {"web": "template needs too much memory"}


def test_the_check_renders_seed_text_as_long_as_the_spec_allows() -> None:
    # Cheap on a short sample, 10^9 characters on a 100,000-character seed.
    template = "{% for word in text.split() %}{{ text }}{% endfor %}"
    assert check_text(template, sample_chars=20) is None
    problem = check_isolated({"web": template}, sample_chars=100_000)["web"]
    assert "more than 200000 characters" in problem or "memory" in problem or "longer than" in problem


def test_prompts_render_under_the_same_bounds(tmp_path: Path) -> None:
    from cosmoforge.spec.model import parse_run

    document = small_run("bounded")
    document["spec"]["prompts"]["templates"] = {"web": "{{ text * 100000 }}"}
    run = parse_run(document)  # schema-valid; the render check would refuse it on long seeds
    from cosmoforge.spec.validation import resolve_uri as resolve

    for seed in run.spec.seeds:
        seed.uri = resolve(seed.uri)
    with pytest.raises(Exception, match="would build a value"):
        list(build_prompts(run))


# --- conditions and events ------------------------------------------------------------------


def test_condition_messages_are_short_and_hold_no_secrets() -> None:
    row = "row 7: " + "secret customer data " * 100 + "\nsecond line"
    problems = [(f"spec.seeds[{i}].uri", row) for i in range(20)]
    problems.append(("spec.output.uri", "cannot open s3://AKIAEXAMPLE:hunter2@bucket/x?token=abc123"))
    message = summary(problems)
    assert len(message) <= 1024 and "second line" not in message and "(and 13 more)" in message
    assert "..." in message
    only_secret = summary(
        [("spec.output.uri", "cannot open s3://AKIA:hunter2@bucket/x?token=abc123 password: pw1")]
    )
    assert "hunter2" not in only_secret and "abc123" not in only_secret and "pw1" not in only_secret
    assert "s3://***@bucket" in only_secret


# --- random specs: problems, never a traceback ----------------------------------------------

_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        ["../..", "local:///etc", "http://169.254.169.254/", "cosmoforge://../..", "s3://b/k", "{{ 1/0 }}"]
    ),
)
_VALUES = st.recursive(
    _LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
_PATHS = st.sampled_from(
    [
        "metadata", "metadata.name", "metadata.labels", "metadata.annotations", "metadata.uid", "spec",
        "spec.seeds", "spec.seeds.0", "spec.seeds.0.uri", "spec.seeds.0.weight", "spec.seeds.0.limit",
        "spec.prompts", "spec.prompts.maxSeedChars", "spec.prompts.audiences", "spec.generation",
        "spec.generation.replicas", "spec.generation.timeoutSeconds", "spec.generation.sampling",
        "spec.generation.endpoint", "spec.output", "spec.output.uri", "spec.postprocess", "spec.training",
        "spec.clustering", "apiVersion", "kind", "status",
    ]
)  # fmt: skip


def _mutated(changes: list[tuple[str, Any]]) -> Any:
    document: Any = copy.deepcopy(small_run("random"))
    for path, value in changes:
        node = document
        parts = path.split(".")
        for part in parts[:-1]:
            child = node[int(part)] if part.isdigit() and isinstance(node, list) and node else None
            if child is None and isinstance(node, dict):
                child = node.get(part)
            if not isinstance(child, dict | list):
                break
            node = child
        else:
            last = parts[-1]
            if isinstance(node, dict):
                node[last] = value
            elif isinstance(node, list) and node and last.isdigit():
                node[0] = value
    return document


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_PATHS, _VALUES), min_size=1, max_size=4))
def test_random_documents_get_problems_never_a_traceback(changes: list[tuple[str, Any]]) -> None:
    document = _mutated(changes)
    try:
        text = yaml.safe_dump(document, sort_keys=False)
    except yaml.YAMLError:
        return
    try:
        validate_document(single_document(text, "random.yaml"), "random.yaml", CLUSTER)
    except SpecError as error:
        assert error.problems and all(isinstance(f, str) and isinstance(r, str) for f, r in error.problems)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_random_yaml_text_gets_problems_never_a_traceback(text: str) -> None:
    try:
        validate_document(single_document(text, "random.yaml"), "random.yaml", LAPTOP)
    except SpecError as error:
        assert error.problems


def test_the_chart_hands_one_storage_policy_to_the_operator_and_the_dispatcher() -> None:
    import helm_python as helm

    from conftest import REPO
    from cosmoforge.operator.render import Platform

    values = {
        "dispatcher": {"enabled": True},
        "storage": {"uri": "s3://datasets/runs", "allowedOutputs": ["s3://shared/a", "s3://shared/b"]},
    }
    with helm.Chart.load(str(REPO / "charts" / "cosmoforge")) as chart:
        files = chart.render(values, name="cf", namespace="cosmo", is_install=True)
    documents = [
        d for name, text in files.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d
    ]
    [config] = [
        d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-operator")
    ]
    [dispatcher] = [
        d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-dispatcher")
    ]
    [container] = dispatcher["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    expected = StoragePolicy(
        root="s3://datasets/runs", allowed=("s3://shared/a", "s3://shared/b"), local_paths=False
    )
    assert Platform.from_env(config["data"]).storage_policy() == expected
    assert StoragePolicy.from_env(env) == expected


# --- the operator ---------------------------------------------------------------------------


def test_the_operator_fails_a_hostile_run_with_a_short_condition_and_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nats_server: Any
) -> None:
    """The real kopf operator against the Kubernetes API fake the e2e tests use: a run whose
    template loops for longer than the check allows fails with `Valid=False` naming each field,
    and a good run created meanwhile gets its children: the check ran off the event loop."""
    from kopf.testing import KopfRunner
    from kubeapi import KubeApi, deployments_path, runs_path

    from conftest import wait_for
    from cosmoforge.operator.handlers import registry
    from cosmoforge.operator.render import Platform
    from cosmoforge.operator.settings import OperatorSettings

    namespace = "hostile"
    api = KubeApi().start()
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
    platform = Platform(nats_url=nats_server.url, output_base="s3://datasets/runs")
    settings = OperatorSettings(platform=platform, interval=0.5, post_events=False)

    def run_document(name: str) -> dict[str, Any]:
        document = small_run(name, engine="tgi", model="mistralai/Mixtral-8x7B-Instruct-v0.1")
        document["metadata"]["namespace"] = namespace
        document["spec"]["postprocess"] = {"dedup": {"enabled": False}, "decontaminate": {"enabled": False}}
        return document

    evil = run_document("evil")
    evil["spec"]["output"] = {"uri": "s3://other-tenant/runs"}
    evil["spec"]["seeds"][0]["uri"] = "http://169.254.169.254/latest/meta-data/"
    evil["spec"]["prompts"]["templates"] = {
        "web": LOOPING,
        "math": "{{ 9 ** 29999999 }}",
    }

    def valid_condition() -> dict[str, Any]:
        status = (api.get(runs_path(namespace, "evil")) or {}).get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == "Valid"), {})

    try:
        with KopfRunner(
            ["run", "--standalone", "--namespace", namespace], registry=registry(settings), timeout=60
        ) as runner:
            api.create(runs_path(namespace), evil)
            api.create(runs_path(namespace), run_document("good"))
            wait_for("good children", lambda: api.get(deployments_path(namespace, "good-inference")))
            valid = wait_for(
                "evil rejected", lambda: valid_condition().get("status") == "False" and valid_condition()
            )
            assert api.get(deployments_path(namespace, "evil-inference")) is None
        assert runner.exception is None
    finally:
        api.stop()
    assert valid["reason"] == "InvalidSpec"
    message = valid["message"]
    assert [part.split(": ")[0] for part in message.split("; ")] == [
        "spec.output.uri",
        "spec.seeds[0].uri",
        "spec.prompts.templates.web",
        "spec.prompts.templates.math",
    ], message
    assert "took longer than 5 s" in message and "Traceback" not in message and len(message) <= 1024


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=60) | st.from_regex(r"(https?|s3|cosmoforge|file|local)://.{0,40}", fullmatch=True),
    st.sampled_from([LAPTOP, CLUSTER]),
)
def test_random_uris_get_an_answer_never_a_traceback(uri: str, policy: StoragePolicy) -> None:
    for check in (output_problem, input_problem, host_problem):
        answer = check(uri, policy)
        assert answer is None or (isinstance(answer, str) and "\n" not in answer)
