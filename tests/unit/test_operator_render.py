"""Rendering and deciding, without a cluster: manifests, autoscaling and stage order are pure.

Every manifest `cosmo render` prints is validated offline against the newest Kubernetes
release's OpenAPI schemas that kubernetes-validate ships (strict: unknown fields fail; every
supported minor is in test_k8s_versions); KEDA's ScaledObject, not part of Kubernetes, is
checked against the fields KEDA documents.
"""

from __future__ import annotations

import copy
import itertools
import typing
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import EXAMPLES, small_run
from cosmoforge.cli.main import build_parser, main
from cosmoforge.operator.render import (
    STAGE_ROLES,
    Platform,
    RenderError,
    Role,
    child_name,
    endpoint_url,
    generator_replicas,
    output_uri,
    render_all,
    run_root,
    stage_jobs,
    stages,
)
from cosmoforge.operator.render.common import run_key
from cosmoforge.operator.settings import OperatorSettings
from cosmoforge.queue import CONSUMER, stream_name
from cosmoforge.queue.topology import DECONTAM_ACK_WAIT_SECONDS as ACK_WAIT
from cosmoforge.runs.stages import StageName
from cosmoforge.spec.model import GenerationRun, load_run, parse_run

K8S_VERSION = kubernetes_validate.latest_version()
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


def test_server_images_default_to_where_tgi_and_vllm_publish_them() -> None:
    assert Platform().tgi_image == "ghcr.io/huggingface/text-generation-inference:3.3.4"
    assert Platform().vllm_image == "docker.io/vllm/vllm-openai:v0.11.0"


def test_model_cache_defaults_to_an_empty_dir_and_pinned_image() -> None:
    pod = named(render_all(gpu_run(), PLATFORM), "mixtral-inference")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "model-cache") == {
        "name": "model-cache",
        "emptyDir": {"sizeLimit": "200Gi"},
    }
    image = pod["containers"][0]["image"]
    assert image == Platform().tgi_image and not image.endswith(":latest")


@pytest.mark.parametrize("variant", ["tgi", "vllm", "embedded"])
def test_a_server_rollout_never_needs_a_spare_gpu(variant: str) -> None:
    document = small_run("variant", replicas={"min": 2, "max": 4}, **VARIANTS[variant])
    deployment = named(render_all(run_from(document), PLATFORM), "variant-inference")
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    rolling = strategy["rollingUpdate"]
    # A rollout runs up to replicas + maxSurge pods: no surge, so never more GPUs than now ...
    assert rolling["maxSurge"] == 0
    # ... and without a surge it can only move by taking one old server down first.
    assert rolling["maxUnavailable"] == 1


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
    assert container["args"][:2] == ["worker", "--nats"]
    # The key names the stream and, below COSMO_OUTPUT, the folder: the run's root, namespaced.
    assert container["args"][container["args"].index("--run") + 1] == "gen/mixtral"
    assert run_root(run, PLATFORM) == "s3://datasets/runs/cosmoforge-runs/gen/mixtral"


def test_the_same_name_in_two_namespaces_is_two_runs() -> None:
    document = small_run("twin", engine="tgi", model="mistralai/Mixtral-8x7B-Instruct-v0.1")
    first, second, bare = run_from(document, "team-a"), run_from(document, "team-b"), parse_run(document)
    assert [run_key(run) for run in (first, second, bare)] == ["team-a/twin", "team-b/twin", "twin"]
    roots = {run_root(run, PLATFORM) for run in (first, second)}
    assert roots == {f"s3://datasets/runs/cosmoforge-runs/{ns}/twin" for ns in ("team-a", "team-b")}
    # Children keep their short names: a namespace already keeps them apart in Kubernetes.
    assert named(render_all(first, PLATFORM), "twin-generator")["metadata"]["namespace"] == "team-a"


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


ROLE_PLATFORM = Platform(
    image="reg/runtime:1",
    postprocess_image="reg/post:1",
    trainer_image="reg/trainer:1",
    output_base="s3://d/r",
)


