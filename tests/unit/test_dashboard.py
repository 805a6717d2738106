"""The Grafana dashboard the chart ships queries only metrics, and labels, that the code exports."""

from __future__ import annotations

import json
import re

from prometheus_client.metrics import MetricWrapperBase

from conftest import REPO
from cosmoforge.generation import metrics

DASHBOARD = REPO / "charts" / "cosmoforge" / "dashboards" / "cosmoforge-runs.json"
METRIC = re.compile(r"\bcosmoforge_[a-z_]+")
GROUPING = re.compile(r"\bby \(([^)]*)\)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported() -> dict[str, set[str]]:
    """Sample names as Prometheus scrapes them, with the labels each carries."""
    names: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames)  # the label names the metric was declared with
        for family in metric.describe():
            for suffix in SUFFIXES[family.type]:
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [
        v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)
    ]
    return exprs


def test_every_query_names_an_exported_metric() -> None:
    metrics = exported()
    assert "cosmoforge_generated_tokens_total" in metrics  # the registry was read
    used = {name for expr in queries() for name in METRIC.findall(expr)}
    assert used, "the dashboard queries nothing"
    assert sorted(used - set(metrics)) == []


def test_every_grouping_label_exists_on_the_metrics_it_groups() -> None:
    metrics = exported()
    for expr in queries():
        for group in GROUPING.findall(expr):
            labels = {label.strip() for label in group.split(",")}
            carriers = [metrics[name] for name in METRIC.findall(expr)]
            assert all(labels <= carried for carried in carriers), (expr, labels)


def test_the_dashboard_is_parameterised_by_data_source_and_run() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "run"}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all('run=~"$run"' in t["expr"] for t in panel["targets"])
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
