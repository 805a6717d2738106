"""The `GenerationRun` spec: one pydantic model that the CLI, the CRD and the operator share.

Field names are camelCase in YAML (Kubernetes convention) and snake_case in Python. Defaults
follow the Cosmopedia recipe, so a short spec already describes a sensible run. One file, past
the usual size: the CRD's schema is generated from this one model, and its parts refer to each
other's limits and defaults.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasGenerator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from cosmoforge.spec.safe_yaml import MAX_SPEC_BYTES, load_documents

API_GROUP = "cosmoforge.io"
API_VERSION = "v1alpha1"
KIND = "GenerationRun"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# Bounds of numbers: finite, and far from what breaks a queue, a pod or the API server.
INT64_MAX = 2**63 - 1  # the CRD stores integers as int64
MAX_COUNT = 1_000_000_000  # records, prompts, steps
MAX_SEED_CHARS = 100_000  # a prompt travels in one NATS message of at most 1 MB
MAX_REPLICAS = 1_000
MAX_TOKENS = 4_194_304
DAY_SECONDS = 86_400


class Strict(BaseModel):
    """Base for spec parts: camelCase aliases, unknown fields rejected, enums kept as values."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
        # NaN and infinity are never a setting: `.inf` seconds crashed workers.
        allow_inf_nan=False,
    )


class SeedKind(StrEnum):
    outline = "outline"
    wikihow = "wikihow"
    web = "web"
    math = "math"
    instruction = "instruction"
    prompt = "prompt"  # a ready prompt column: a new model on an existing prompt set


class Audience(StrEnum):
    """Readers of textbook-like documents (outline, wikihow, web, math seeds)."""

    young_children = "young_children"
    high_school_students = "high_school_students"
    college_students = "college_students"
    researchers = "researchers"


class Style(StrEnum):
    textbook = "textbook"
    blog_post = "blog_post"
    wikihow = "wikihow"


class StoryAudience(StrEnum):
    """Readers of stories (instruction seeds)."""

    young_children = "young_children"
    general_audience = "general_audience"
    reddit_post = "reddit_post"