@pytest.mark.parametrize("engine", ["embedded", "tgi"])
def test_every_child_runs_the_image_of_its_role(engine: str) -> None:
    document = small_run("roles", engine=engine)
    document["spec"]["postprocess"] = {"decontaminate": {"benchmarks": ["mmlu"], "workers": 2}}
    document["spec"]["training"] = {"preset": "tiny", "evalTasks": ["arc_easy"]}
    runtime, post, trainer = "reg/runtime:1", "reg/post:1", "reg/trainer:1"
    expected = {
        "roles-generator": runtime,
        "roles-compact": post,
        "roles-dedup": post,
        "roles-decontaminate": post,
        "roles-decontaminate-workers": post,
        "roles-tokenize": post,
        "roles-train": trainer,
        "roles-evaluate": trainer,
    }
    images = {
        m["metadata"]["name"]: {c["image"] for c in _containers(m)}
        for m in render_all(run_from(document), ROLE_PLATFORM)
        if _containers(m)
    }
    if engine == "embedded":
        expected["roles-inference"] = runtime  # the embedded model server is cosmoforge's own
    else:
        assert images.pop("roles-inference") == {ROLE_PLATFORM.tgi_image}  # TGI's published image
    assert images == {name: {image} for name, image in expected.items()}


def test_every_stage_has_a_role_and_the_settings_name_each_roles_image() -> None:
    # Every planned stage, and clustering, which runs before generation.
    assert set(STAGE_ROLES) == set(typing.get_args(StageName)) | {"cluster"}
    assert {role: ROLE_PLATFORM.image_for(role) for role in Role} == {
        Role.runtime: "reg/runtime:1",
        Role.postprocess: "reg/post:1",
        Role.trainer: "reg/trainer:1",
    }


def test_keda_mode_renders_a_jetstream_scaled_object() -> None:
    run = gpu_run(replicas={"min": 0, "max": 6}, autoscaling={"mode": "keda", "targetQueuePerReplica": 100})
    (scaler,) = by_kind(render_all(run, PLATFORM), "ScaledObject")
    spec = scaler["spec"]
    assert spec["scaleTargetRef"]["name"] == "mixtral-inference"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 6)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "nats-jetstream"
    assert trigger["metadata"]["stream"] == stream_name("gen/mixtral")
    assert trigger["metadata"]["consumer"] == CONSUMER
    assert trigger["metadata"]["lagThreshold"] == "100"
    assert not by_kind(render_all(gpu_run(), PLATFORM), "ScaledObject")


# --- stages ----------------------------------------------------------------------------------


def test_stages_run_in_order_and_chain_their_outputs() -> None:
    run = load_run(EXAMPLES / "cosmopedia-mixtral.yaml")
    run.spec.postprocess.decontaminate.workers = 1  # one Job per stage (workers: below)
    planned = stages(run, PLATFORM)
    assert [s.name for s in planned] == ["compact", "dedup", "decontaminate", "tokenize", "train", "evaluate"]
    root = "s3://my-datasets/cosmopedia/cosmopedia-mixtral"
    assert planned[0].args == ("compact", root)
    assert planned[1].args[:2] == ("dedup", f"{root}/dataset")
    for before, after in itertools.pairwise(planned):
        # Filtering stages hand on what they kept; the others hand on their whole output.
        kept = before.name in ("dedup", "decontaminate")
        assert after.args[1] == (f"{before.output}/kept.parquet" if kept else before.output), after.name
    parser = build_parser()
    for stage in planned:  # every Job's arguments are accepted by the real command line
        assert parser.parse_args(list(stage.args)).command == stage.name
    decontam = planned[2].args
    assert decontam.count("--benchmark") == 9 and decontam[decontam.index("--threshold") + 1] == "0.5"
    jobs = by_kind(render_all(run, PLATFORM), "Job")
    # One Job per stage, in order (the `small` preset's train Job runs nanotron, not `cosmo train`).
    assert [j["spec"]["template"]["spec"]["containers"][0]["name"] for j in jobs] == [s.name for s in planned]
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
        disruption = {"type": "DisruptionTarget", "status": "True"}
        assert ignore == {"action": "Ignore", "onPodConditions": [disruption]}


