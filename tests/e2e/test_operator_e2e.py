"""The operator path end to end on one machine: `kubectl apply` to a dataset in object storage.

The real kopf operator runs against kmock; the stand-in kubelet (tests/kubelet.py) turns the
Deployments the operator creates into real local processes (the generator command line exactly
as rendered, with the pod's environment, `$(VAR)` expansion and Service names resolved to
loopback), and the inference Deployment into the embedded TGI-speaking model server. Around them: a real
nats-server, the real dispatcher over gRPC, and an S3-compatible server for the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubeapi import KubeApi, deployments_path, runs_path
from kubelet import operator_and_pods

from conftest import small_run, wait_for
from cosmoforge.generation.compact import read_dataset
from cosmoforge.operator.render import Platform
from cosmoforge.queue import EmbeddedNats
from cosmoforge.storage import RunStore
from processes import services

NS = "gen"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[KubeApi]:
    api = KubeApi().start()
    yield api
    api.stop()


def test_apply_to_dataset_in_object_storage(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cluster: KubeApi,
    nats_server: EmbeddedNats,
    model_server: str,
    s3_endpoint: str,
    s3_bucket: str,
) -> None:
    output = f"s3://{s3_bucket}/runs"
    document = small_run("e2e", maxNewTokens=8, workers=1)
    document["metadata"]["namespace"] = NS
    document["spec"]["prompts"].update(limit=4, maxSeedChars=300)
    document["spec"]["postprocess"] = {"dedup": {"enabled": False}, "decontaminate": {"enabled": False}}
    document["spec"]["output"] = {"uri": output}

    with services(tmp_path) as processes:
        dispatcher = processes.dispatcher(nats_server.url)
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig(tmp_path / "kubeconfig")))
        platform = Platform(
            nats_url=nats_server.url, dispatcher=dispatcher.target, storage_endpoint=s3_endpoint
        )
        with operator_and_pods(cluster, tmp_path, platform, NS, "e2e-inference", model_server) as (
            runner,
            kubelet,
        ):
            cluster.create(runs_path(NS), document)

            def phase() -> str:
                return str(((cluster.get(runs_path(NS, "e2e")) or {}).get("status") or {}).get("phase"))

            wait_for("generator pods", lambda: kubelet.pods.get("e2e-generator"), timeout=60)
            wait_for("Succeeded", lambda: phase() in ("Succeeded", "Failed"), timeout=120)
            status = cluster.get(runs_path(NS, "e2e"))["status"]  # type: ignore[index]
            assert status["phase"] == "Succeeded", (status, dispatcher.output()[-3000:])
            wait_for("generators stopped", lambda: not kubelet.pods.get("e2e-generator"), timeout=30)
            server = cluster.get(deployments_path(NS, "e2e-inference"))
            assert server is not None and server["spec"]["replicas"] == 0
        assert runner.exception is None

    assert status["prompts"] == 4 and status["generated"] == 4 and status["failed"] == 0
    # What it was expected to cost, written once the prompts were counted, and what it cost.
    assert status["estimate"]["prompts"] == 4 and status["estimate"]["completionTokens"] == 4 * 8
    assert status["tokens"] > 0 and status["eta"] == ""
    assert status["spend"]["gpuHours"] > 0  # one inference replica with one GPU, for seconds
    registered = next(c for c in status["conditions"] if c["type"] == "Registered")
    assert registered["status"] == "True" and registered["reason"] == "Dispatched"
    assert status["outputs"]["dataset"] == f"{output}/e2e/dataset"
    dataset = read_dataset(RunStore.open(output, "e2e"))
    assert dataset is not None and dataset.num_rows == 4
    assert len(set(dataset.column("prompt_id").to_pylist())) == 4
    assert all(text for text in dataset.column("text").to_pylist())