class Engine(StrEnum):
    tgi = "tgi"
    vllm = "vllm"
    openai = "openai"
    embedded = "embedded"


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def _as_text(value: Any) -> Any:
    """A filter value as seed values are compared: text, true/false as YAML writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int | float) else value


# Text in the CRD (one type per field); YAML numbers and booleans are read as their text.
FieldValue = Annotated[str, BeforeValidator(_as_text)]


class SeedSource(Strict):
    name: str = Field(pattern=DNS_LABEL, max_length=63, description="Unique name of this source.")
    kind: SeedKind
    uri: str = Field(min_length=1, description="fsspec path or URI, or hf://datasets/<owner>/<name>.")
    format: Literal["auto", "parquet", "jsonl", "csv", "hf"] = "auto"
    config: str | None = Field(default=None, description="Hub dataset config (subset) name.")
    split: str = "train"
    revision: str | None = Field(default=None, description="Hub dataset revision: branch, tag or commit.")
    text_field: str = Field(
        default="text",
        min_length=1,
        description="Field path of the text, e.g. conversations[from=human].value.",
    )
    id_field: str | None = Field(
        default=None, description="Field path of a record id; default: a hash of the whole record."
    )
    topic_field: str | None = Field(default=None, description="Field path of a cluster topic (web seeds).")
    topics_uri: str | None = Field(
        default=None, description="Output folder of `cosmo cluster` over this source: topics by document id."
    )
    category_field: str | None = Field(default=None, description="Field path of a source/category.")
    exclude_categories: list[str] = Field(
        default_factory=lambda: ["glaive-code-assist", "camelai", "code", "coding"],
        description="Categories unsuitable for stories (instruction seeds).",
    )
    include: dict[str, list[FieldValue]] = Field(
        default_factory=dict, description="Field path -> values: keep only records whose value is listed."
    )
    exclude: dict[str, list[FieldValue]] = Field(
        default_factory=dict,
        description="Field path -> values: drop records whose value is listed (null never).",
    )
    audience_field: str | None = Field(
        default=None, description="Field path of the audience that fixes a record's pair (or its lineage)."
    )
    style_field: str | None = Field(
        default=None,
        description="Field path of the style (format) that fixes a record's pair (or its lineage).",
    )
    audience_map: dict[str, str] = Field(default_factory=dict, description="Dataset audience -> audience.")
    style_map: dict[str, str] = Field(default_factory=dict, description="Dataset format -> style.")
    weight: float = Field(default=1.0, gt=0.0, le=1_000_000.0)
    limit: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    sample: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Share of records kept, chosen by a hash of the record id."
    )
    sample_seed: int = Field(default=0, ge=0, le=INT64_MAX)
    max_chars: int | None = Field(
        default=None,
        ge=100,
        le=MAX_SEED_CHARS,
        description="Seed text is truncated to this length; default: prompts.maxSeedChars.",
    )

    @field_validator(
        "text_field", "id_field", "topic_field", "category_field", "audience_field", "style_field",
        "include", "exclude",
    )  # fmt: skip
    @classmethod
    def _field_paths_parse(cls, value: Any) -> Any:
        from cosmoforge.prompts.fields import parse  # a pure leaf module: no import cycle

        for path in value if isinstance(value, dict) else [value]:
            if path is not None:
                parse(path)
        return value


class PromptsSpec(Strict):
    audiences: list[Audience] = Field(default_factory=lambda: list(Audience), min_length=1)
    styles: list[Style] = Field(default_factory=lambda: list(Style), min_length=1)
    story_audiences: list[StoryAudience] = Field(default_factory=lambda: list(StoryAudience), min_length=1)
    variants_per_seed: int = Field(
        default=1, ge=1, le=12, description="Distinct audience x style prompts drawn per seed record."
    )
    topic_conditioning: Fraction = 0.5
    banned_openings: list[Annotated[str, Field(max_length=200)]] = Field(
        default_factory=lambda: ["Once upon a time", "The sun hung low in the sky"], max_length=50
    )
    templates: dict[str, str] = Field(
        default_factory=dict, description="Template overrides: template id -> Jinja2 text."
    )
    seed: int = Field(default=42, ge=0, le=INT64_MAX)
    limit: int | None = Field(
        default=None, gt=0, le=MAX_COUNT, description="Cap on the total number of prompts."
    )
    max_seed_chars: int = Field(
        default=1000,
        ge=100,
        le=MAX_SEED_CHARS,
        description="Seed text is truncated to this length (Cosmopedia: ~1,000).",
    )

    @field_validator("audiences", "styles", "story_audiences")
    @classmethod
    def _unique(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("entries must be unique")
        return values


class ClusteringSpec(Strict):
    enabled: bool = True
    embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    clusters: int = Field(default=145, ge=2, le=100_000)
    sample_size: int = Field(
        default=100_000, ge=100, le=10_000_000, description="Documents used to fit k-means."
    )
    samples_per_label: int = Field(default=10, ge=1, le=100)
    min_educational_score: float = Field(default=3.0, ge=0.0, le=10.0)
    exclude_topics: list[str] = Field(
        default_factory=lambda: ["explicit adult content", "celebrity gossip", "obituaries"]
    )
    seed: int = Field(default=42, ge=0, le=INT64_MAX)
    keep_dropped: bool = Field(
        default=False,
        description="Documents of clusters the keep rule drops still seed prompts, without a topic.",
    )
    gpu: bool = Field(default=False, description="On a cluster: embed on one GPU of the clustering Job.")


class Replicas(Strict):
    min: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    max: int = Field(default=1, ge=1, le=MAX_REPLICAS)

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class Autoscaling(Strict):
    mode: Literal["builtin", "keda"] = "builtin"
    signal: Literal["queue", "saturation"] = Field(
        default="queue",
        description=(
            "builtin mode: scale on queue depth (targetQueuePerReplica), or on saturation: add a "
            "replica while the generators find the servers full and prompts wait, remove one "
            "while they do not."
        ),
    )
    target_queue_per_replica: int = Field(default=256, ge=1, le=1_000_000)
    stabilization_seconds: int = Field(default=120, ge=0, le=DAY_SECONDS)

    @model_validator(mode="after")
    def _keda_scales_on_queue(self) -> Autoscaling:
        if self.mode == "keda" and self.signal == "saturation":
            raise ValueError("keda mode scales on the queue; signal 'saturation' needs mode 'builtin'")
        return self


class AdaptiveConcurrency(Strict):
    """Let each generator worker find its in-flight requests per endpoint, between bounds."""

    enabled: bool = Field(
        default=False,
        description="Adapt in-flight requests to the engine's load; `concurrency` is the start.",
    )
    min: int = Field(default=1, ge=1, le=4096, description="Fewest in-flight requests per worker.")
    max: int = Field(default=512, ge=1, le=4096, description="Most in-flight requests per worker.")

    @model_validator(mode="after")
    def _ordered(self) -> AdaptiveConcurrency:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class Sampling(Strict):
    temperature: float = Field(default=0.6, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1, le=1_000_000)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    seed: int | None = Field(default=None, ge=0, le=INT64_MAX)
    stop: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list, max_length=8)


K8S_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


class SecretKeyRef(Strict):
    """A key of a Secret in the run's namespace: the secret value never appears in a spec."""

    name: str = Field(pattern=K8S_NAME, max_length=253)
    key: str = Field(default="token", min_length=1)


