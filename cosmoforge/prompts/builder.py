"""Spec + seed records -> prompts: a pure, deterministic, streaming function.

Each seed record yields `variantsPerSeed` prompts with distinct audience x style pairs, drawn
from a per-source shuffled deck so that pairs stay balanced across the run. The same spec and
the same seed files always give byte-identical prompts, and every prompt carries a stable
`prompt_id` that the rest of the pipeline keys on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from cosmoforge.prompts.seeds import SeedRecord, read_seed
from cosmoforge.spec.model import GenerationRun, GenerationSpec, SeedKind, SeedSource
from cosmoforge.spec.template_check import bounded_environment, check_isolated

TEMPLATE_FOR_KIND = {
    SeedKind.outline: "outline",
    SeedKind.wikihow: "wikihow",
    SeedKind.web: "web",
    SeedKind.math: "math",
    SeedKind.instruction: "story",
}
STORY_STYLE = "story"
# `kind: prompt` seeds bring their own prompt text: no template renders it.
GIVEN = "given"


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    run: str
    seed_source: str
    seed_kind: str
    seed_id: str
    audience: str
    style: str
    topic: str | None
    template_id: str
    template_version: str
    prompt: str

    def to_dict(self) -> dict[str, Any]:
        # Flat and called once per prompt: a plain copy is ~10x faster than dataclasses.asdict.
        return dict(vars(self))


@dataclass(frozen=True)
class Template:
    id: str
    version: str
    text: str


@cache
def voices() -> dict[str, Any]:
    return yaml.safe_load(resources.files("cosmoforge.prompts.templates").joinpath("voices.yaml").read_text())


@cache
def builtin_template(template_id: str) -> Template:
    text = resources.files("cosmoforge.prompts.templates").joinpath(f"{template_id}.j2").read_text()
    match = re.match(r"\{#-? version: (\S+) -?#\}", text)
    return Template(template_id, match.group(1) if match else "0", text)


def resolve_templates(overrides: Mapping[str, str]) -> dict[str, Template]:
    """Built-in templates with the spec's overrides; an override is versioned by its content."""
    templates = {tid: builtin_template(tid) for tid in TEMPLATE_FOR_KIND.values()}
    for tid, text in overrides.items():
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        templates[tid] = Template(tid, f"user-{digest}", text)
    return templates


# Real prompts render under the same bounds as the check: a template cannot do more work on a
# seed record than it did on the sample.
_ENV = bounded_environment()


def template_problems(overrides: Mapping[str, str], sample_chars: int) -> list[tuple[str, str]]:
    """(template id, reason) for each override that cannot be used: an unknown id, or a
    template that fails the bounded check on a seed text of `sample_chars` characters, which
    runs in a child process with a time and memory limit (blocking: async callers use a thread)."""
    known = set(TEMPLATE_FOR_KIND.values())
    problems = [
        (tid, f"unknown template id {tid!r}; known: {', '.join(sorted(known))}")
        for tid in overrides
        if tid not in known
    ]
    checked = check_isolated({tid: text for tid, text in overrides.items() if tid in known}, sample_chars)
    return problems + list(checked.items())


def _context(
    record: SeedRecord,
    audience: Mapping[str, str],
    style: Mapping[str, str],
    topic: str | None,
    openings: str,
) -> dict[str, Any]:
    fields = _Fields(record.fields)
    return {
        "text": record.text,
        "topic": topic,
        "category": record.category,
        "fields": fields,
        "audience": audience,
        "style": style,
        "openings": openings,
    }


