"""Rendering and deciding, without a cluster: manifests, autoscaling and stage order are pure.

Every manifest `cosmo render` prints is validated offline against a current Kubernetes
release's OpenAPI schemas (kubernetes-validate, strict: unknown fields fail); KEDA's
ScaledObject, not part of Kubernetes, is checked against the fields KEDA documents.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import EXAMPLES, small_run
from cosmoforge.cli import build_parser, main
from cosmoforge.decontam_worker import ACK_WAIT
from cosmoforge.operator.autoscale import decide, desired_replicas
from cosmoforge.operator.progress import (
    Counts,
    JobState,
    QueueState,
    counts_from,
    job_state,
    next_step,
    progress_text,
    set_condition,
)
from cosmoforge.operator.render import (
    Platform,
    RenderError,
    child_name,
    endpoint_url,
    generator_replicas,
    output_uri,
    render_all,
    stage_jobs,
    stages,
)
from cosmoforge.queue import CONSUMER, stream_name
from cosmoforge.spec import GenerationRun, Phase, load_run, parse_run

K8S_VERSION = "1.37.0"
PLATFORM = Platform(
    output_base="s3://datasets/runs", storage_secret="object-store", storage_endpoint="http://minio:9000"
)

# The ScaledObject fields KEDA documents (keda.sh/v1alpha1), the ones cosmoforge writes.
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "properties": {"behavior": {"type": "object"}},
                        }
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
}


def validate_manifest(manifest: dict[str, Any]) -> None:
    if manifest["apiVersion"].startswith("keda.sh/"):
        jsonschema.validate(manifest, SCALED_OBJECT_SCHEMA)
        return
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def run_from(document: dict[str, Any], namespace: str = "gen") -> GenerationRun:
    document = copy.deepcopy(document)
    document["metadata"]["namespace"] = namespace
    return parse_run(document)


def gpu_run(**generation: Any) -> GenerationRun:
    document = small_run("mixtral", engine="tgi", model="mistralai/Mixtral-8x7B-Instruct-v0.1", **generation)
    return run_from(document)


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def named(manifests: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(m for m in manifests if m["metadata"]["name"] == name)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --- every manifest validates ---------------------------------------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    "tgi": {},
    "vllm": {"engine": "vllm", "gpusPerReplica": 4},
    "keda": {"autoscaling": {"mode": "keda", "targetQueuePerReplica": 64}},
    "embedded": {"engine": "embedded", "gpusPerReplica": 0},
    "endpoint": {"engine": "openai", "endpoint": "https://llm.example.com/v1", "apiKeySecret": {"name": "k"}},
    "endpoint-keda": {"engine": "tgi", "endpoint": "http://tgi:8080", "autoscaling": {"mode": "keda"}},
}


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: Path(p).name)
def test_every_example_renders_valid_kubernetes_manifests(example: Path) -> None:
    run = load_run(example)
    run.metadata.namespace = "gen"
    manifests = render_all(run, PLATFORM)
    assert manifests
    for manifest in manifests:
        validate_manifest(manifest)


@pytest.mark.parametrize("variant", sorted(VARIANTS), ids=str)
def test_every_engine_and_mode_renders_valid_manifests(variant: str) -> None:
    document = small_run("variant", **VARIANTS[variant])
    document["spec"]["training"] = {"preset": "tiny", "evalTasks": ["arc_easy"]}
    manifests = render_all(run_from(document), PLATFORM)
    for manifest in manifests:
        validate_manifest(manifest)


def test_validation_is_strict_enough_to_catch_a_typo() -> None:
    manifest = named(render_all(gpu_run(), PLATFORM), "mixtral-inference")
    broken = copy.deepcopy(manifest)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(broken)


# --- the inference server -------------------------------------------------------------------


def test_tgi_deployment_follows_the_spec() -> None:
    run = gpu_run(
        revision="abc123",
        gpusPerReplica=2,
        serving={
            "tag": "9.9.9",
            "hfTokenSecret": {"name": "hf", "key": "token"},
            "modelCache": {"claimName": "weights"},
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "shmSize": "8Gi",
        },
    )
    deployment = named(render_all(run, PLATFORM), "mixtral-inference")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["image"].endswith("text-generation-inference:9.9.9")
    args = server["args"]
    assert args[args.index("--model-id") + 1] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert args[args.index("--revision") + 1] == "abc123"
    assert args[args.index("--num-shard") + 1] == "2"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "2"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert server[probe]["httpGet"]["path"] == "/health"
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in server["volumeMounts"]
    cache = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert cache["persistentVolumeClaim"] == {"claimName": "weights"}
    assert env_of(server)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_no_secret_value_is_ever_rendered() -> None:
    run = gpu_run(serving={"hfTokenSecret": {"name": "hf"}})
    for manifest in render_all(run, PLATFORM):
        for container in _containers(manifest):
            for entry in container.get("env", []):
                if entry["name"] in ("HF_TOKEN", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY"):
                    assert "value" not in entry and "secretKeyRef" in entry["valueFrom"]


def test_model_cache_defaults_to_an_empty_dir_and_pinned_image() -> None:
    pod = named(render_all(gpu_run(), PLATFORM), "mixtral-inference")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "model-cache") == {
        "name": "model-cache",
        "emptyDir": {},
    }
    image = pod["containers"][0]["image"]
    assert image == Platform().tgi_image and not image.endswith(":latest")


def test_vllm_uses_tensor_parallelism_and_serves_the_model_name() -> None:
    document = small_run(
        "vllm-run", engine="vllm", model="meta-llama/Llama-3.1-8B-Instruct", gpusPerReplica=4
    )
    (server,) = named(render_all(run_from(document), PLATFORM), "vllm-run-inference")["spec"]["template"][
        "spec"
    ]["containers"]
    assert server["image"] == Platform().vllm_image
    assert server["args"][server["args"].index("--tensor-parallel-size") + 1] == "4"
    assert (
        server["args"][server["args"].index("--served-model-name") + 1] == "meta-llama/Llama-3.1-8B-Instruct"
    )


def test_external_endpoint_deploys_no_server() -> None:
    run = load_run(EXAMPLES / "external-endpoint.yaml")
    run.metadata.namespace = "gen"
    manifests = render_all(run, PLATFORM)
    assert not [m for m in manifests if m["metadata"]["name"].endswith("-inference")]
    generator = named(manifests, "external-endpoint-generator")
    (container,) = generator["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert env["COSMO_ENDPOINT"] == "https://llm.example.com/v1"
    assert env["OPENAI_API_KEY"] == {"secretKeyRef": {"name": "llm-api", "key": "key"}}
    assert generator["spec"]["replicas"] == run.spec.generation.workers


def test_generator_points_at_the_server_nats_and_storage() -> None:
    run = gpu_run()
    manifests = render_all(run, PLATFORM)
    generator = named(manifests, "mixtral-generator")
    (container,) = generator["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert env["COSMO_ENDPOINT"] == endpoint_url(run) == "http://mixtral-inference:8080"
    service = named(manifests, "mixtral-inference")  # the Deployment; the Service shares its name
    assert (
        by_kind(manifests, "Service")[0]["spec"]["selector"].items()
        <= service["spec"]["template"]["metadata"]["labels"].items()
    )
    assert env["COSMO_NATS_URL"] == PLATFORM.nats_url
    assert env["COSMO_OUTPUT"] == "s3://datasets/runs/cosmoforge-runs"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert container["envFrom"] == [{"secretRef": {"name": "object-store"}}]
    assert container["args"][:2] == ["worker", "--nats"] and "mixtral" in container["args"]


def test_generators_scale_with_the_servers() -> None:
    run = gpu_run(workers=8, replicas={"min": 0, "max": 4})
    assert [generator_replicas(run, n) for n in range(5)] == [0, 2, 4, 6, 8]


def test_cosmoforge_pods_are_locked_down() -> None:
    document = small_run("locked", engine="embedded")
    document["spec"]["training"] = {}
    for manifest in render_all(run_from(document), PLATFORM):
        for container in _containers(manifest):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert security["readOnlyRootFilesystem"] is True and security["runAsNonRoot"] is True


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    template = manifest.get("spec", {}).get("template", {})
    return list(template.get("spec", {}).get("containers", []))


def test_keda_mode_renders_a_jetstream_scaled_object() -> None:
    run = gpu_run(replicas={"min": 0, "max": 6}, autoscaling={"mode": "keda", "targetQueuePerReplica": 100})
    (scaler,) = by_kind(render_all(run, PLATFORM), "ScaledObject")
    spec = scaler["spec"]
    assert spec["scaleTargetRef"]["name"] == "mixtral-inference"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 6)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "nats-jetstream"
    assert trigger["metadata"]["stream"] == stream_name("mixtral")
    assert trigger["metadata"]["consumer"] == CONSUMER
    assert trigger["metadata"]["lagThreshold"] == "100"
    assert not by_kind(render_all(gpu_run(), PLATFORM), "ScaledObject")


# --- stages ----------------------------------------------------------------------------------


def test_stages_run_in_order_and_chain_their_outputs() -> None:
    run = load_run(EXAMPLES / "cosmopedia-mixtral.yaml")
    run.spec.postprocess.decontaminate.workers = 1  # one Job per stage (workers: below)
    planned = stages(run, PLATFORM)
    assert [s.name for s in planned] == ["dedup", "decontaminate", "tokenize", "train", "evaluate"]
    root = "s3://my-datasets/cosmopedia/cosmopedia-mixtral"
    assert planned[0].args[:2] == ("dedup", f"{root}/dataset")
    for before, after in itertools.pairwise(planned):
        # Filtering stages hand on what they kept; the others hand on their whole output.
        kept = before.name in ("dedup", "decontaminate")
        assert after.args[1] == (f"{before.output}/kept.parquet" if kept else before.output), after.name
    parser = build_parser()
    for stage in planned:  # every Job's arguments are accepted by the real command line
        assert parser.parse_args(list(stage.args)).command == stage.name
    decontam = planned[1].args
    assert decontam.count("--benchmark") == 9 and decontam[decontam.index("--threshold") + 1] == "0.5"
    jobs = by_kind(render_all(run, PLATFORM), "Job")
    assert [j["spec"]["template"]["spec"]["containers"][0]["args"][0] for j in jobs] == [
        s.name for s in planned
    ]
    assert all(j["spec"]["template"]["spec"]["restartPolicy"] == "Never" for j in jobs)


def _decontaminate_jobs(workers: int | None) -> list[dict[str, Any]]:
    document = small_run("clean")
    document["spec"]["postprocess"] = {"decontaminate": {"benchmarks": ["mmlu", "piqa"], "threshold": 0.7}}
    if workers is not None:
        document["spec"]["postprocess"]["decontaminate"]["workers"] = workers
    run = run_from(document)
    (stage,) = [s for s in stages(run, PLATFORM) if s.name == "decontaminate"]
    return stage_jobs(run, PLATFORM, stage)


def test_bad_input_fails_a_stage_at_once_and_evictions_do_not_count() -> None:
    # Every cosmo command exits 2 for bad input or settings: retrying cannot help.
    for job in _decontaminate_jobs(3):
        (container,) = job["spec"]["template"]["spec"]["containers"]
        fail, ignore = job["spec"]["podFailurePolicy"]["rules"]
        assert fail["action"] == "FailJob"
        assert fail["onExitCodes"] == {"containerName": container["name"], "operator": "In", "values": [2]}
        assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}


def test_one_decontamination_worker_is_the_single_job_as_before() -> None:
    assert _decontaminate_jobs(None) == _decontaminate_jobs(1)
    (job,) = _decontaminate_jobs(1)
    assert job["metadata"]["name"] == "clean-decontaminate"
    assert job["spec"]["backoffLimit"] == 2 and "parallelism" not in job["spec"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    root = "s3://datasets/runs/cosmoforge-runs/clean"
    assert container["args"] == [
        "decontaminate", f"{root}/dedup/kept.parquet", "--out", f"{root}/decontam",
        "--benchmark", "mmlu", "--benchmark", "piqa",
        "--ngram", "10", "--threshold", "0.7", "--min-block-chars", "5",
    ]  # fmt: skip
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}


def test_decontamination_workers_render_a_submit_job_and_a_worker_pool() -> None:
    submit, pool = _decontaminate_jobs(3)
    for job in (submit, pool):
        validate_manifest(job)
        assert job["kind"] == "Job" and job["metadata"]["namespace"] == "gen"
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        labels = job["metadata"]["labels"]
        assert labels["cosmoforge.io/run"] == "clean" and labels["app.kubernetes.io/managed-by"]
        assert job["spec"]["template"]["metadata"]["labels"] == labels
    assert submit["metadata"]["name"] == "clean-decontaminate"
    assert submit["metadata"]["labels"]["app.kubernetes.io/component"] == "decontaminate"
    assert pool["metadata"]["name"] == "clean-decontaminate-workers"
    assert pool["metadata"]["labels"]["app.kubernetes.io/component"] == "decontaminate-workers"
    # A work-queue Job: three pods at once, no completion count; failed pods are replaced.
    assert pool["spec"]["parallelism"] == 3 and "completions" not in pool["spec"]
    assert pool["spec"]["backoffLimit"] >= 3

    parser = build_parser()
    root, out = "s3://datasets/runs/cosmoforge-runs/clean", "s3://datasets/runs/cosmoforge-runs"
    (submitter,) = submit["spec"]["template"]["spec"]["containers"]
    args = parser.parse_args(submitter["args"])
    assert args.command == "decontaminate-submit" and args.func.__name__ == "run_decontaminate_submit"
    assert (args.nats, args.run, args.out) == (PLATFORM.nats_url, "clean", out)
    assert args.input == f"{root}/dedup/kept.parquet"  # what dedup kept, as the single Job reads
    assert args.wait and not args.spawn and args.timeout is None

    (worker,) = pool["spec"]["template"]["spec"]["containers"]
    args = parser.parse_args(worker["args"])
    assert args.command == "decontaminate-worker" and args.func.__name__ == "run_decontaminate_worker"
    assert (args.nats, args.run, args.out) == (PLATFORM.nats_url, "clean", out)
    assert args.worker_id == "$(POD_NAME)"
    assert env_of(worker)["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Checking processes = the pod's CPU request, not the node's cores.
    assert args.workers == int(worker["resources"]["requests"]["cpu"])
    # Idle workers outlive a dead worker's ack wait, so its range finds another; then they end.
    assert args.idle_exit > ACK_WAIT

    # Same image, storage, environment and lock-down as every stage Job.
    env = [e for e in worker["env"] if e["name"] != "POD_NAME"]
    assert env == submitter["env"] and {e["name"] for e in env} >= {"HOME", "AWS_ENDPOINT_URL"}
    for key in ("image", "imagePullPolicy", "command", "envFrom", "securityContext", "volumeMounts"):
        assert worker[key] == submitter[key], key
    assert submitter["envFrom"] == [{"secretRef": {"name": "object-store"}}]
    submit_pod, pool_pod = submit["spec"]["template"]["spec"], pool["spec"]["template"]["spec"]
    for key in ("securityContext", "volumes", "automountServiceAccountToken"):
        assert pool_pod[key] == submit_pod[key], key
    assert set(worker["resources"]) == set(submitter["resources"]) == {"requests", "limits"}


def test_decontamination_workers_keep_the_stage_chain() -> None:
    run = load_run(EXAMPLES / "cosmopedia-mixtral.yaml")
    assert run.spec.postprocess.decontaminate.workers == 8
    planned = stages(run, PLATFORM)
    decontam, tokenize = planned[1], planned[2]
    assert decontam.pool is not None and decontam.pool.size == 8
    assert decontam.parts == ("decontaminate", "decontaminate-workers")
    assert tokenize.args[1] == f"{decontam.output}/kept.parquet"
    assert decontam.output == f"{output_uri(run, PLATFORM)}/cosmopedia-mixtral/decontam"
    names = [j["metadata"]["name"] for j in by_kind(render_all(run, PLATFORM), "Job")]
    assert names == [f"cosmopedia-mixtral-{part}" for s in planned for part in s.parts]


def test_disabled_stages_are_not_rendered() -> None:
    run = load_run(EXAMPLES / "quickstart.yaml")
    run.spec.postprocess.dedup.enabled = False
    assert stages(run, PLATFORM) == []
    assert not by_kind(render_all(run, PLATFORM), "Job")


def test_output_on_a_pods_own_disk_is_refused() -> None:
    run = run_from(small_run("local"))
    with pytest.raises(RenderError) as caught:
        render_all(run, Platform())
    assert caught.value.field == "spec.output.uri"


def test_child_names_are_valid_service_names() -> None:
    assert child_name("a" * 63, "inference").__len__() <= 63
    assert child_name("a" * 63, "inference") != child_name("a" * 62 + "b", "inference")
    assert child_name("7up", "generator")[0].isalpha()


def test_cosmo_render_prints_every_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    example = EXAMPLES / "cosmopedia-mixtral.yaml"
    assert main(["render", str(example), "--namespace", "gen"]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    kinds = [d["kind"] for d in documents]
    # Dedup, decontamination (submitter and worker pool), tokenize, train, evaluate.
    assert kinds == ["Deployment", "Service", "Deployment", "Job", "Job", "Job", "Job", "Job", "Job"]
    for document in documents:
        validate_manifest(document)
    assert main(["render", str(EXAMPLES / "quickstart.yaml")]) == 1
    assert "spec.output.uri" in capsys.readouterr().err


# --- autoscaling -----------------------------------------------------------------------------


def test_desired_replicas_is_clamped_ceil_of_depth_over_target() -> None:
    assert desired_replicas(0, 100, 0, 8) == 0
    assert desired_replicas(1, 100, 0, 8) == 1
    assert desired_replicas(100, 100, 0, 8) == 1
    assert desired_replicas(101, 100, 0, 8) == 2
    assert desired_replicas(10_000, 100, 0, 8) == 8
    assert desired_replicas(0, 100, 2, 8) == 2


def _decide(current: int, depth: int | None, now: float, history: Any = (), **kw: Any) -> Any:
    options = {
        "done": False,
        "suspended": False,
        "target_per_replica": 100,
        "minimum": 1,
        "maximum": 8,
        "window": 60.0,
    }
    return decide(current=current, depth=depth, now=now, history=history, **{**options, **kw})


def test_scale_up_is_immediate_and_scale_down_waits_for_the_window() -> None:
    up = _decide(1, 750, now=0.0)
    assert up.replicas == 8
    down = _decide(8, 150, now=10.0, history=up.history)
    assert down.replicas == 8 and down.reason == "stabilizing"
    later = _decide(8, 150, now=80.0, history=down.history)
    assert later.replicas == 2


def test_oscillating_depth_does_not_flap() -> None:
    history: Any = ()
    current = 1
    changes = []
    for second in range(0, 120, 5):
        depth = 500 if (second // 5) % 2 == 0 else 50
        decision = _decide(current, depth, now=float(second), history=history)
        if decision.replicas != current:
            changes.append((second, decision.replicas))
        current, history = decision.replicas, decision.history
        assert 1 <= current <= 8
    assert changes == [(0, 5)]


def test_zero_when_done_or_suspended_and_unchanged_when_blind() -> None:
    assert _decide(4, 0, now=0.0, done=True).replicas == 0
    assert _decide(4, 300, now=0.0, suspended=True).replicas == 0
    assert _decide(4, None, now=0.0).replicas == 4
    assert _decide(0, 10, now=0.0, minimum=0).replicas == 1


def test_a_restarted_autoscaler_does_not_scale_down_early() -> None:
    assert _decide(6, 0, now=1000.0, history=()).replicas == 6


# --- progress --------------------------------------------------------------------------------


def test_stages_advance_one_at_a_time() -> None:
    run = load_run(EXAMPLES / "cosmopedia-mixtral.yaml")
    planned = stages(run, PLATFORM)
    assert next_step(planned, {}, False, []).phase == Phase.generating
    first = next_step(planned, {}, True, [])
    assert first.phase == Phase.deduplicating and first.start == planned[0]
    running = next_step(planned, {"dedup": JobState.running}, True, [])
    assert running.phase == Phase.deduplicating and running.start is None
    second = next_step(planned, {"dedup": JobState.succeeded}, True, [])
    assert second.start == planned[1]
    assert next_step(planned, {}, True, ["dedup"]).start == planned[1]
    failed = next_step(planned, {"dedup": JobState.succeeded, "decontaminate": JobState.failed}, True, [])
    assert failed.phase == Phase.failed and failed.failed == planned[1]
    done = {s.name: JobState.succeeded for s in planned}
    assert next_step(planned, done, True, []).phase == Phase.succeeded


def test_a_stage_with_workers_ends_with_its_own_job_and_fails_with_either() -> None:
    run = load_run(EXAMPLES / "cosmopedia-mixtral.yaml")
    planned = stages(run, PLATFORM)
    dedup, decontam, tokenize = planned[:3]
    done = {"dedup": JobState.succeeded}

    def step(**states: JobState) -> Any:
        jobs = {**done, **{name.replace("_", "-"): state for name, state in states.items()}}
        return next_step(planned, jobs, True, [])

    first = step()
    assert first.start == decontam and first.phase == Phase.decontaminating and first.stop == ()
    both = step(decontaminate=JobState.running, decontaminate_workers=JobState.running)
    assert (both.start, both.pool, both.stop, both.phase) == (None, None, (), Phase.decontaminating)
    # The pool went missing (deleted by hand) while the submitter waits: create it again.
    assert step(decontaminate=JobState.running).pool == decontam
    # Its workers all ended (idle, or a node drain) while work remains: delete it, then recreate.
    idle = step(decontaminate=JobState.running, decontaminate_workers=JobState.succeeded)
    assert idle.stop == ("decontaminate-workers",) and idle.pool is None
    assert idle.phase == Phase.decontaminating
    # The pool failed: the stage fails, naming the pool, and the waiting submitter is stopped.
    broken = step(decontaminate=JobState.running, decontaminate_workers=JobState.failed)
    assert broken.phase == Phase.failed and broken.failed == decontam
    assert broken.failed_part == "decontaminate-workers" and broken.stop == ("decontaminate",)
    # The submitter failed: the stage fails, naming it, and the workers are stopped.
    refused = step(decontaminate=JobState.failed, decontaminate_workers=JobState.running)
    assert refused.failed == decontam and refused.failed_part == "decontaminate"
    assert refused.stop == ("decontaminate-workers",)
    # The submitter succeeded: the next stage starts and idle workers still up are stopped.
    after = step(decontaminate=JobState.succeeded, decontaminate_workers=JobState.running)
    assert after.start == tokenize and after.stop == ("decontaminate-workers",)
    assert step(decontaminate=JobState.succeeded, decontaminate_workers=JobState.succeeded).stop == ()
    finished = {s.name: JobState.succeeded for s in planned} | {"decontaminate-workers": JobState.running}
    last = next_step(planned, finished, True, [])
    assert last.phase == Phase.succeeded and last.stop == ("decontaminate-workers",)
    assert dedup.pool is None and dedup.parts == ("dedup",)


def test_job_states() -> None:
    assert job_state(None) == JobState.missing
    assert job_state({"status": {}}) == JobState.running
    assert job_state({"status": {"succeeded": 1}}) == JobState.succeeded
    assert job_state({"spec": {"backoffLimit": 2}, "status": {"failed": 3}}) == JobState.failed
    assert job_state({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}) == JobState.failed


def test_counts_from_queue_and_dispatcher() -> None:
    assert not counts_from(QueueState(depth=0, published=0, stored=0), None).done
    assert not counts_from(QueueState(depth=3, published=10, stored=3), None).done
    drained = counts_from(QueueState(depth=0, published=10, stored=0), None)
    assert drained.done and drained.generated == 10
    status = {
        "phase": "PHASE_GENERATING",
        "prompts": 10,
        "generated": 4,
        "failed": 1,
        "tokens_per_second": 12.5,
    }
    counts = counts_from(QueueState(depth=0, published=10, stored=0), status)
    assert not counts.done and counts == Counts(10, 4, 1, 12.5, False)
    assert progress_text(counts) == "5/10 (50%)"
    assert counts_from(None, {**status, "phase": "PHASE_SUCCEEDED"}).done
    failed = counts_from(None, {"phase": 4, "message": "seed file missing"})
    assert failed.error == "seed file missing"


def test_conditions_keep_their_transition_time_until_status_changes() -> None:
    first = set_condition([], "Valid", True, "SpecAccepted")
    again = set_condition(first, "Valid", True, "SpecAccepted", "still")
    assert again[0]["lastTransitionTime"] == first[0]["lastTransitionTime"] and again[0]["message"] == "still"
    flipped = set_condition(again, "Valid", False, "InvalidSpec")
    assert [c["status"] for c in flipped] == ["False"] and len(flipped) == 1