class Toleration(Strict):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0, le=365 * DAY_SECONDS)


class ModelCache(Strict):
    claim_name: str = Field(
        pattern=K8S_NAME,
        max_length=253,
        description="Existing PersistentVolumeClaim that keeps model weights.",
    )
    sub_path: str | None = None


class ServingSpec(Strict):
    """How the operator deploys the inference server; unused with an endpoint."""

    image: str | None = Field(
        default=None, description="Image repository; default: the operator's pinned one."
    )
    tag: str | None = Field(default=None, description="Image tag; default: the operator's pinned one.")
    hf_token_secret: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a Hugging Face token (gated models)."
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    model_cache: ModelCache | None = None
    shm_size: str = Field(default="1Gi", pattern=QUANTITY, description="Size of the /dev/shm memory volume.")
    cpu: str | None = Field(default=None, pattern=QUANTITY, description="CPU request per replica.")
    memory: str | None = Field(default=None, pattern=QUANTITY, description="Memory request and limit.")
    max_input_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_total_tokens: int | None = Field(default=None, ge=2, le=MAX_TOKENS)
    extra_args: list[str] = Field(
        default_factory=list, description="Extra server tuning flags (an allow-list per engine)."
    )
    trust_remote_code: bool = Field(
        default=False, description="Let the server run Python code from the model repository."
    )


class GenerationSpec(Strict):
    model: str = Field(default="mistralai/Mixtral-8x7B-Instruct-v0.1", min_length=1)
    revision: str | None = None
    engine: Engine = Engine.tgi
    endpoint: str | None = Field(default=None, description="Use an existing server instead of deploying one.")
    max_new_tokens: int = Field(default=2500, ge=1, le=131_072)
    sampling: Sampling = Field(default_factory=Sampling)
    concurrency: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="In-flight requests per generator worker (with adaptiveConcurrency: where it starts).",
    )
    adaptive_concurrency: AdaptiveConcurrency = Field(default_factory=AdaptiveConcurrency)
    workers: int = Field(default=1, ge=1, le=1024, description="Generator workers (processes or pods).")
    # Under a second the HTTP client treated the timeout as none at all.
    timeout_seconds: float = Field(default=600.0, ge=1.0, le=DAY_SECONDS)
    max_attempts: int = Field(
        default=5, ge=1, le=100, description="Deliveries of one prompt before it fails."
    )
    shard_size: int = Field(default=256, ge=1, le=100_000, description="Completions per output shard.")
    replicas: Replicas = Field(default_factory=Replicas)
    gpus_per_replica: int = Field(default=1, ge=0, le=16)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    api_key_secret: SecretKeyRef | None = Field(
        default=None, description="Secret key with the endpoint's API key (OPENAI_API_KEY, HF_TOKEN)."
    )

    @property
    def max_in_flight(self) -> int:
        """The most requests one worker may keep in flight: what its queue limits must allow."""
        adaptive = self.adaptive_concurrency
        return max(self.concurrency, adaptive.max) if adaptive.enabled else self.concurrency

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _engine_matches_endpoint(self) -> GenerationSpec:
        if self.engine == Engine.openai and self.endpoint is None:
            raise ValueError("engine 'openai' needs an endpoint: cosmoforge cannot deploy OpenAI")
        if self.engine == Engine.embedded and self.endpoint is not None:
            raise ValueError("engine 'embedded' serves its own model: remove the endpoint")
        return self


KNOWN_BENCHMARKS = (
    "mmlu",
    "hellaswag",
    "piqa",
    "siqa",
    "winogrande",
    "openbookqa",
    "arc_easy",
    "arc_challenge",
    "boolq",
)


