"""How big a run is and what it will cost, before a GPU starts: `cosmo plan`.

People who pay for GPU weeks want the size of a run before they launch it. Counting is exact
(the prompts are built from the seeds, as the run will build them, but not stored); tokens and
GPU time are estimates, and every estimate says where its number came from:

- prompt tokens: the model's own tokenizer when it is available, else another tokenizer's
  count on a sample of the prompts, scaled by characters;
- completion tokens: `maxNewTokens` times a fill ratio (what share of the budget a completion
  uses), from a finished run when one is given, else the published Cosmopedia mean;
- GPU-hours: completion tokens over a published throughput figure for the model and GPU (the
  table below, sources in docs/plan.md), or the user's own measured tokens/s.

Everything here is pure: the caller supplies the prompts and the token counter.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

from cosmoforge.prompts.builder import Prompt
from cosmoforge.spec.model import GenerationRun

# Cosmopedia's published totals: 25 billion tokens in over 30 million documents.
COSMOPEDIA_TOKENS = 25_000_000_000
COSMOPEDIA_DOCUMENTS = 30_000_000
COSMOPEDIA_MEAN_TOKENS = COSMOPEDIA_TOKENS / COSMOPEDIA_DOCUMENTS
# Prompts whose tokens are counted exactly; the rest are scaled from them by characters.
TOKEN_SAMPLE = 2_000


@dataclass(frozen=True)
class Throughput:
    """Generated tokens per second per GPU for a whole run of `model` on `gpu` with `engine`."""

    model: str
    gpu: str
    engine: str
    tokens_per_second: float
    source: str


# Figures of whole generation runs, not peak benchmarks: they include prefill, retries and idle
# time. Sources in docs/plan.md.
THROUGHPUT = (
    Throughput(
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "H100",
        "tgi",
        # 25B tokens in "over 10k GPU hours": at most this many tokens/s per GPU.
        COSMOPEDIA_TOKENS / (10_000 * 3600),
        "Cosmopedia blog post: 25B tokens, over 10k H100 GPU-hours, TGI",
    ),
    Throughput(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "cpu-2",
        "embedded",
        44.0,
        "cosmoforge quickstart, measured: llama.cpp on 2 CPU cores (docs/generation.md)",
    ),
)


def published_throughput(model: str, gpu: str, engine: str) -> Throughput | None:
    """The table's row for this model and GPU (any engine when none matches the spec's)."""
    rows = [
        row for row in THROUGHPUT if row.model.lower() == model.lower() and row.gpu.lower() == gpu.lower()
    ]
    exact = [row for row in rows if row.engine == engine]
    return next(iter(exact or rows), None)


@dataclass
class PromptCounts:
    """What the seeds make: prompts by source, audience and style, and their characters."""

    prompts: int = 0
    characters: int = 0
    by_source: collections.Counter[str] = field(default_factory=collections.Counter)
    by_audience: collections.Counter[str] = field(default_factory=collections.Counter)
    by_style: collections.Counter[str] = field(default_factory=collections.Counter)
    sample: list[str] = field(default_factory=list)

    def add(self, prompt: Prompt, sample_size: int = TOKEN_SAMPLE) -> None:
        self.prompts += 1
        self.characters += len(prompt.prompt)
        self.by_source[prompt.seed_source] += 1
        self.by_audience[prompt.audience] += 1
        self.by_style[prompt.style] += 1
        if len(self.sample) < sample_size:
            self.sample.append(prompt.prompt)


def count_prompts(prompts: Iterable[Prompt], sample_size: int = TOKEN_SAMPLE) -> PromptCounts:
    """One pass over the prompts; memory holds only the counters and the token sample."""
    counts = PromptCounts()
    for prompt in prompts:
        counts.add(prompt, sample_size)
    return counts


@dataclass(frozen=True)
class TokenCounter:
    """A tokenizer as the planner sees it: counts for a batch of texts, and what it is."""

    count: Callable[[Sequence[str]], Sequence[int]]
    name: str
    exact: bool  # the run's own model's tokenizer, not a stand-in


@dataclass(frozen=True)
class Assumptions:
    """The user's overrides; None means: take the default and say which."""

    fill_ratio: float | None = None
    fill_source: str | None = None
    tokens_per_second: float | None = None
    gpu: str | None = None  # None: H100, or the CPU row for the embedded engine
    gpu_hour_price: float | None = None


def prompt_tokens(counts: PromptCounts, counter: TokenCounter | None) -> tuple[int, str]:
    """Prompt tokens of the whole run: exact on the sample, scaled by characters beyond it."""
    if counter is None or not counts.sample:
        # About four characters per token for English BPE vocabularies.
        return math.ceil(counts.characters / 4), "estimate: 4 characters per token (no tokenizer available)"
    sampled = int(sum(counter.count(counts.sample)))
    sample_chars = sum(len(text) for text in counts.sample)
    if len(counts.sample) == counts.prompts:
        tokens = sampled
        how = "counted"
    else:
        tokens = math.ceil(counts.characters * sampled / max(1, sample_chars))
        how = f"counted on {len(counts.sample)} prompts, scaled by characters"
    owner = "the model's tokenizer" if counter.exact else f"{counter.name} (a stand-in for the model's)"
    return tokens, f"{how} with {owner}"


