"""The Helm chart, rendered and linted by Helm's own library (helm-python-sdk), no cluster.

Every scenario in charts/cosmoforge/ci renders manifests that a current Kubernetes release
accepts (kubernetes-validate, strict), pods are locked down, RBAC is exactly what the operator
uses, the operator's settings point at the Services the chart creates, and values.schema.json
refuses values that would otherwise be silently ignored or break the install.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import REPO
from cosmoforge.operator.kube import operator_rules
from cosmoforge.operator.render import UID, Platform

CHART = REPO / "charts" / "cosmoforge"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
K8S_VERSION = "1.37.0"
NAMESPACE = "cosmo"

SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string"},
                        },
                    },
                },
            },
        },
    },
}


def values_of(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name="cf", namespace=NAMESPACE, is_install=True)
    documents = []
    for name, text in files.items():
        if name.endswith(".yaml"):
            documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def pods(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in documents if d["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_every_scenario_renders_valid_manifests_and_lints_clean(scenario: Path) -> None:
    values = values_of(scenario)
    documents = render(values)
    assert of_kind(documents, "Deployment")
    for document in documents:
        if document["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.validate(document, SERVICE_MONITOR_SCHEMA)
        else:
            kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_pods_are_non_root_read_only_and_drop_capabilities(scenario: Path) -> None:
    for pod in pods(render(values_of(scenario))):
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["limits"]["memory"]


def _rules(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: rule[k] for k in ("apiGroups", "resources", "verbs")} for rule in role["rules"]]


def test_rbac_is_exactly_what_the_operator_uses() -> None:
    documents = render({})
    (role,) = of_kind(documents, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _rules(role) == operator_rules(keda=False, events=True)
    assert not of_kind(documents, "ClusterRole")

    wide = render(values_of(CHART / "ci" / "cluster-wide-keda-values.yaml"))
    (cluster_role,) = of_kind(wide, "ClusterRole")
    assert _rules(cluster_role) == operator_rules(keda=True, events=True)
    assert not of_kind(wide, "Role")
    (deployment,) = [
        d for d in of_kind(wide, "Deployment") if d["metadata"]["name"] == "cf-cosmoforge-operator"
    ]
    assert "--all-namespaces" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]

    teams = render(values_of(CHART / "ci" / "namespaces-monitoring-values.yaml"))
    roles = of_kind(teams, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(_rules(r) == operator_rules(keda=False, events=False) for r in roles)
    bindings = of_kind(teams, "RoleBinding")
    assert {b["subjects"][0]["namespace"] for b in bindings} == {NAMESPACE}


def test_plain_rbac_manifest_matches_the_operator() -> None:
    documents = [d for d in yaml.safe_load_all((REPO / "manifests" / "rbac.yaml").read_text()) if d]
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    (role,) = of_kind(documents, "ClusterRole")
    assert _rules(role) == operator_rules(keda=True, events=True)


def test_operator_settings_point_at_the_chart_services() -> None:
    documents = render({"storage": {"uri": "s3://data/cf", "credentials": {"secretName": "s3"}}})
    (config,) = of_kind(documents, "ConfigMap")
    platform = Platform.from_env(config["data"])
    services = {s["metadata"]["name"]: s for s in of_kind(documents, "Service")}
    nats_host = platform.nats_url.removeprefix("nats://").split(":")[0]
    assert nats_host == f"cf-cosmoforge-nats.{NAMESPACE}.svc" and "cf-cosmoforge-nats" in services
    dispatcher_host, port = (platform.dispatcher or "").split(":")
    assert dispatcher_host == f"cf-cosmoforge-dispatcher.{NAMESPACE}.svc"
    assert int(port) in [p["port"] for p in services["cf-cosmoforge-dispatcher"]["spec"]["ports"]]
    assert platform.output_base == "s3://data/cf" and platform.storage_secret == "s3"
    assert platform.tgi_image.endswith("text-generation-inference:3.3.4")
    operator = next(
        d for d in of_kind(documents, "Deployment") if d["metadata"]["name"].endswith("-operator")
    )
    template = operator["spec"]["template"]
    assert "checksum/config" in template["metadata"]["annotations"]
    assert template["spec"]["containers"][0]["args"][:2] == ["operator", f"--namespace={NAMESPACE}"]


def test_bundled_nats_has_jetstream_and_a_volume() -> None:
    (nats,) = of_kind(render({}), "StatefulSet")
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    assert "--jetstream" in container["args"] and "--store_dir=/data" in container["args"]
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    external = render(values_of(CHART / "ci" / "external-nats-values.yaml"))
    assert not of_kind(external, "StatefulSet")
    (config,) = of_kind(external, "ConfigMap")
    assert config["data"]["COSMO_NATS_URL"] == "nats://nats.messaging.svc:4222"


def test_chart_crd_is_the_generated_one() -> None:
    generated = (REPO / "manifests" / "crds" / "generationruns.yaml").read_text()
    assert (CHART / "crds" / "generationruns.yaml").read_text() == generated, "copy the regenerated CRD"


BAD_VALUES = [
    # (what is wrong, values, where the schema points)
    ("typo in a key", {"opertor": {"replicas": 1}}, "opertor"),
    ("unknown nested key", {"operator": {"watch": {"namespace": ["a"]}}}, "namespace"),
    ("two operators", {"operator": {"replicas": 2}}, "/operator/replicas"),
    ("latest tag", {"image": {"tag": "latest"}}, "/image/tag"),
    ("external NATS without a URL", {"nats": {"bundled": {"enabled": False}}}, "/nats/url"),
    ("storage endpoint not a URL", {"storage": {"endpoint": "minio:9000"}}, "/storage/endpoint"),
    ("root pods", {"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    (
        "privilege escalation",
        {"securityContext": {"allowPrivilegeEscalation": True}},
        "allowPrivilegeEscalation",
    ),
    ("bad quantity", {"dispatcher": {"resources": {"limits": {"memory": "lots"}}}}, "/limits/memory"),
]


@pytest.mark.parametrize(("what", "values", "where"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_refused_by_the_schema(what: str, values: dict[str, Any], where: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as caught:
            chart.validate_schema(chart.merge_values(copy.deepcopy(values)))
        assert where in str(caught.value)
        with pytest.raises(helm.HelmValuesError):
            chart.render(values, name="cf", namespace=NAMESPACE)


def test_documented_values_pass_the_schema() -> None:
    with helm.Chart.load(CHART) as chart:
        for scenario in SCENARIOS:
            chart.validate_schema(chart.merge_values(values_of(scenario)))


def _dotted(values: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in values.items():
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def test_skaffold_deploys_this_chart_with_values_it_accepts() -> None:
    config = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    deploys = [config["deploy"]] + [p["deploy"] for p in config["profiles"]]
    assert [p["name"] for p in config["profiles"]] == ["gpu"]
    with helm.Chart.load(CHART) as chart:
        for deploy in deploys:
            (release,) = deploy["helm"]["releases"]
            assert (REPO / release["chartPath"]).resolve() == CHART.resolve()
            values = _dotted(
                {**release.get("setValues", {}), "image.repository": "cosmoforge", "image.tag": "dev"}
            )
            chart.validate_schema(chart.merge_values(values))
            assert set(release["setValueTemplates"]) == {"image.repository", "image.tag"}


def test_image_runs_as_the_non_root_user_the_pods_expect() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert dockerfile.count("FROM ") == 2  # build stage, then a runtime without compilers
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users == [f"{UID}:{UID}"]
    assert "python -m cosmoforge.protogen" in dockerfile  # pods cannot write generated code
