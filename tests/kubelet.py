"""A stand-in kubelet for kmock: the Deployments and Jobs the operator creates, as local processes.

Each pod runs its container's own command line (`cosmo ...` with the pod's environment, `$(VAR)`
expansion, a scratch folder for its /tmp emptyDir, Service names resolved to loopback URLs).
Deployments are kept at `spec.replicas` pods, a dead pod replaced. Jobs run as Kubernetes runs
them: an Indexed Job one pod per completion index (`JOB_COMPLETION_INDEX`), a work-queue Job
`parallelism` pods; a failed pod is replaced until `backoffLimit`, an exit code named by a
`FailJob` rule of the pod failure policy fails the Job at once, and the Job's status gets
`succeeded`/`failed` counts and the `Complete`/`Failed` condition, which is what the operator
reads. A Job's failed pod is recorded as a Pod object whose container status ends with the tail
of its log, as FallbackToLogsOnError has Kubernetes keep it. Deleting a Job or a Deployment ends
its pods.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kopf.testing import KopfRunner
from kubeapi import KubeApi, deployments_path, jobs_path, pods_path

from conftest import COSMO
from cosmoforge.operator.handlers import registry
from cosmoforge.operator.render import Platform
from cosmoforge.operator.settings import OperatorSettings


@dataclass
class Pod:
    name: str
    process: subprocess.Popen[bytes]
    index: int | None = None


@dataclass
class JobRun:
    uid: str
    pods: list[Pod] = field(default_factory=list)
    succeeded: set[int] = field(default_factory=set)  # completion indexes (or pod numbers) done
    failed: int = 0
    over: bool = False


class Kubelet:
    """Runs the pods of `namespace` until stopped. `hosts` plays cluster DNS; Deployments named in
    `external` are served by a process the test already runs (the model server): no pod."""

    def __init__(
        self,
        api: KubeApi,
        folder: Path,
        hosts: dict[str, str],
        external: set[str],
        namespace: str,
        env: dict[str, str] | None = None,
    ):
        self.api, self.folder, self.hosts, self.external = api, folder, hosts, external
        self.namespace, self.env = namespace, dict(env or {})
        self.pods: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.jobs: dict[str, JobRun] = {}
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
        for job in self.jobs.values():
            for pod in job.pods:
                self._end(pod.process)

    def log(self, pod_prefix: str) -> str:
        """Everything the pods whose name starts with `pod_prefix` wrote, oldest first."""
        logs = sorted(self.folder.glob(f"{pod_prefix}*.log"), key=lambda p: p.stat().st_mtime)
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in logs)

    def kill_one(self, job: str) -> str | None:
        """SIGKILL a running pod of `job` (a node lost); the Job replaces it. Its name, or None."""
        run = self.jobs.get(job)
        for pod in run.pods if run else []:
            if pod.process.poll() is None:
                pod.process.kill()
                return pod.name
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for deployment in self.api.items(deployments_path(self.namespace)):
                    self._sync(deployment)
                self._sync_jobs(self.api.items(jobs_path(self.namespace)))
            except Exception as error:  # a failed pass shows in the test's own waits
                print(f"kubelet: {error!r}")
            time.sleep(0.3)

    # --- Deployments ------------------------------------------------------------------------

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

    # --- Jobs -------------------------------------------------------------------------------

    def _sync_jobs(self, jobs: list[dict[str, Any]]) -> None:
        present = {job["metadata"]["name"]: job for job in jobs}
        for name in list(self.jobs):
            job = present.get(name)
            uid = (job or {}).get("metadata", {}).get("uid")
            if job is None or (uid and self.jobs[name].uid and uid != self.jobs[name].uid):  # deleted
                for pod in self.jobs.pop(name).pods:
                    self._end(pod.process)
        for name, job in present.items():
            run = self.jobs.setdefault(name, JobRun(job["metadata"].get("uid", "")))
            if not run.over:
                self._step(name, job, run)

    def _step(self, name: str, job: dict[str, Any], run: JobRun) -> None:
        spec = job["spec"]
        indexed = spec.get("completionMode") == "Indexed"
        completions = int(spec.get("completions") or 0)
        parallelism = int(spec.get("parallelism") or 1)
        container = spec["template"]["spec"]["containers"][0]
        fail_codes = {
            code
            for rule in (spec.get("podFailurePolicy") or {}).get("rules", [])
            if rule.get("action") == "FailJob" and "onExitCodes" in rule
            for code in rule["onExitCodes"]["values"]
        }
        alive: list[Pod] = []
        for pod in run.pods:
            code = pod.process.poll()
            if code is None:
                alive.append(pod)
            elif code == 0:
                run.succeeded.add(pod.index if pod.index is not None else len(run.succeeded))
            else:
                run.failed += 1
                self._record_failure(name, container["name"], pod, code)
                if code in fail_codes:
                    return self._finish(name, job, run, ok=False)
        run.pods = alive
        if run.failed > int(spec.get("backoffLimit", 6)):
            return self._finish(name, job, run, ok=False)
        if indexed:
            if len(run.succeeded) >= completions:
                return self._finish(name, job, run, ok=True)
            busy = {pod.index for pod in run.pods} | run.succeeded
            for index in range(completions):
                if index not in busy and len(run.pods) < parallelism:
                    run.pods.append(self._job_pod(name, container, index))
            return None
        if completions <= 1 and parallelism <= 1:
            if run.succeeded:
                return self._finish(name, job, run, ok=True)
        elif run.succeeded and not run.pods:  # a work queue: done once one pod succeeded, all ended
            return self._finish(name, job, run, ok=True)
        if not run.succeeded:
            while len(run.pods) < max(parallelism, 1):
                run.pods.append(self._job_pod(name, container, None))
        return None

    def _job_pod(self, job: str, container: dict[str, Any], index: int | None) -> Pod:
        extra = {"JOB_COMPLETION_INDEX": str(index)} if index is not None else {}
        process = self._start(container, job, extra)
        return Pod(f"{job}-{self.started}", process, index)

    def _record_failure(self, job: str, container: str, pod: Pod, code: int) -> None:
        # Kubernetes keeps at most the last 2048 bytes of the log as the termination message.
        tail = (self.folder / f"{pod.name}.log").read_bytes()[-2048:].decode(errors="replace")
        ended = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        terminated = {"exitCode": code, "message": tail, "finishedAt": ended}
        status = {
            "phase": "Failed",
            "containerStatuses": [{"name": container, "state": {"terminated": terminated}}],
        }
        metadata = {"name": pod.name, "namespace": self.namespace, "labels": {"job-name": job}}
        self.api.create(
            pods_path(self.namespace),
            {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "status": status},
        )

    def _finish(self, name: str, job: dict[str, Any], run: JobRun, ok: bool) -> None:
        run.over = True
        for pod in run.pods:
            self._end(pod.process)
        kind = "Complete" if ok else "Failed"
        status = {
            "succeeded": len(run.succeeded),
            "failed": run.failed,
            "conditions": [{"type": kind, "status": "True"}],
        }
        self.api.patch(jobs_path(self.namespace, name), {"status": status})

    # --- pods -------------------------------------------------------------------------------

    def _start(
        self, container: dict[str, Any], owner: str, extra: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.started += 1
        pod = f"{owner}-{self.started}"
        scratch = self.folder / pod  # the pod's /tmp emptyDir
        scratch.mkdir(parents=True)
        env = {"POD_NAME": pod, **self.env, **(extra or {})}
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = self._resolve(entry["value"].replace("/tmp", str(scratch)), env)
        assert container["command"] == ["cosmo"], container["command"]
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


@contextlib.contextmanager
def operator_and_pods(
    cluster: KubeApi, folder: Path, platform: Platform, namespace: str, inference: str, model_server: str
) -> Iterator[tuple[KopfRunner, Kubelet]]:
    """The real operator on `cluster` with the kubelet running its children; the Deployment
    `inference` (a run's server) is the test's model server, reached by its Service's name."""
    settings = OperatorSettings(platform=platform, interval=0.5, post_events=False)
    kubelet = Kubelet(cluster, folder / "pods", {f"{inference}:8080": model_server}, {inference}, namespace)
    operator = KopfRunner(["run", "--standalone", "--namespace", namespace], registry=registry(settings))
    with operator as runner, kubelet:
        yield runner, kubelet
