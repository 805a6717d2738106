"""The Helm chart, rendered and linted by Helm's own library (helm-python-sdk), no cluster.

Every scenario in charts/cosmoforge/ci renders manifests that the newest Kubernetes release
kubernetes-validate ships accepts (strict; every supported minor is in test_k8s_versions), pods
are locked down, RBAC is exactly what the operator uses, the operator's settings point at the
Services the chart creates and name an image per role, skaffold builds those images, and
values.schema.json refuses values that would otherwise be silently ignored or break the install.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import REPO
from cosmoforge.operator.kube import operator_rules
from cosmoforge.operator.render import UID, Platform, Role

CHART = REPO / "charts" / "cosmoforge"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
K8S_VERSION = kubernetes_validate.latest_version()
NAMESPACE = "cosmo"

ENDPOINTS_SCHEMA: dict[str, Any] = {
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
}


def monitor_schema(endpoints: str, **more: Any) -> dict[str, Any]:
    """The Prometheus operator's ServiceMonitor or PodMonitor, the parts the chart uses (their
    CRDs are not installed here)."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["selector", endpoints],
                "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object", "required": ["matchLabels"]},
                    endpoints: ENDPOINTS_SCHEMA,
                    **more,
                },
            },
        },
    }


NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array"}},
}
MONITORING_SCHEMAS = {
    "ServiceMonitor": monitor_schema("endpoints"),
    "PodMonitor": monitor_schema("podMetricsEndpoints", namespaceSelector=NAMESPACE_SELECTOR),
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


def operator_config(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in of_kind(documents, "ConfigMap") if d["metadata"]["name"].endswith("-operator")]


def pods(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in documents if d["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_every_scenario_renders_valid_manifests_and_lints_clean(scenario: Path) -> None:
    values = values_of(scenario)
    documents = render(values)
    assert of_kind(documents, "Deployment")
    for document in documents:
        if document["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.validate(document, MONITORING_SCHEMAS[document["kind"]])
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
    (config,) = operator_config(documents)
    platform = Platform.from_env(config["data"])
    services = {s["metadata"]["name"]: s for s in of_kind(documents, "Service")}
    nats_host = platform.nats_url.removeprefix("nats://").split(":")[0]
    assert nats_host == f"cf-cosmoforge-nats.{NAMESPACE}.svc" and "cf-cosmoforge-nats" in services
    dispatcher_host, port = (platform.dispatcher or "").split(":")
    assert dispatcher_host == f"cf-cosmoforge-dispatcher.{NAMESPACE}.svc"
    assert int(port) in [p["port"] for p in services["cf-cosmoforge-dispatcher"]["spec"]["ports"]]
    assert platform.output_base == "s3://data/cf" and platform.storage_secret == "s3"
    # Where the projects publish them: TGI on GitHub's registry, vLLM on Docker Hub.
    assert platform.tgi_image == "ghcr.io/huggingface/text-generation-inference:3.3.4"
    assert platform.vllm_image == "docker.io/vllm/vllm-openai:v0.11.0"
    operator = next(
        d for d in of_kind(documents, "Deployment") if d["metadata"]["name"].endswith("-operator")
    )
    template = operator["spec"]["template"]
    assert "checksum/config" in template["metadata"]["annotations"]
    assert template["spec"]["containers"][0]["args"][:2] == ["operator", f"--namespace={NAMESPACE}"]


def test_values_name_an_image_per_role_and_the_operator_gets_each() -> None:
    defaults = operator_config(render({}))[0]["data"]
    assert {role: Platform.from_env(defaults).image_for(role) for role in Role} == {
        Role.runtime: "cosmoforge:0.1.0",
        Role.postprocess: "cosmoforge-postprocess:0.1.0",
        Role.trainer: "cosmoforge-trainer:0.1.0",
    }
    mirror = render(values_of(CHART / "ci" / "cluster-wide-keda-values.yaml"))
    platform = Platform.from_env(operator_config(mirror)[0]["data"])
    assert platform.image_for(Role.postprocess) == "registry.example.com/mirror/cosmoforge-postprocess:0.1.0"
    assert platform.image_for(Role.trainer) == "registry.example.com/mirror/cosmoforge-trainer:0.1.0"
    # The chart's own pods run the runtime image, the one the operator gives generators.
    for pod in pods(mirror):
        if pod["containers"][0]["name"] in ("operator", "dispatcher"):
            assert pod["containers"][0]["image"] == platform.image_for(Role.runtime)


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
    ("latest trainer tag", {"trainerImage": {"tag": "latest"}}, "/trainerImage/tag"),
    ("unknown key in a role image", {"postprocessImage": {"repo": "x"}}, "repo"),
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


# Each skaffold artifact, the Dockerfile target it builds and the chart value that names it.
ARTIFACTS = {
    "cosmoforge": ("runtime", "image"),
    "cosmoforge-postprocess": ("postprocess", "postprocessImage"),
    "cosmoforge-trainer": ("trainer", "trainerImage"),
}


def _stages() -> dict[str, tuple[str, str]]:
    """The Dockerfile's stages: name -> (what it is built FROM, its instructions)."""
    stages: dict[str, tuple[str, str]] = {}
    for block in re.split(r"^FROM ", (REPO / "Dockerfile").read_text(), flags=re.MULTILINE)[1:]:
        first, _, body = block.partition("\n")
        base, _, name = first.partition(" AS ")
        stages[name.strip()] = (base.strip(), body)
    return stages


def test_skaffold_builds_each_role_image_and_deploys_the_chart_with_it() -> None:
    config = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    assert [p["name"] for p in config["profiles"]] == ["gpu"]
    (gpu,) = config["profiles"]
    stages = _stages()
    with helm.Chart.load(CHART) as chart:
        for build, deploy in ((config["build"], config["deploy"]), (gpu["build"], gpu["deploy"])):
            (release,) = deploy["helm"]["releases"]
            assert (REPO / release["chartPath"]).resolve() == CHART.resolve()
            built = [artifact["image"] for artifact in build["artifacts"]]
            templates: dict[str, str] = {}
            for artifact in build["artifacts"]:
                target, value = ARTIFACTS[artifact["image"]]
                assert artifact["docker"] == {"dockerfile": "Dockerfile", "target": target}
                assert target in stages
                variable = artifact["image"].replace("-", "_")
                templates[f"{value}.repository"] = f"{{{{.IMAGE_REPO_{variable}}}}}"
                templates[f"{value}.tag"] = f"{{{{.IMAGE_TAG_{variable}}}}}@{{{{.IMAGE_DIGEST_{variable}}}}}"
            assert release["setValueTemplates"] == templates
            values = {**release.get("setValues", {}), **{key: "dev" for key in templates}}
            chart.validate_schema(chart.merge_values(_dotted(values)))
    # The default loop skips the CUDA trainer image; the gpu profile builds all three.
    assert [a["image"] for a in config["build"]["artifacts"]] == ["cosmoforge", "cosmoforge-postprocess"]
    assert built == list(ARTIFACTS)


def test_images_run_as_the_non_root_user_the_pods_expect_without_compilers() -> None:
    stages = _stages()
    for target, _ in ARTIFACTS.values():
        base, body = stages[target]
        users = [line.split()[1] for line in body.splitlines() if line.startswith("USER ")]
        assert users == [f"{UID}:{UID}"], target
        # Built FROM a clean base, never FROM a stage with compilers.
        ancestry = [base]
        while ancestry[-1] in stages:
            ancestry.append(stages[ancestry[-1]][0])
        assert not any("build-essential" in stages[s][1] or "-devel" in s for s in ancestry[:-1]), target
        assert "-devel" not in ancestry[-1], target
    # Pods cannot write generated gRPC code: the runtime image has it from the build.
    assert "python -m cosmoforge.services.protogen" in stages["build-runtime"][1]
    # A plain `docker build .` still makes the runtime image: it is the last stage.
    assert list(stages)[-1] == "runtime"


# Packages only the tests use: they belong in the `dev` extra, never in an image.
TEST_ONLY = ("kubernetes-validate", "openapi-schema-validator", "helm-python-sdk")
TEST_ONLY_MODULES = ("kubernetes_validate", "openapi_schema_validator", "helm_python", "kubernetes")


def _extras() -> dict[str, list[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {name: [re.split(r"[<>=\[; ]", dep)[0] for dep in deps] for name, deps in
            project["optional-dependencies"].items()}  # fmt: skip


def _image_extras() -> list[set[str]]:
    """Every extras list an image is built with: one per build stage of the Dockerfile."""
    dockerfile = (REPO / "Dockerfile").read_text()
    extras = re.findall(r"^ARG EXTRAS=(\S+)$", dockerfile, flags=re.MULTILINE)
    assert len(extras) == len(ARTIFACTS)
    return [set(names.split(",")) for names in extras]


def test_images_install_runtime_extras_only_and_tests_get_their_checkers() -> None:
    extras = _extras()
    for wanted in _image_extras():
        assert wanted <= set(extras) - {"dev", "all"}, wanted
        installed = {dep for name in wanted for dep in extras[name]}
        assert not installed & set(TEST_ONLY), installed & set(TEST_ONLY)
    assert set(TEST_ONLY) <= set(extras["dev"])
    assert '-e ".[all,dev]"' in (REPO / "Makefile").read_text()  # `make test` installs them


def test_the_package_never_imports_a_test_only_or_undeclared_client() -> None:
    for path in (REPO / "cosmoforge").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in TEST_ONLY_MODULES, f"{path}: imports {name}"


def test_monitoring_scrapes_dispatcher_and_generators_and_ships_the_dashboard() -> None:
    plain = render(values_of(CHART / "ci" / "default-values.yaml"))
    assert not [d for d in plain if d["kind"] in ("ServiceMonitor", "PodMonitor", "ConfigMap") and
                "dashboard" in d["metadata"]["name"]]  # fmt: skip
    assert of_kind(plain, "PodMonitor") == []
    teams = render(values_of(CHART / "ci" / "namespaces-monitoring-values.yaml"))
    monitor, operator_monitor = of_kind(teams, "PodMonitor")
    # The operator serves each run's ETA, spend and estimate on the port its monitor scrapes.
    (deployment,) = [d for d in of_kind(teams, "Deployment") if d["metadata"]["name"].endswith("operator")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port = next(p for p in container["ports"] if p["name"] == "metrics")["containerPort"]
    assert f"--metrics-port={port}" in container["args"]
    assert operator_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert operator_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "generator"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    (dashboard,) = [d for d in of_kind(teams, "ConfigMap") if "cosmoforge-runs.json" in d.get("data", {})]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    shipped = (CHART / "dashboards" / "cosmoforge-runs.json").read_text()
    assert json.loads(dashboard["data"]["cosmoforge-runs.json"]) == json.loads(shipped)
    wide = render(
        values_of(CHART / "ci" / "cluster-wide-keda-values.yaml")
        | {"metrics": {"podMonitor": {"enabled": True}}}
    )
    assert of_kind(wide, "PodMonitor")[0]["spec"]["namespaceSelector"] == {"any": True}


def test_generators_serve_metrics_on_the_port_the_pod_monitor_scrapes() -> None:
    from cosmoforge.operator.render.generator import METRICS_PORT, generator_deployment
    from cosmoforge.spec.model import parse_run

    run = parse_run(yaml.safe_load((REPO / "manifests" / "examples" / "quickstart.yaml").read_text()))
    platform = Platform(image="cosmoforge:test", output_base="s3://bucket/runs")
    deployment = generator_deployment(run, platform, 1)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "metrics", "containerPort": METRICS_PORT} in container["ports"]
    assert container["args"][container["args"].index("--metrics-port") + 1] == str(METRICS_PORT)
    assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "generator"


# --- the control plane on a shared cluster (issue 18) -------------------------------------------


def _named(documents: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    (found,) = [d for d in of_kind(documents, kind) if d["metadata"]["name"].endswith(suffix)]
    return found


def _container(documents: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    container: dict[str, Any] = _named(documents, kind, suffix)["spec"]["template"]["spec"]["containers"][0]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_the_dispatcher_wants_the_token_from_a_secret_and_never_overlaps() -> None:
    documents = render({})
    secret = _named(documents, "Secret", "-token")
    assert len(secret["data"]["token"]) >= 48  # base64 of 48 random characters
    reference = {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "token"}}
    dispatcher = _named(documents, "Deployment", "-dispatcher")
    assert dispatcher["spec"]["strategy"] == {"type": "Recreate"}
    server = _container(documents, "Deployment", "-dispatcher")
    assert _env(server)["COSMOFORGE_TOKEN"] == reference
    assert "--host=0.0.0.0" in server["args"]
    assert _env(_container(documents, "Deployment", "-operator"))["COSMOFORGE_TOKEN"] == reference

    given = render({"auth": {"existingSecret": "team-token", "tokenKey": "bearer"}})
    assert not [s for s in of_kind(given, "Secret") if s["metadata"]["name"].endswith("-token")]
    for suffix in ("-dispatcher", "-operator"):
        env = _env(_container(given, "Deployment", suffix))
        assert env["COSMOFORGE_TOKEN"] == {"secretKeyRef": {"name": "team-token", "key": "bearer"}}


def test_nats_credentials_live_in_a_secret_only() -> None:
    import base64

    documents = render({})
    secret = _named(documents, "Secret", "-nats-auth")
    password = base64.b64decode(secret["data"]["COSMO_NATS_PASSWORD"]).decode()
    assert len(password) >= 32
    name = secret["metadata"]["name"]
    (nats,) = of_kind(documents, "StatefulSet")
    (server,) = nats["spec"]["template"]["spec"]["containers"]
    assert {"secretRef": {"name": name}} in server["envFrom"]
    assert "--config=/etc/nats/nats.conf" in server["args"]
    conf = _named(documents, "ConfigMap", "-nats-config")["data"]["nats.conf"]
    assert "$COSMO_NATS_PASSWORD" in conf and "$COSMO_NATS_USER" in conf
    assert operator_config(documents)[0]["data"]["COSMO_NATS_SECRET"] == name
    for suffix in ("-dispatcher", "-operator"):
        assert {"secretRef": {"name": name}} in _container(documents, "Deployment", suffix)["envFrom"]
    # The password is in its Secret and nowhere else: no ConfigMap, argument or URL holds it.
    elsewhere = [d for d in documents if d is not secret]
    assert password not in yaml.safe_dump_all(elsewhere)

    external = render(values_of(CHART / "ci" / "external-nats-values.yaml"))
    assert not [s for s in of_kind(external, "Secret") if "nats" in s["metadata"]["name"]]
    assert operator_config(external)[0]["data"]["COSMO_NATS_SECRET"] == "nats-client"
    with pytest.raises(Exception, match="existingSecret"):
        render({"nats": {"bundled": {"enabled": False}, "url": "nats://nats.messaging:4222"}})
    plain = render({"nats": {"auth": {"enabled": False}}})
    assert not of_kind(plain, "StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0].get("envFrom")
    assert operator_config(plain)[0]["data"]["COSMO_NATS_SECRET"] == ""


def test_a_nats_url_with_credentials_is_refused() -> None:
    values = {"nats": {"bundled": {"enabled": False}, "url": "nats://user:hunter2@nats:4222"}}
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(chart.merge_values(values))
    assert "/nats/url" in str(caught.value)
    with pytest.raises(ValueError, match="credentials") as refused:
        Platform(nats_url="nats://user:hunter2@nats:4222")
    assert "hunter2" not in str(refused.value)


def _peers_of(policy: dict[str, Any], port: str | int) -> list[dict[str, Any]]:
    rules = [r for r in policy["spec"]["ingress"] if [p["port"] for p in r["ports"]] == [port]]
    return [peer for rule in rules for peer in rule["from"]]


def test_network_policies_admit_only_cosmoforge_and_the_scrapers() -> None:
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prom"}}}]
    documents = render(values_of(CHART / "ci" / "namespaces-monitoring-values.yaml") | {
        "networkPolicy": {"metricsFrom": monitoring}
    })  # fmt: skip
    policies = of_kind(documents, "NetworkPolicy")
    for policy in policies:
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    nats = _named(documents, "NetworkPolicy", "-nats")
    (own,) = _peers_of(nats, "client")
    assert own["podSelector"]["matchExpressions"][0]["values"][0] == "cosmoforge"
    namespaces = own["namespaceSelector"]["matchExpressions"][0]["values"]
    assert sorted(namespaces) == sorted([NAMESPACE, "team-a", "team-b"])
    assert monitoring[0] in _peers_of(nats, "monitor")
    dispatcher = _named(documents, "NetworkPolicy", "-dispatcher")
    assert _peers_of(dispatcher, "grpc") == [own]
    assert _peers_of(dispatcher, "metrics") == monitoring
    runs = [p for p in policies if p["metadata"]["name"].endswith("-runs")]
    assert sorted(p["metadata"]["namespace"] for p in runs) == ["team-a", "team-b"]
    for policy in runs:
        managed = {"app.kubernetes.io/managed-by": "cosmoforge-operator"}
        assert policy["spec"]["podSelector"]["matchLabels"] == managed
        (generators,) = _peers_of(policy, 8080)
        assert generators["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "generator"
        assert "namespaceSelector" not in generators  # the run's own namespace only
        assert _peers_of(policy, 9100) == monitoring

    wide = render(values_of(CHART / "ci" / "cluster-wide-keda-values.yaml"))
    (own,) = _peers_of(_named(wide, "NetworkPolicy", "-nats"), "client")
    assert own["namespaceSelector"] == {}
    assert not [p for p in of_kind(wide, "NetworkPolicy") if p["metadata"]["name"].endswith("-runs")]
    assert not of_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")