def test_one_decontamination_worker_is_the_single_job_as_before() -> None:
    assert _decontaminate_jobs(None) == _decontaminate_jobs(1)
    (job,) = _decontaminate_jobs(1)
    assert job["metadata"]["name"] == "clean-decontaminate"
    assert job["spec"]["backoffLimit"] == 2 and "parallelism" not in job["spec"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    root = "s3://datasets/runs/cosmoforge-runs/gen/clean"
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
    root, out = "s3://datasets/runs/cosmoforge-runs/gen/clean", "s3://datasets/runs/cosmoforge-runs"
    (submitter,) = submit["spec"]["template"]["spec"]["containers"]
    args = parser.parse_args(submitter["args"])
    assert args.command == "decontaminate-submit" and args.func.__name__ == "run_decontaminate_submit"
    assert (args.nats, args.run, args.out) == (PLATFORM.nats_url, "gen/clean", out)
    assert args.input == f"{root}/dedup/kept.parquet"  # what dedup kept, as the single Job reads
    assert args.wait and not args.spawn and args.timeout is None

    (worker,) = pool["spec"]["template"]["spec"]["containers"]
    args = parser.parse_args(worker["args"])
    assert args.command == "decontaminate-worker" and args.func.__name__ == "run_decontaminate_worker"
    assert (args.nats, args.run, args.out) == (PLATFORM.nats_url, "gen/clean", out)
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
    decontam, tokenize = planned[2], planned[3]
    assert decontam.pool is not None and decontam.pool.size == 8
    assert decontam.parts == ("decontaminate", "decontaminate-workers")
    assert tokenize.args[1] == f"{decontam.output}/kept.parquet"
    assert decontam.output == f"{output_uri(run, PLATFORM)}/cosmopedia-mixtral/decontam"
    names = [j["metadata"]["name"] for j in by_kind(render_all(run, PLATFORM), "Job")]
    assert names == [f"cosmopedia-mixtral-{part}" for s in planned for part in s.parts]


def test_disabled_stages_are_not_rendered() -> None:
    run = load_run(EXAMPLES / "quickstart.yaml")
    run.spec.postprocess.dedup.enabled = False
    # Compaction is never disabled: it is how the generation shards become the dataset.
    assert [s.name for s in stages(run, PLATFORM)] == ["compact"]
    (job,) = by_kind(render_all(run, PLATFORM), "Job")
    assert job["metadata"]["name"] == "quickstart-compact"


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
    # Compact, dedup, decontamination (submitter and worker pool), tokenize, train, evaluate.
    assert kinds == ["Deployment", "Service", "Deployment", *["Job"] * 7]
    for document in documents:
        validate_manifest(document)
    assert main(["render", str(EXAMPLES / "quickstart.yaml")]) == 1
    assert "spec.output.uri" in capsys.readouterr().err


# --- operator settings --------------------------------------------------------------------


def test_operator_settings_come_from_the_charts_environment() -> None:
    environ = {
        "COSMO_OPERATOR_INTERVAL": "2.5",
        "COSMO_OPERATOR_EVENTS": "0",
        "COSMO_NATS_URL": "nats://queue:4222",
        "COSMO_DISPATCHER": "dispatcher:50051",
        "COSMO_IMAGE": "reg/cosmoforge:2",
        "COSMO_POSTPROCESS_IMAGE": "reg/cosmoforge-postprocess:2",
        "COSMO_TRAINER_IMAGE": "reg/cosmoforge-trainer:2",
    }
    settings = OperatorSettings.from_env(environ)
    assert settings.interval == 2.5 and settings.post_events is False
    assert settings.platform == Platform(
        nats_url="nats://queue:4222",
        dispatcher="dispatcher:50051",
        image="reg/cosmoforge:2",
        postprocess_image="reg/cosmoforge-postprocess:2",
        trainer_image="reg/cosmoforge-trainer:2",
    )
    assert OperatorSettings.from_env({}) == OperatorSettings()
    assert OperatorSettings().interval == 10.0 and OperatorSettings().post_events


@pytest.mark.parametrize("interval", ["0", "-1"])
def test_a_timer_that_never_waits_is_refused(interval: str) -> None:
    with pytest.raises(ValueError, match="interval"):
        OperatorSettings.from_env({"COSMO_OPERATOR_INTERVAL": interval})
