"""Everything cosmoforge puts on a cluster validates on every Kubernetes minor the chart supports.

The chart's `kubeVersion` names the supported minors, and managed clusters run several of them
at once while the API's schemas change between minors (1.29 to 1.34 require a podFailurePolicy
condition's `status`, which later minors default). So the operator's children for a
representative set of runs (every engine, keda, a decontamination worker pool, training) and
everything the chart installs in each CI scenario are validated strictly (an unknown field
fails) against each minor from the oldest supported to the newest that kubernetes-validate
ships.

kubernetes-validate's `validate` parses a version's definitions (over a megabyte of JSON) on
every call; here each version's definitions and each kind's validator are loaded once, from the
same schema files, which keeps the whole matrix to seconds.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from importlib import resources
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, latest_version, major_minor
from packaging.version import Version
from referencing import Registry, Resource

from conftest import EXAMPLES, REPO, small_run
from cosmoforge.operator.render import Platform, render_all
from cosmoforge.spec.model import load_run, parse_run

CHART = REPO / "charts" / "cosmoforge"
SCHEMAS = resources.files("kubernetes_validate") / "kubernetes-json-schema"
# Not Kubernetes' own kinds: their schemas are checked in test_operator_render and test_chart.
FOREIGN = ("keda.sh/", "monitoring.coreos.com/")
PLATFORM = Platform(
    output_base="s3://datasets/runs", storage_secret="object-store", storage_endpoint="http://minio:9000"
)
# Runs that together render every kind of child: each engine (and none, with an endpoint), keda
# scaling of servers and of generators, a decontamination worker pool, training and evaluation.
GENERATION: dict[str, dict[str, Any]] = {
    "tgi": {"engine": "tgi", "model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpusPerReplica": 2},
    "vllm": {"engine": "vllm", "gpusPerReplica": 4},
    "embedded": {"engine": "embedded"},
    "endpoint": {"engine": "openai", "endpoint": "https://llm.example.com/v1", "apiKeySecret": {"name": "k"}},
    "keda": {"engine": "tgi", "autoscaling": {"mode": "keda", "targetQueuePerReplica": 64}},
    "endpoint-keda": {"engine": "tgi", "endpoint": "http://tgi:8080", "autoscaling": {"mode": "keda"}},
}


def supported_minors() -> list[str]:
    """The minors from the chart's `kubeVersion` floor to the newest kubernetes-validate ships."""
    declared = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    # A floor only: a cap would refuse the next minor on install, before anyone could try it.
    floor = re.fullmatch(r">=(\d+)\.(\d+)\.0-0", declared)
    assert floor, f"kubeVersion {declared!r}: expected '>=MAJOR.MINOR.0-0'"
    oldest = Version(f"{floor[1]}.{floor[2]}")
    shipped = sorted({Version(major_minor(v)) for v in all_versions()})
    return [f"{v.major}.{v.minor}" for v in shipped if v >= oldest]


MINORS = supported_minors()


@functools.cache
def _definitions(minor: str) -> Registry:
    folder = SCHEMAS / f"v{minor}.0-local-strict"
    return Resource.from_contents(json.loads((folder / "_definitions.json").read_text())) @ Registry()


@functools.cache
def _validator(minor: str, kind: str, api_version: str) -> jsonschema.protocols.Validator:
    # The file naming kubernetes-validate uses: rbac.authorization.k8s.io/v1 -> rbac-v1.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = json.loads(
        (SCHEMAS / f"v{minor}.0-local-strict" / f"{kind.lower()}-{group_version}.json").read_text()
    )
    return jsonschema.Draft202012Validator(schema, registry=_definitions(minor))


def problems(documents: list[dict[str, Any]], minor: str) -> list[str]:
    """Every schema error of every document on this minor, as `kind/name: path: message`."""
    found = []
    for document in documents:
        validator = _validator(minor, document["kind"], document["apiVersion"])
        for error in validator.iter_errors(document):
            where = ".".join(str(part) for part in error.absolute_path)
            found.append(f"{document['kind']}/{document['metadata']['name']}: {where}: {error.message}")
    return found


def own_kinds(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in documents if not d["apiVersion"].startswith(FOREIGN)]


