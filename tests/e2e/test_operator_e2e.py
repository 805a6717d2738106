"""The operator path end to end on one machine: `kubectl apply` to a dataset in object storage.

The real kopf operator runs against kmock; a small stand-in kubelet turns the Deployments the
operator creates into real local processes (the generator command line exactly as rendered,
with the pod's environment, `$(VAR)` expansion and Service names resolved to loopback), and
the inference Deployment into the embedded TGI-speaking model server. Around them: a real
nats-server, the real dispatcher over gRPC, and an S3-compatible server for the data.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubeapi import KubeApi, deployments_path, runs_path

from conftest import COSMO, small_run, wait_for
from cosmoforge.generation.compact import read_dataset
from cosmoforge.operator.handlers import registry
from cosmoforge.operator.render import Platform
from cosmoforge.operator.settings import OperatorSettings
from cosmoforge.queue import EmbeddedNats
from cosmoforge.storage import RunStore
from processes import services

NS = "gen"


class Kubelet:
    """Runs each Deployment's pods as local processes and keeps their count at spec.replicas.

    `hosts` plays cluster DNS (Service name -> loopback URL); Deployments named in `external`
    are served by a process the test already runs (the model server), so they get no process.
    """

    def __init__(self, api: KubeApi, folder: Path, hosts: dict[str, str], external: set[str]):
        self.api, self.folder, self.hosts, self.external = api, folder, hosts, external
        self.pods: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.started = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)

    def __enter__(self) -> Kubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for processes in self.pods.values():
            for process in processes:
                self._end(process)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for deployment in self.api.items(deployments_path(NS)):
                self._sync(deployment)
            time.sleep(0.3)

    def _sync(self, deployment: dict[str, Any]) -> None:
        name = deployment["metadata"]["name"]
        if name in self.external:
            return
        wanted = int(deployment["spec"].get("replicas", 1))
        running = [p for p in self.pods.get(name, []) if p.poll() is None]  # a dead pod is replaced
        while len(running) > wanted:
            self._end(running.pop())
        while len(running) < wanted:
            running.append(self._start(deployment["spec"]["template"]["spec"]["containers"][0], name))
        self.pods[name] = running

    def _start(self, container: dict[str, Any], deployment: str) -> subprocess.Popen[bytes]:
        self.started += 1
        pod = f"{deployment}-{self.started}"
        scratch = self.folder / pod  # the pod's /tmp emptyDir
        scratch.mkdir(parents=True)
        env = {"POD_NAME": pod}
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = self._resolve(entry["value"].replace("/tmp", str(scratch)), env)
        assert container["command"] == ["cosmo"]
        args = [self._resolve(arg, env) for arg in container["args"]]
        log = (self.folder / f"{pod}.log").open("wb")
        return subprocess.Popen([*COSMO, *args], env={**os.environ, **env}, stdout=log, stderr=log)

    def _resolve(self, text: str, env: dict[str, str]) -> str:
        text = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)
        for host, url in self.hosts.items():
            text = text.replace(f"http://{host}", url)
        return text

    @staticmethod
    def _end(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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
        settings = OperatorSettings(platform=platform, interval=0.5, post_events=False)
        hosts = {"e2e-inference:8080": model_server}
        kubelet = Kubelet(cluster, tmp_path / "pods", hosts, external={"e2e-inference"})
        operator = KopfRunner(["run", "--standalone", "--namespace", NS], registry=registry(settings))
        with operator as runner, kubelet:
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
    registered = next(c for c in status["conditions"] if c["type"] == "Registered")
    assert registered["status"] == "True" and registered["reason"] == "Dispatched"
    assert status["outputs"]["dataset"] == f"{output}/e2e/dataset"
    dataset = read_dataset(RunStore.open(output, "e2e"))
    assert dataset is not None and dataset.num_rows == 4
    assert len(set(dataset.column("prompt_id").to_pylist())) == 4
    assert all(text for text in dataset.column("text").to_pylist())
