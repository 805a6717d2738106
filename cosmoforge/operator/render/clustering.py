"""Clustering before generation: one Job per web seed source that has no topics yet.

Cosmopedia's web prompts name the topic of their seed's cluster. On a cluster the operator runs
`cosmo cluster` for each such source as a Job, before the run is registered with the
dispatcher: the inference server it deploys first names the clusters, and the dispatcher then
builds the prompts with the topics under `<run root>/topics/<source>/` (`with_topics_from`).
"""

from __future__ import annotations

from cosmoforge.operator.render.common import Platform, endpoint_url, run_root, secret_env
from cosmoforge.operator.render.jobs import Stage
from cosmoforge.spec.model import Engine, GenerationRun, Phase, SeedSource


def clustering_sources(run: GenerationRun) -> list[SeedSource]:
    """Web sources the spec wants clustered: those that bring no topics of their own."""
    spec = run.spec.clustering
    if spec is None or not spec.enabled:
        return []
    return [s for s in run.spec.seeds if s.kind == "web" and not s.topic_field and not s.topics_uri]


def topics_uri(run: GenerationRun, platform: Platform, source: SeedSource) -> str:
    return f"{run_root(run, platform)}/topics/{source.name}"


def with_topics_from(run: GenerationRun, platform: Platform) -> GenerationRun:
    """The run as the dispatcher gets it once clustering is over: sources name their topics."""
    clustered = {source.name for source in clustering_sources(run)}
    if not clustered:
        return run
    result = run.model_copy(deep=True)
    for source in result.spec.seeds:
        if source.name in clustered:
            source.topics_uri = topics_uri(run, platform, source)
    return result


def clustering_stages(run: GenerationRun, platform: Platform) -> list[Stage]:
    """A `cosmo cluster` Job per source to cluster; they run side by side, all before generation.

    Components are numbered by the source's place in the spec: source names are up to 63
    characters, too long for a child's name beside the run's.
    """
    spec = run.spec.clustering
    generation = run.spec.generation
    found: list[Stage] = []
    for index, source in enumerate(run.spec.seeds):
        if spec is None or source not in clustering_sources(run):
            continue
        args: tuple[str, ...] = ("cluster", source.uri, "--out", topics_uri(run, platform, source))
        args += ("--format", source.format, "--text-field", source.text_field)
        args += ("--id-field", source.id_field) if source.id_field else ()
        args += ("--clusters", str(spec.clusters), "--sample-size", str(spec.sample_size))
        args += ("--samples-per-label", str(spec.samples_per_label))
        args += ("--min-score", str(spec.min_educational_score), "--seed", str(spec.seed))
        args += ("--embedding-model", spec.embedding_model)
        args += tuple(arg for topic in spec.exclude_topics for arg in ("--exclude", topic))
        engine = "openai" if generation.engine == Engine.openai else "tgi"
        args += ("--endpoint", endpoint_url(run), "--engine", engine, "--model", generation.model)
        env: tuple[dict[str, object], ...] = ()
        if generation.api_key_secret:
            env = (secret_env("OPENAI_API_KEY", generation.api_key_secret),)
        found.append(
            Stage(
                f"cluster-{index}",
                Phase.clustering,
                args,
                topics_uri(run, platform, source),
                cpu="4",
                memory="16Gi",
                env=env,
                kind="cluster",
                gpus=1 if spec.gpu else 0,
            )
        )
    return found
