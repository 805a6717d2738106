"""The `GenerationRun` spec: one pydantic model that the CLI, the CRD and the operator share.

Field names are camelCase in YAML (Kubernetes convention) and snake_case in Python. Defaults
follow the Cosmopedia recipe, so a short spec already describes a sensible run.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_GROUP = "cosmoforge.io"
API_VERSION = "v1alpha1"
KIND = "GenerationRun"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class Strict(BaseModel):
    """Base for spec parts: camelCase aliases, unknown fields rejected, enums kept as values."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )


class SeedKind(StrEnum):
    outline = "outline"
    wikihow = "wikihow"
    web = "web"
    math = "math"
    instruction = "instruction"


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


class SeedSource(Strict):
    name: str = Field(pattern=DNS_LABEL, max_length=63, description="Unique name of this source.")
    kind: SeedKind
    uri: str = Field(min_length=1, description="fsspec path or URI, or hf://datasets/<id>.")
    format: Literal["auto", "parquet", "jsonl", "csv", "hf"] = "auto"
    text_field: str = Field(default="text", min_length=1)
    id_field: str | None = None
    topic_field: str | None = Field(default=None, description="Column with a cluster topic (web seeds).")
    topics_uri: str | None = Field(
        default=None, description="Output folder of `cosmo cluster` over this source: topics by document id."
    )
    category_field: str | None = Field(default=None, description="Column with a source/category.")
    exclude_categories: list[str] = Field(
        default_factory=lambda: ["glaive-code-assist", "camelai", "code", "coding"],
        description="Categories unsuitable for stories (instruction seeds).",
    )
    split: str = "train"
    weight: float = Field(default=1.0, gt=0.0)
    limit: int | None = Field(default=None, gt=0)


class PromptsSpec(Strict):
    audiences: list[Audience] = Field(default_factory=lambda: list(Audience), min_length=1)
    styles: list[Style] = Field(default_factory=lambda: list(Style), min_length=1)
    story_audiences: list[StoryAudience] = Field(default_factory=lambda: list(StoryAudience), min_length=1)
    variants_per_seed: int = Field(
        default=1, ge=1, le=12, description="Distinct audience x style prompts drawn per seed record."
    )
    topic_conditioning: Fraction = 0.5
    banned_openings: list[str] = Field(
        default_factory=lambda: ["Once upon a time", "The sun hung low in the sky"]
    )
    templates: dict[str, str] = Field(
        default_factory=dict, description="Template overrides: template id -> Jinja2 text."
    )
    seed: int = Field(default=42, ge=0)
    limit: int | None = Field(default=None, gt=0, description="Cap on the total number of prompts.")
    max_seed_chars: int = Field(default=2000, ge=100, description="Seed text is truncated to this length.")

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
    sample_size: int = Field(default=100_000, ge=100, description="Documents used to fit k-means.")
    samples_per_label: int = Field(default=10, ge=1, le=100)
    min_educational_score: float = Field(default=3.0, ge=0.0, le=10.0)
    exclude_topics: list[str] = Field(
        default_factory=lambda: ["explicit adult content", "celebrity gossip", "obituaries"]
    )
    seed: int = Field(default=42, ge=0)


class Replicas(Strict):
    min: int = Field(default=1, ge=0)
    max: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class Autoscaling(Strict):
    mode: Literal["builtin", "keda"] = "builtin"
    target_queue_per_replica: int = Field(default=256, ge=1)
    stabilization_seconds: int = Field(default=120, ge=0)