class Dedup(Strict):
    enabled: bool = True
    exact: bool = True
    ngram: int = Field(default=5, ge=1, le=32)
    buckets: int = Field(default=14, ge=1, le=256)
    hashes_per_bucket: int = Field(default=8, ge=1, le=256)


class Decontaminate(Strict):
    enabled: bool = True
    benchmarks: list[str] = Field(default_factory=lambda: list(KNOWN_BENCHMARKS))
    ngram: int = Field(default=10, ge=1, le=64)
    threshold: Fraction = 0.5
    min_block_chars: int = Field(default=5, ge=0, le=MAX_SEED_CHARS)
    workers: int = Field(
        default=1,
        ge=1,
        le=1024,
        description=(
            "Pods that check the run's dataset in operator mode. 1: one Job runs `cosmo decontaminate`. "
            "More: a Job queues the dataset's row ranges on the run's NATS JetStream "
            "(`cosmo decontaminate-submit --wait`) and a Job of this many `cosmo decontaminate-worker` "
            "pods checks them, with the same outputs. `cosmo run` always checks in one process."
        ),
    )

    @field_validator("benchmarks")
    @classmethod
    def _known_or_path(cls, values: list[str]) -> list[str]:
        for value in values:
            is_path = "/" in value or value.endswith((".parquet", ".jsonl", ".json"))
            if value not in KNOWN_BENCHMARKS and not is_path:
                raise ValueError(
                    f"unknown benchmark {value!r}: use one of {', '.join(KNOWN_BENCHMARKS)} or a file path"
                )
        return values


class PostprocessSpec(Strict):
    dedup: Dedup = Field(default_factory=Dedup)
    decontaminate: Decontaminate = Field(default_factory=Decontaminate)
    ranks: int = Field(
        default=1,
        ge=1,
        le=1024,
        description=(
            "Pods per data stage in operator mode: dedup's MinHash steps and tokenization run as "
            "Indexed Jobs of this many datatrove ranks, each reading its share of the documents. "
            "1: each stage is one Job. `cosmo run` always runs them in one process."
        ),
    )


class Parallelism(Strict):
    dp: int = Field(default=1, ge=1, le=4096)
    tp: int = Field(default=1, ge=1, le=64)
    pp: int = Field(default=1, ge=1, le=1024)
    gpus_per_node: int = Field(
        default=8, ge=1, le=64, description="GPUs per training pod; dp*tp*pp GPUs fill whole nodes of it."
    )

    @model_validator(mode="after")
    def _whole_nodes(self) -> Parallelism:
        gpus = self.dp * self.tp * self.pp
        if gpus > self.gpus_per_node and gpus % self.gpus_per_node:
            nodes = f"whole nodes of gpusPerNode={self.gpus_per_node}"
            raise ValueError(f"dp*tp*pp = {gpus} GPUs do not fill {nodes}")
        return self


class TrainingSpec(Strict):
    enabled: bool = True
    tokenizer: str = "HuggingFaceTB/cosmo2-tokenizer"
    preset: Literal["tiny", "small", "1b"] = "tiny"
    steps: int = Field(default=200, ge=1, le=MAX_COUNT)
    batch_size: int = Field(default=8, ge=1, le=1_000_000)
    sequence_length: int = Field(default=256, ge=8, le=32_768)
    learning_rate: float = Field(default=3e-4, gt=0.0, lt=1.0)
    warmup_steps: int = Field(default=10, ge=0, le=MAX_COUNT)
    checkpoint_every: int | None = Field(
        default=None,
        ge=1,
        le=MAX_COUNT,
        description="Steps between checkpoints in object storage; default: a tenth of steps.",
    )
    parallelism: Parallelism = Field(default_factory=Parallelism)
    evaluate: bool = True
    eval_tasks: list[str] = Field(default_factory=lambda: list(KNOWN_BENCHMARKS))
    eval_data: str | None = Field(
        default=None, description="Folder with <task>/<split>.jsonl task files; default: the Hub."
    )
    eval_max_samples: int | None = Field(
        default=100, ge=1, le=MAX_COUNT, description="Questions scored per task."
    )

    @field_validator("eval_tasks")
    @classmethod
    def _known_tasks(cls, values: list[str]) -> list[str]:
        unknown = sorted(set(values) - set(KNOWN_BENCHMARKS))
        if unknown:
            raise ValueError(f"unknown tasks {', '.join(unknown)}: use {', '.join(KNOWN_BENCHMARKS)}")
        return values