@dataclass(frozen=True)
class Estimate:
    """Completion tokens, GPU time and cost of `prompts` prompts, with where each figure came from."""

    prompts: int
    completion_tokens_per_prompt: float
    completion_tokens: int
    completion_source: str
    gpu: str
    gpus: int  # GPUs at replicas.max
    tokens_per_second_per_gpu: float | None
    throughput_source: str
    gpu_hours: float | None
    wall_hours: float | None
    gpu_hour_price: float | None
    cost: float | None


@dataclass(frozen=True)
class Plan(Estimate):
    """An estimate with what it was computed from: the prompts by kind and their tokens."""

    run: str
    model: str
    by_source: dict[str, int]
    by_audience: dict[str, int]
    by_style: dict[str, int]
    prompt_tokens: int
    prompt_tokens_source: str


def assumptions_of(run: GenerationRun, given: Assumptions | None = None) -> Assumptions:
    """The user's overrides: what is given (flags) first, then the spec's `cost` section."""
    given = given or Assumptions()
    cost = run.spec.cost
    return Assumptions(
        fill_ratio=given.fill_ratio if given.fill_ratio is not None else cost.fill_ratio,
        fill_source=given.fill_source,
        tokens_per_second=given.tokens_per_second or cost.tokens_per_second,
        gpu=given.gpu or cost.gpu,
        gpu_hour_price=given.gpu_hour_price or cost.gpu_hour_price,
    )


def estimate(run: GenerationRun, prompts: int, assumptions: Assumptions | None = None) -> Estimate:
    """What generating `prompts` prompts of this run takes: tokens, GPU-hours, wall time, cost."""
    assumptions = assumptions_of(run, assumptions)
    generation = run.spec.generation
    gpu = assumptions.gpu or ("cpu-2" if str(generation.engine) == "embedded" else "H100")
    budget = generation.max_new_tokens
    if assumptions.fill_ratio is not None:
        per_prompt = budget * assumptions.fill_ratio
        fill_source = (
            assumptions.fill_source or f"fill ratio {assumptions.fill_ratio:.2f} of maxNewTokens (given)"
        )
    else:
        per_prompt = min(float(budget), COSMOPEDIA_MEAN_TOKENS)
        fill_source = (
            f"min(maxNewTokens, {COSMOPEDIA_MEAN_TOKENS:.0f}): Cosmopedia's published mean "
            "(25B tokens / 30M documents)"
        )
    completion = math.ceil(per_prompt * prompts)
    gpus = generation.replicas.max * max(1, generation.gpus_per_replica)
    rate, rate_source = assumptions.tokens_per_second, "given"
    if rate is None:
        row = published_throughput(generation.model, gpu, str(generation.engine))
        rate = row.tokens_per_second if row else None
        rate_source = (
            row.source
            if row
            else f"no published figure for {generation.model} on {gpu}: pass --tokens-per-second"
        )
    gpu_hours = completion / rate / 3600 if rate else None
    price = assumptions.gpu_hour_price
    return Estimate(
        prompts=prompts,
        completion_tokens_per_prompt=per_prompt,
        completion_tokens=completion,
        completion_source=fill_source,
        gpu=gpu,
        gpus=gpus,
        tokens_per_second_per_gpu=rate,
        throughput_source=rate_source,
        gpu_hours=gpu_hours,
        wall_hours=gpu_hours / gpus if gpu_hours is not None else None,
        gpu_hour_price=price,
        cost=gpu_hours * price if gpu_hours is not None and price is not None else None,
    )


def plan_run(
    run: GenerationRun,
    counts: PromptCounts,
    counter: TokenCounter | None = None,
    assumptions: Assumptions | None = None,
) -> Plan:
    """The plan for a run from its prompt counts: tokens, GPU-hours, wall time and cost."""
    tokens, tokens_source = prompt_tokens(counts, counter)
    return Plan(
        run=run.name,
        model=run.spec.generation.model,
        by_source=dict(counts.by_source.most_common()),
        by_audience=dict(counts.by_audience.most_common()),
        by_style=dict(counts.by_style.most_common()),
        prompt_tokens=tokens,
        prompt_tokens_source=tokens_source,
        **asdict(estimate(run, counts.prompts, assumptions)),
    )


def fill_ratio_of(completion_tokens: Sequence[int], budgets: Sequence[int]) -> float:
    """The share of the token budget (max new tokens) that a finished run's completions used."""
    if not completion_tokens or sum(budgets) <= 0:
        raise ValueError("the run has no completions to measure a fill ratio on")
    return sum(completion_tokens) / sum(budgets)