class Sampling(Strict):
    temperature: float = Field(default=0.6, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    seed: int | None = Field(default=None, ge=0)
    stop: list[str] = Field(default_factory=list, max_length=8)


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
    toleration_seconds: int | None = Field(default=None, ge=0)


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
    max_input_tokens: int | None = Field(default=None, ge=1)
    max_total_tokens: int | None = Field(default=None, ge=2)
    extra_args: list[str] = Field(default_factory=list, description="Extra server arguments.")


class GenerationSpec(Strict):
    model: str = Field(default="mistralai/Mixtral-8x7B-Instruct-v0.1", min_length=1)
    revision: str | None = None
    engine: Engine = Engine.tgi
    endpoint: str | None = Field(default=None, description="Use an existing server instead of deploying one.")
    max_new_tokens: int = Field(default=2500, ge=1, le=131_072)
    sampling: Sampling = Field(default_factory=Sampling)
    concurrency: int = Field(
        default=32, ge=1, le=4096, description="In-flight requests per generator worker."
    )
    workers: int = Field(default=1, ge=1, le=1024, description="Generator workers (processes or pods).")
    timeout_seconds: float = Field(default=600.0, gt=0.0)
    max_attempts: int = Field(
        default=5, ge=1, le=100, description="Deliveries of one prompt before it fails."
    )
    shard_size: int = Field(default=256, ge=1, description="Completions per output shard.")
    replicas: Replicas = Field(default_factory=Replicas)
    gpus_per_replica: int = Field(default=1, ge=0, le=16)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    api_key_secret: SecretKeyRef | None = Field(
        default=None, description="Secret key with the endpoint's API key (OPENAI_API_KEY, HF_TOKEN)."
    )

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
    min_block_chars: int = Field(default=5, ge=0)
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


class Parallelism(Strict):
    dp: int = Field(default=1, ge=1)
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)


class TrainingSpec(Strict):
    enabled: bool = True
    tokenizer: str = "HuggingFaceTB/cosmo2-tokenizer"
    preset: Literal["tiny", "small", "1b"] = "tiny"
    steps: int = Field(default=200, ge=1)
    batch_size: int = Field(default=8, ge=1)
    sequence_length: int = Field(default=256, ge=8, le=32_768)
    learning_rate: float = Field(default=3e-4, gt=0.0, lt=1.0)
    warmup_steps: int = Field(default=10, ge=0)
    parallelism: Parallelism = Field(default_factory=Parallelism)
    evaluate: bool = True
    eval_tasks: list[str] = Field(default_factory=lambda: list(KNOWN_BENCHMARKS))
    eval_data: str | None = Field(
        default=None, description="Folder with <task>/<split>.jsonl task files; default: the Hub."
    )
    eval_max_samples: int | None = Field(default=100, ge=1, description="Questions scored per task.")

    @field_validator("eval_tasks")
    @classmethod
    def _known_tasks(cls, values: list[str]) -> list[str]:
        unknown = sorted(set(values) - set(KNOWN_BENCHMARKS))
        if unknown:
            raise ValueError(f"unknown tasks {', '.join(unknown)}: use {', '.join(KNOWN_BENCHMARKS)}")
        return values


class OutputSpec(Strict):
    uri: str = Field(default="cosmoforge-runs", min_length=1, description="Any fsspec URI or local path.")


class GenerationRunSpec(Strict):
    seeds: list[SeedSource] = Field(min_length=1)
    prompts: PromptsSpec = Field(default_factory=PromptsSpec)
    clustering: ClusteringSpec | None = None
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    postprocess: PostprocessSpec = Field(default_factory=PostprocessSpec)
    training: TrainingSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
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
    deduplicating = "Deduplicating"
    decontaminating = "Decontaminating"
    training = "Training"
    evaluating = "Evaluating"
    succeeded = "Succeeded"
    failed = "Failed"
    cancelled = "Cancelled"


class Condition(Strict):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


class GenerationRunStatus(Strict):
    """What the operator (or the embedded runner) reports; shown by `kubectl get gr`."""

    phase: Phase = Phase.pending
    prompts: int = 0
    generated: int = 0
    failed: int = 0
    progress: str = ""
    tokens_per_second: float = 0.0
    replicas: int = 0
    outputs: dict[str, str] = Field(default_factory=dict)
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


class Metadata(BaseModel):
    """Kubernetes object metadata: only the name matters to a run; the API server adds the rest."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=DNS_LABEL, max_length=63)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


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
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(source, [("(file)", "no such file")]) from None
    except UnicodeDecodeError:
        raise SpecError(source, [("(file)", "not UTF-8 text")]) from None
    return parse_run(single_document(text, source), source)


def single_document(text: str, source: str, whole: str = "(file)") -> Any:
    """The one YAML document in `text`; `whole` names the text in errors that concern all of it."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
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