class HubSpec(Strict):
    """Where the run's final dataset is published on the Hugging Face Hub, one config per seed source."""

    repo: str = Field(
        pattern=r"^[\w.-]+/[\w.-]+$", max_length=96, description="Dataset repo id: <owner>/<name>."
    )
    private: bool = Field(
        default=False, description="Create the repo private; an existing repo keeps its visibility."
    )
    token_secret: SecretKeyRef = Field(
        default_factory=lambda: SecretKeyRef(name="hf-token", key="token"),
        description="Secret key with a Hub token that may write to the repo (HF_TOKEN on a laptop).",
    )


class OutputSpec(Strict):
    uri: str = Field(default="cosmoforge-runs", min_length=1, description="Any fsspec URI or local path.")
    hub: HubSpec | None = Field(
        default=None, description="Publish the final dataset and its card to the Hub as the last stage."
    )


class CostSpec(Strict):
    """What a GPU-hour costs and how fast the model runs on it: for the estimate and the spend.

    Unset figures fall back to the published table (`cosmo plan` names the source of each)."""

    gpu: str | None = Field(
        default=None, max_length=64, description="GPU type of the throughput figure, e.g. H100."
    )
    gpu_hour_price: float | None = Field(
        default=None, gt=0.0, le=1_000_000.0, allow_inf_nan=False, description="Price of one GPU-hour."
    )
    tokens_per_second: float | None = Field(
        default=None,
        gt=0.0,
        le=1_000_000_000.0,
        allow_inf_nan=False,
        description="Your measured generated tokens/s per GPU.",
    )
    fill_ratio: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Share of maxNewTokens a completion uses."
    )


class GenerationRunSpec(Strict):
    seeds: list[SeedSource] = Field(min_length=1)
    prompts: PromptsSpec = Field(default_factory=PromptsSpec)
    clustering: ClusteringSpec | None = None
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    postprocess: PostprocessSpec = Field(default_factory=PostprocessSpec)
    training: TrainingSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    cost: CostSpec = Field(default_factory=CostSpec)
    suspend: bool = False

    @field_validator("seeds")
    @classmethod
    def _unique_names(cls, seeds: list[SeedSource]) -> list[SeedSource]:
        names = [seed.name for seed in seeds]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"seed names must be unique, repeated: {', '.join(duplicates)}")
        return seeds


class Phase(StrEnum):
    pending = "Pending"
    clustering = "Clustering"
    generating = "Generating"
    compacting = "Compacting"
    deduplicating = "Deduplicating"
    decontaminating = "Decontaminating"
    training = "Training"
    evaluating = "Evaluating"
    publishing = "Publishing"
    succeeded = "Succeeded"
    failed = "Failed"
    cancelled = "Cancelled"


class Condition(Strict):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


class RunEstimate(Strict):
    """The run's size and cost before generation, as `cosmo plan` computes it from the prompt count."""

    prompts: int = 0
    completion_tokens: int = 0
    gpu_hours: float | None = None
    wall_hours: float | None = None
    cost: float | None = None
    source: str = ""


class Spend(Strict):
    """GPU time used so far: replicas times GPUs per replica, summed over the time between reconciles."""

    gpus: int = 0  # GPUs running at the last reconcile
    gpu_hours: float = 0.0
    cost: float | None = None
    observed_at: float | None = None  # Unix seconds of the last reconcile that added to it


class TrainingStatus(Strict):
    """The latest training record and the evaluation table (`training.metrics.training_summary`)."""

    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    evaluation: dict[str, float] = Field(default_factory=dict)


class GenerationRunStatus(Strict):
    """What the operator (or the embedded runner) reports; shown by `kubectl get gr`."""

    phase: Phase = Phase.pending
    prompts: int = 0
    generated: int = 0
    failed: int = 0
    progress: str = ""
    tokens_per_second: float = 0.0
    replicas: int = 0
    tokens: int = 0
    eta: str = ""
    estimate: RunEstimate | None = None
    spend: Spend | None = None
    training: TrainingStatus | None = None
    outputs: dict[str, str] = Field(default_factory=dict)
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
QUALIFIED_NAME = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
MetadataKey = Annotated[str, Field(pattern=QUALIFIED_NAME, max_length=317)]
MAX_ANNOTATION_BYTES = 256 * 1024  # the API server's own limit
Timestamp = Annotated[str | datetime | None, Field(default=None, exclude=True)]
ServerList = Annotated[list[Any] | None, Field(default=None, max_length=256, exclude=True)]