@functools.cache
def operator_children() -> tuple[dict[str, Any], ...]:
    documents: list[dict[str, Any]] = []
    for example in sorted(EXAMPLES.glob("*.yaml")):
        run = load_run(example)
        run.metadata.namespace = "gen"
        documents += render_all(run, PLATFORM)
    for name, generation in GENERATION.items():
        document = small_run(name, **generation)
        document["metadata"]["namespace"] = "gen"
        document["spec"]["postprocess"] = {"decontaminate": {"benchmarks": ["mmlu"], "workers": 3}}
        document["spec"]["training"] = {"preset": "tiny", "evalTasks": ["arc_easy"]}
        documents += render_all(parse_run(document), PLATFORM)
    # Clustering Jobs before generation, one on a GPU node of the spec's.
    document = small_run("topical")
    document["metadata"]["namespace"] = "gen"
    document["spec"]["seeds"] = [{"name": "web", "kind": "web", "uri": "s3://corpora/web.parquet"}]
    document["spec"]["clustering"] = {"gpu": True}
    document["spec"]["generation"]["serving"] = {"tolerations": [{"key": "gpu", "operator": "Exists"}]}
    documents += render_all(parse_run(document), PLATFORM)
    # Dedup's MinHash steps and tokenization as Indexed Jobs of datatrove ranks.
    document = small_run("ranked")
    document["metadata"]["namespace"] = "gen"
    document["spec"]["postprocess"] = {"ranks": 4, "decontaminate": {"enabled": False}}
    document["spec"]["training"] = {"preset": "tiny", "evalTasks": ["arc_easy"]}
    documents += render_all(parse_run(document), PLATFORM)
    # The nanotron training Job (Indexed completion mode) on two nodes, with its headless Service.
    document = small_run("nanotron")
    document["metadata"]["namespace"] = "gen"
    document["spec"]["training"] = {"preset": "1b", "evalTasks": ["arc_easy"], "parallelism": {"dp": 16}}
    documents += render_all(parse_run(document), PLATFORM)
    return tuple(own_kinds(documents))


@functools.cache
def chart_manifests() -> tuple[dict[str, Any], ...]:
    documents: list[dict[str, Any]] = []
    for scenario in sorted((CHART / "ci").glob("*-values.yaml")):
        values = yaml.safe_load(scenario.read_text()) or {}
        with helm.Chart.load(CHART) as chart:
            files = chart.render(values, name="cf", namespace="cosmo", is_install=True)
        documents += [
            d for name, text in files.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text)
        ]
    for path in (CHART / "crds" / "generationruns.yaml", REPO / "manifests" / "rbac.yaml"):
        documents += yaml.safe_load_all(path.read_text())
    return tuple(own_kinds([d for d in documents if d]))


def test_the_chart_supports_the_minors_managed_clusters_run_up_to_the_newest_schemas() -> None:
    newest = major_minor(latest_version())
    assert MINORS[0] == "1.29" and MINORS[-1] == newest
    # No minor in the range is skipped: kubernetes-validate ships each one's schemas.
    assert [Version(m).minor for m in MINORS] == list(range(29, Version(newest).minor + 1))


def test_the_representative_runs_render_every_kind_of_child() -> None:
    children = operator_children()
    kinds = {(d["kind"], d["metadata"]["name"].rsplit("-", 1)[-1]) for d in children}
    assert {("Deployment", "inference"), ("Service", "inference"), ("Deployment", "generator")} <= kinds
    names = {d["metadata"]["name"] for d in children}
    assert {"tgi-decontaminate-workers", "tgi-train", "tgi-evaluate", "topical-cluster-0"} <= names
    assert {"tgi-compact", "ranked-dedup-signatures", "ranked-dedup", "ranked-tokenize-ranks"} <= names
    assert any(d["kind"] == "Job" and "parallelism" in d["spec"] for d in children)  # a work queue
    assert any(d["kind"] == "Job" and d["spec"].get("completionMode") == "Indexed" for d in children)
    chart = {d["kind"] for d in chart_manifests()}
    assert {"CustomResourceDefinition", "Deployment", "StatefulSet", "ClusterRole", "Role"} <= chart


@pytest.mark.parametrize("minor", MINORS)
def test_operator_children_validate_strictly(minor: str) -> None:
    assert not problems(list(operator_children()), minor)


@pytest.mark.parametrize("minor", MINORS)
def test_chart_manifests_validate_strictly(minor: str) -> None:
    assert not problems(list(chart_manifests()), minor)


def _stage_job() -> dict[str, Any]:
    return next(d for d in operator_children() if d["metadata"]["name"] == "tgi-dedup")


def test_the_cached_validators_judge_as_kubernetes_validate_does() -> None:
    job = _stage_job()
    typo = copy.deepcopy(job)
    typo["spec"]["backofLimit"] = 2
    for minor in (MINORS[0], MINORS[-1]):
        kubernetes_validate.validate(job, f"{minor}.0", strict=True)
        assert not problems([job], minor)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(typo, f"{minor}.0", strict=True)
        assert problems([typo], minor) == [f"Job/tgi-dedup: spec: {_unexpected('backofLimit')}"]


def _unexpected(field: str) -> str:
    return f"Additional properties are not allowed ('{field}' was unexpected)"


def test_a_pod_condition_without_status_fails_the_minors_that_require_it() -> None:
    """The failure this matrix exists for: it passed on the newest minor and failed on six."""
    job = copy.deepcopy(_stage_job())
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        for condition in rule.get("onPodConditions", []):
            del condition["status"]
    failing = [minor for minor in MINORS if problems([job], minor)]
    assert failing == ["1.29", "1.30", "1.31", "1.32", "1.33", "1.34"]