class _Fields(dict[str, Any]):
    """Seed columns for templates: a missing optional column reads as empty, not as an error."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name, "")


def openings_instruction(banned: list[str]) -> str:
    if not banned:
        return "Be creative and original."
    quoted = ", ".join(f'"{opening}"' for opening in banned)
    return f"Be creative and original: do not open with {quoted} or any other stock phrase."


def generation_key(generation: GenerationSpec) -> str:
    """The generation settings that change a completion, as one canonical string: the model
    (and its revision), every sampling parameter and the token budget. Where the model runs
    (engine, endpoint, replicas, concurrency) changes no completion and is left out."""
    settings = {
        "model": generation.model,
        "revision": generation.revision,
        "max_new_tokens": generation.max_new_tokens,
        "sampling": generation.sampling.model_dump(mode="json"),
    }
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def prompt_id(
    run: str, record: SeedRecord, template: Template, audience: str, style: str, text: str, generation: str
) -> str:
    """The key every later stage uses. It covers the record and the pair that chose the prompt,
    the rendered text (so a changed seed row or template gives a new id) and the generation
    settings (so a new model or sampling regenerates): resuming skips exactly what is unchanged."""
    key = "\x1f".join(
        (run, record.source, record.id, template.id, template.version, audience, style, text, generation)
    )
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _pairs(kind: str, run: GenerationRun) -> list[tuple[str, str]]:
    if kind == SeedKind.instruction:
        return [(audience, STORY_STYLE) for audience in run.spec.prompts.story_audiences]
    return list(itertools.product(run.spec.prompts.audiences, run.spec.prompts.styles))


class _Deck:
    """Deals audience x style pairs in shuffled rounds, so every pair is used equally often."""

    def __init__(self, pairs: list[tuple[str, str]], rng: random.Random):
        self.pairs, self.rng, self.cards = pairs, rng, list[tuple[str, str]]()

    def deal(self, count: int) -> list[tuple[str, str]]:
        count = min(count, len(self.pairs))
        hand: list[tuple[str, str]] = []
        while len(hand) < count:
            if not self.cards:
                self.cards = self.rng.sample(self.pairs, len(self.pairs))
            card = self.cards.pop()
            if card in hand:
                # A round boundary can offer a pair already in this hand; keep it for later.
                self.cards.insert(0, card)
                card = next(c for c in reversed(self.cards) if c not in hand)
                self.cards.remove(card)
            hand.append(card)
        return hand


def _source_rng(seed: int, source: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{source}".encode()).digest()[:8], "big"))


def prompts_for_source(
    run: GenerationRun, records: Iterator[SeedRecord], kind: str, source: str
) -> Iterator[Prompt]:
    spec = run.spec.prompts
    generation = generation_key(run.spec.generation)
    if kind == SeedKind.prompt:
        yield from _given_prompts(run, records, generation)
        return
    templates = resolve_templates(spec.templates)
    template = templates[TEMPLATE_FOR_KIND[SeedKind(kind)]]
    compiled = _ENV.from_string(template.text)
    table = voices()
    rng = _source_rng(spec.seed, source)
    pairs = _pairs(kind, run)
    deck = _Deck(pairs, rng)
    openings = openings_instruction(spec.banned_openings)
    audience_table = table["story_audiences"] if kind == SeedKind.instruction else table["audiences"]
    max_chars = _max_chars(run, source)
    for record in records:
        record = _truncated(record, max_chars)
        fixed = _fixed_pair(record, pairs)
        for audience, style in [fixed] if fixed else deck.deal(spec.variants_per_seed):
            topic = record.topic if record.topic and rng.random() < spec.topic_conditioning else None
            style_voice = table["styles"].get(style, {"label": "story", "instructions": ""})
            text = _tidy(
                compiled.render(**_context(record, audience_table[audience], style_voice, topic, openings))
            )
            yield Prompt(
                prompt_id=prompt_id(run.name, record, template, audience, style, text, generation),
                run=run.name,
                seed_source=record.source,
                seed_kind=record.kind,
                seed_id=record.id,
                audience=audience,
                style=style,
                topic=topic,
                template_id=template.id,
                template_version=template.version,
                prompt=text,
            )


def _given_prompts(run: GenerationRun, records: Iterator[SeedRecord], generation: str) -> Iterator[Prompt]:
    """One prompt per record of a `kind: prompt` source, its text as given (never truncated: a
    cut prompt is another prompt); audience, style and topic columns come along as lineage."""
    given = Template(SeedKind.prompt.value, GIVEN, "")
    for record in records:
        audience, style = record.audience or "", record.style or ""
        yield Prompt(
            prompt_id=prompt_id(run.name, record, given, audience, style, record.text, generation),
            run=run.name,
            seed_source=record.source,
            seed_kind=record.kind,
            seed_id=record.id,
            audience=audience,
            style=style,
            topic=record.topic,
            template_id=given.id,
            template_version=given.version,
            prompt=record.text,
        )


def _fixed_pair(record: SeedRecord, pairs: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The pair a record's own audience and style columns name, when the spec has it: a record
    of a dataset whose rows were each written for one pair keeps it."""
    # A value the spec does not use (another dataset's name for a reader) names nothing.
    audience = record.audience if record.audience in {a for a, _ in pairs} else None
    style = record.style if record.style in {s for _, s in pairs} else None
    if audience is None and style is None:
        return None
    matching = [pair for pair in pairs if audience in (None, pair[0]) and style in (None, pair[1])]
    # Only one of the two named: the other is chosen by the record, not by the deal order.
    digest = hashlib.sha256(record.id.encode()).digest()
    return matching[int.from_bytes(digest[:4], "big") % len(matching)]


def _max_chars(run: GenerationRun, source: str) -> int:
    named: SeedSource | None = next((s for s in run.spec.seeds if s.name == source), None)
    if named is not None and named.max_chars is not None:
        return named.max_chars
    return run.spec.prompts.max_seed_chars


def _truncated(record: SeedRecord, limit: int) -> SeedRecord:
    if len(record.text) <= limit:
        return record
    cut = record.text[:limit].rsplit(" ", 1)[0]
    return dataclasses.replace(record, text=cut)


def _tidy(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.strip().splitlines()))


def with_topics(
    records: Iterator[SeedRecord], topics: Mapping[str, str | None], keep_dropped: bool = False
) -> Iterator[SeedRecord]:
    """Records carry the cluster topic of their document unless the seed file already names one;
    documents of dropped clusters (topic None) are left out unless `keep_dropped`."""
    for record in records:
        if record.topic is None and record.id in topics:
            topic = topics[record.id]
            if topic is None and not keep_dropped:
                continue
            record = dataclasses.replace(record, topic=topic)
        yield record


def build_prompts(
    run: GenerationRun, records: Mapping[str, Iterator[SeedRecord]] | None = None
) -> Iterator[Prompt]:
    """All prompts of a run, source by source, capped by `prompts.limit` split by source weight."""
    seeds = run.spec.seeds
    quotas: dict[str, int | None] = dict.fromkeys((s.name for s in seeds), None)
    if run.spec.prompts.limit is not None:
        total_weight = sum(s.weight for s in seeds)
        quotas = {s.name: round(run.spec.prompts.limit * s.weight / total_weight) for s in seeds}
    for source in seeds:
        stream = records[source.name] if records is not None else read_seed(source)
        if source.topics_uri is not None:
            from cosmoforge.clustering.pipeline import document_topics

            keep = run.spec.clustering is not None and run.spec.clustering.keep_dropped
            stream = with_topics(stream, document_topics(source.topics_uri, source.id_field), keep)
        prompts = prompts_for_source(run, stream, source.kind, source.name)
        yield from itertools.islice(prompts, quotas[source.name])
