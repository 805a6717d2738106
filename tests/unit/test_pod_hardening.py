"""What the operator renders for a shared GPU cluster: locked-down servers, allowed flags, deadlines.

Pure functions of the spec, so each rule is a table over specs; every manifest is also checked
against Kubernetes' own schema (strict), so a hardening field with a typo would fail here.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from conftest import small_run
from cosmoforge.operator.render import Platform, RenderError, render_all, server_args, stage_jobs, stages
from cosmoforge.operator.render.jobs import STAGE_DEADLINES
from cosmoforge.spec.model import GenerationRun, parse_run

PLATFORM = Platform(output_base="s3://datasets/runs")
K8S_VERSION = kubernetes_validate.latest_version()


def run_of(name: str = "hard", **generation: Any) -> GenerationRun:
    document = small_run(name, **generation)
    document["metadata"]["namespace"] = "gen"
    return parse_run(document)


def server_pod(run: GenerationRun) -> dict[str, Any]:
    deployment = next(
        m
        for m in render_all(run, PLATFORM)
        if m["kind"] == "Deployment" and m["metadata"]["name"].endswith("-inference")
    )
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


@pytest.mark.parametrize("engine", ["tgi", "vllm"])
def test_gpu_servers_run_locked_down_with_bounded_volumes(engine: str) -> None:
    run = run_of(engine=engine, gpusPerReplica=1)
    pod = server_pod(run)
    (server,) = pod["containers"]
    security = server["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["model-cache"]["emptyDir"]["sizeLimit"]
    assert all("sizeLimit" in v["emptyDir"] for v in volumes.values() if "emptyDir" in v)
    resources = server["resources"]
    assert resources["limits"]["memory"] and resources["requests"]["cpu"]
    env = {entry["name"]: entry.get("value") for entry in server["env"]}
    assert env["HOME"] == "/tmp" and env["HF_HOME"] == "/data"  # writable as a non-root user
    for manifest in render_all(run, PLATFORM):
        if manifest["apiVersion"] != "keda.sh/v1alpha1":
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_a_spec_sized_server_keeps_its_own_sizes() -> None:
    pod = server_pod(run_of(engine="tgi", gpusPerReplica=1, serving={"memory": "200Gi", "cpu": "16"}))
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["memory"] == resources["requests"]["memory"] == "200Gi"
    assert resources["requests"]["cpu"] == "16"


@pytest.mark.parametrize(
    ("engine", "extra"),
    [
        ("tgi", ["--max-batch-prefill-tokens", "4096", "--quantize=fp8", "--disable-custom-kernels"]),
        ("vllm", ["--gpu-memory-utilization", "0.85", "--enable-prefix-caching", "--dtype=bfloat16"]),
    ],
)
def test_tuning_flags_pass(engine: str, extra: list[str]) -> None:
    args = server_args(run_of(engine=engine, serving={"extraArgs": extra}))
    assert args[-len(extra) :] == extra
    assert "--trust-remote-code" not in args


@pytest.mark.parametrize(
    ("engine", "extra", "words"),
    [
        ("tgi", ["--trust-remote-code"], "trustRemoteCode"),
        ("vllm", ["--trust-remote-code=true"], "trustRemoteCode"),
        ("tgi", ["--hostname", "0.0.0.0"], "--hostname"),
        ("tgi", ["--model-id", "attacker/model"], "--model-id"),
        ("tgi", ["--otlp-endpoint", "http://collector.evil:4317"], "--otlp-endpoint"),
        ("vllm", ["--model", "attacker/model"], "--model"),
        ("vllm", ["--chat-template", "/etc/passwd"], "--chat-template"),
        ("vllm", ["--dtype", "half", "smuggled"], "'smuggled'"),
        ("tgi", ["positional"], "'positional'"),
    ],
)
def test_other_flags_are_a_spec_problem(engine: str, extra: list[str], words: str) -> None:
    run = run_of(engine=engine, serving={"extraArgs": extra})
    with pytest.raises(RenderError) as refused:
        render_all(run, PLATFORM)
    assert refused.value.field == "spec.generation.serving.extraArgs"
    assert words in refused.value.reason


@pytest.mark.parametrize("engine", ["tgi", "vllm"])
def test_remote_code_only_when_the_spec_says_so(engine: str) -> None:
    assert "--trust-remote-code" in server_args(run_of(engine=engine, serving={"trustRemoteCode": True}))
    assert "--trust-remote-code" not in server_args(run_of(engine=engine))


def test_every_job_has_a_deadline() -> None:
    document = small_run("jobs", engine="embedded", gpusPerReplica=0)
    document["metadata"]["namespace"] = "gen"
    document["spec"]["training"] = {}
    document["spec"]["postprocess"] = {"decontaminate": {"workers": 2}}
    run = parse_run(document)
    jobs = [job for stage in stages(run, PLATFORM) for job in stage_jobs(run, PLATFORM, stage)]
    assert {job["metadata"]["labels"]["app.kubernetes.io/component"] for job in jobs} >= {"train", "evaluate"}
    for job in jobs:
        deadline = job["spec"]["activeDeadlineSeconds"]
        assert isinstance(deadline, int) and 0 < deadline <= max(STAGE_DEADLINES.values())
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