class Metadata(Strict):
    """Kubernetes object metadata, strictly: any other key is an unknown field, as in the spec.

    A user sets the name, namespace, labels and annotations. What the API server adds (as
    `kubectl get -o yaml` prints it) is accepted so that such output validates, and left out of
    every dump, like the annotations: nothing of it reaches the dispatcher or storage."""

    name: str = Field(pattern=DNS_LABEL, max_length=63)
    namespace: str | None = Field(default=None, pattern=DNS_LABEL, max_length=63)
    labels: dict[MetadataKey, Annotated[str, Field(pattern=LABEL_VALUE, max_length=63)]] = Field(
        default_factory=dict, max_length=64
    )
    annotations: dict[MetadataKey, str] = Field(default_factory=dict, exclude=True)
    uid: str | None = Field(default=None, max_length=64, exclude=True)
    resource_version: str | None = Field(default=None, max_length=64, exclude=True)
    generation: int | None = Field(default=None, ge=0, le=INT64_MAX, exclude=True)
    creation_timestamp: Timestamp
    deletion_timestamp: Timestamp
    deletion_grace_period_seconds: int | None = Field(default=None, ge=0, le=INT64_MAX, exclude=True)
    finalizers: ServerList
    owner_references: ServerList
    managed_fields: ServerList
    self_link: str | None = Field(default=None, max_length=1024, exclude=True)

    @field_validator("annotations")
    @classmethod
    def _annotations_fit(cls, values: dict[str, str]) -> dict[str, str]:
        size = sum(len(key.encode()) + len(value.encode()) for key, value in values.items())
        if size > MAX_ANNOTATION_BYTES:
            raise ValueError(f"annotations are {size} bytes, more than {MAX_ANNOTATION_BYTES}")
        return values


class GenerationRun(Strict):
    api_version: Literal["cosmoforge.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["GenerationRun"]
    metadata: Metadata
    spec: GenerationRunSpec
    status: GenerationRunStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


class SpecError(Exception):
    """A spec that cannot be used; `problems` holds one (field path, reason) pair per problem."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {path}: {reason}" for path, reason in problems))


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(root)"


def problems_from(error: ValidationError) -> list[tuple[str, str]]:
    """Turn pydantic's errors into (field path, reason) pairs a user can act on."""
    problems = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        reason = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            reason = "unknown field"
        elif item["type"] == "missing":
            reason = "required field is missing"
        # Union members repeat the same location with a tag; keep the path a user wrote.
        loc = tuple(part for part in loc if not (isinstance(part, str) and "[" in part))
        problems.append((_field_path(loc), reason))
    return list(dict.fromkeys(problems))


def parse_run(document: Any, source: str = "<spec>") -> GenerationRun:
    if not isinstance(document, dict):
        raise SpecError(source, [("(root)", "a GenerationRun must be a YAML mapping")])
    try:
        return GenerationRun.model_validate(document)
    except ValidationError as error:
        raise SpecError(source, problems_from(error)) from None


def load_run(path: str | Path) -> GenerationRun:
    """Read and validate one GenerationRun from a YAML file; every problem becomes a SpecError."""
    source = str(path)
    try:
        # Read one byte past the cap so an oversized file is refused without reading it all.
        with Path(path).open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            reason = f"the spec is larger than the limit of {MAX_SPEC_BYTES} bytes"
            raise SpecError(source, [("(file)", reason)])
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise SpecError(source, [("(file)", "no such file")]) from None
    except UnicodeDecodeError:
        raise SpecError(source, [("(file)", "not UTF-8 text")]) from None
    return parse_run(single_document(text, source), source)


def single_document(text: str, source: str, whole: str = "(file)") -> Any:
    """The one YAML document in `text`; `whole` names the text in errors that concern all of it."""
    try:
        documents = [doc for doc in load_documents(text) if doc is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else whole
        raise SpecError(source, [(where, f"invalid YAML: {getattr(error, 'problem', error)}")]) from None
    if len(documents) != 1:
        raise SpecError(source, [(whole, f"expected one YAML document, found {len(documents)}")])
    return documents[0]


def dump_run(run: GenerationRun) -> str:
    """The run as YAML with every default filled in: what was actually executed."""
    data = run.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
    return yaml.safe_dump(data, sort_keys=False)
