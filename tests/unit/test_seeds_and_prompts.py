"""Seed readers and the prompt builder: real files in, deterministic balanced prompts out."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import small_run
from cosmoforge.prompts.builder import build_prompts
from cosmoforge.prompts.seeds import SeedCounts, SeedError, read_seed
from cosmoforge.spec.model import SeedSource, parse_run
from cosmoforge.spec.validation import resolve_uri


def _source(uri: str, **extra: object) -> SeedSource:
    return SeedSource.model_validate({"name": "s", "kind": "web", "uri": uri, **extra})


def _jsonl(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_readers_agree_across_formats(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "text": f"extract number {i}", "topic": "t"} for i in range(7)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    (tmp_path / "a.csv").write_text(
        "id,text,topic\n" + "".join(f"{r['id']},{r['text']},{r['topic']}\n" for r in rows)
    )
    _jsonl(tmp_path / "a.jsonl", rows)
    results = []
    for name in ("a.parquet", "a.csv", "a.jsonl"):
        records = list(read_seed(_source(str(tmp_path / name), idField="id", topicField="topic")))
        results.append([(r.id, r.text, r.topic) for r in records])
    assert results[0] == results[1] == results[2]
    assert [r[0] for r in results[0]] == [f"r{i}" for i in range(7)]


def test_empty_rows_are_skipped_and_counted_and_limit_applies(tmp_path: Path) -> None:
    uri = _jsonl(
        tmp_path / "s.jsonl", [{"text": "a"}, {"text": "  "}, {"text": None}, {"text": "b"}, {"text": "c"}]
    )
    counts = SeedCounts()
    records = list(read_seed(_source(uri, limit=2), counts))
    assert [r.text for r in records] == ["a", "b"]
    assert counts.skipped_empty == 2 and counts.read == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"body": "no text field"}\n', "row 0: field 'text' missing"),
        (b'{"text": "ok"}\n{"text": broken\n', "line 2: invalid JSON"),
        (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "line 2: not UTF-8"),
        (b'{"text": 42}\n', "field 'text' is not text"),
    ],
)
def test_bad_seed_files_name_file_row_and_field(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(SeedError, match=message) as caught:
        list(read_seed(_source(str(path))))
    assert str(path) in str(caught.value)


def test_missing_seed_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(SeedError, match="no such file"):
        list(read_seed(_source(str(tmp_path / "absent.jsonl"))))
    with pytest.raises(SeedError, match="cannot tell the format"):
        list(read_seed(_source(str(tmp_path / "seeds.txt"))))


def test_instruction_categories_are_excluded(tmp_path: Path) -> None:
    source = SeedSource.model_validate(
        {"name": "q", "kind": "instruction", "uri": resolve_uri("cosmoforge://samples/instructions.jsonl"),
         "idField": "id", "categoryField": "category"}
    )  # fmt: skip
    counts = SeedCounts()
    records = list(read_seed(source, counts))
    assert {r.category for r in records}.isdisjoint({"glaive-code-assist", "camelai"})
    assert counts.excluded == 2 and len(records) == 5


def _run(**prompts: object) -> object:
    document = small_run()
    for seed in document["spec"]["seeds"]:
        seed["uri"] = resolve_uri(seed["uri"])
    document["spec"]["prompts"].update(prompts)
    return parse_run(document)


def test_prompts_are_deterministic_and_ids_stable() -> None:
    first = [p.to_dict() for p in build_prompts(_run(variantsPerSeed=3))]
    second = [p.to_dict() for p in build_prompts(_run(variantsPerSeed=3))]
    assert json.dumps(first) == json.dumps(second)
    ids = [p["prompt_id"] for p in first]
    assert len(ids) == len(set(ids)) == 10 * 3
    other_seed = [p.prompt_id for p in build_prompts(_run(variantsPerSeed=3, seed=99))]
    # A different seed reshuffles audience/style pairs, so some ids change, but ids never repeat.
    assert set(other_seed) != set(ids) and len(set(other_seed)) == len(other_seed)


def test_variants_use_distinct_pairs_and_stay_balanced() -> None:
    prompts = list(build_prompts(_run(variantsPerSeed=4)))
    per_record = collections.defaultdict(list)
    for p in prompts:
        per_record[(p.seed_source, p.seed_id)].append((p.audience, p.style))
    assert all(len(set(pairs)) == 4 for pairs in per_record.values())
    # Within a source, a balanced deal uses every pair and no pair twice more than another.
    for source in ("web", "math"):
        counts = collections.Counter((p.audience, p.style) for p in prompts if p.seed_source == source)
        assert len(counts) == 12 and max(counts.values()) - min(counts.values()) <= 1


def test_topic_conditioning_share_follows_the_spec() -> None:
    document = small_run()
    rows = [{"id": str(i), "text": f"extract {i}", "topic": f"topic {i % 5}"} for i in range(2000)]
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        uri = _jsonl(Path(folder) / "web.jsonl", rows)
        document["spec"]["seeds"] = [
            {"name": "web", "kind": "web", "uri": uri, "idField": "id", "topicField": "topic"}
        ]
        for share in (0.0, 0.5, 1.0):
            document["spec"]["prompts"]["topicConditioning"] = share
            prompts = list(build_prompts(parse_run(document)))
            conditioned = sum(p.topic is not None for p in prompts) / len(prompts)
            assert abs(conditioned - share) < 0.05
            assert all((p.topic is not None) == ("belongs to the topic" in p.prompt) for p in prompts)


def test_audience_and_style_change_the_instructions_not_just_a_word() -> None:
    prompts = list(build_prompts(_run(variantsPerSeed=12)))
    same_seed = [p for p in prompts if p.seed_source == "math" and p.seed_id == "m-0"]
    children = next(p for p in same_seed if p.audience == "young_children")
    researchers = next(p for p in same_seed if p.audience == "researchers")
    assert "six to ten" in children.prompt and "open problems" in researchers.prompt
    wikihow = next(p for p in same_seed if p.style == "wikihow")
    assert "numbered steps" in wikihow.prompt
    assert all('"Once upon a time"' in p.prompt for p in prompts)


def test_total_limit_is_split_by_weight() -> None:
    document = small_run()
    for seed in document["spec"]["seeds"]:
        seed["uri"] = resolve_uri(seed["uri"])
    document["spec"]["seeds"][0]["weight"] = 3
    document["spec"]["prompts"].update(limit=8, variantsPerSeed=4)
    counts = collections.Counter(p.seed_source for p in build_prompts(parse_run(document)))
    assert counts == {"web": 6, "math": 2}


def test_template_override_is_used_and_versioned_by_content() -> None:
    run = _run(templates={"math": "Explain for {{ audience.label }}: {{ text }}"})
    math = [p for p in build_prompts(run) if p.seed_source == "math"]
    assert math[0].prompt.startswith("Explain for ")
    assert math[0].template_version.startswith("user-")
    web = [p for p in build_prompts(run) if p.seed_source == "web"]
    assert web[0].template_version == "1"


def test_web_prompts_carry_the_topic_of_their_cluster(tmp_path: Path) -> None:
    """`cosmo cluster` output joins web seeds by document id; conditioning follows the share."""
    from conftest import REPO
    from cosmoforge.clustering.pipeline import ClusterConfig, ClusterInput, run_clustering
    from cosmoforge.spec.model import ClusteringSpec

    corpus = REPO / "tests" / "data" / "clustering" / "subjects.jsonl"
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    subjects = {row["id"]: row["subject"] for row in rows}

    def label(messages: list[dict[str, str]]) -> str:
        # Stands in for the LLM: names the subject most of the members shown to it belong to.
        shown = messages[-1]["content"]
        counts = collections.Counter(row["subject"] for row in rows if row["text"][:40] in shown)
        return json.dumps({"topic": f"all about {counts.most_common(1)[0][0]}", "score": 8})

    config = ClusterConfig.from_spec(ClusteringSpec(clusters=4))
    out = str(tmp_path / "topics")
    run_clustering(ClusterInput(str(corpus), "text", "id"), out, config, complete=label)
    document = small_run()
    document["spec"]["seeds"] = [
        {"name": "web", "kind": "web", "uri": str(corpus), "idField": "id", "topicsUri": out}
    ]
    for share in (1.0, 0.5):
        document["spec"]["prompts"]["topicConditioning"] = share
        prompts = list(build_prompts(parse_run(document)))
        conditioned = [p for p in prompts if p.topic is not None]
        assert len(prompts) == 40
        assert all(p.topic.startswith("all about ") for p in conditioned)  # type: ignore[union-attr]
        if share == 1.0:
            assert len(conditioned) == 40
            by_subject = collections.defaultdict(set)
            for p in prompts:
                by_subject[subjects[p.seed_id]].add(p.topic)
            assert {subject: topics.pop() for subject, topics in by_subject.items() if len(topics) == 1} == {
                subject: f"all about {subject}" for subject in set(subjects.values())
            }
        else:
            assert 10 <= len(conditioned) <= 30


def _web_run(uri: str, **seed: object) -> object:
    document = small_run("identity")
    document["spec"]["seeds"] = [{"name": "web", "kind": "web", "uri": uri, **seed}]
    document["spec"]["prompts"].update(variantsPerSeed=3)
    return document


@pytest.mark.parametrize("id_field", [None, "url"])
def test_changing_one_seed_row_changes_only_that_records_prompt_ids(
    tmp_path: Path, id_field: str | None
) -> None:
    rows = [{"url": f"u{i}", "text": f"extract {i} about things", "topic": f"t{i % 3}"} for i in range(30)]
    seed = {"topicField": "topic"} | ({"idField": id_field} if id_field else {})
    before = list(build_prompts(parse_run(_web_run(_jsonl(tmp_path / "a.jsonl", rows), **seed))))
    rows[7]["text"] = "extract 7 about other things"
    after = list(build_prompts(parse_run(_web_run(_jsonl(tmp_path / "b.jsonl", rows), **seed))))
    assert len(before) == len(after) == 90
    changed = [(b, a) for b, a in zip(before, after, strict=True) if b.prompt_id != a.prompt_id]
    assert len(changed) == 3
    assert all("extract 7 about" in b.prompt and "extract 7 about other" in a.prompt for b, a in changed)
    assert {a.seed_id for _, a in changed} == ({"u7"} if id_field else {a.seed_id for _, a in changed})
    unchanged = {p.prompt_id for p in before} - {b.prompt_id for b, _ in changed}
    assert unchanged == {p.prompt_id for p in after} - {a.prompt_id for _, a in changed}


def test_prompt_ids_follow_templates_and_the_settings_that_change_a_completion(tmp_path: Path) -> None:
    def ids(**changes: object) -> dict[str, set[str]]:
        document = small_run()
        for seed in document["spec"]["seeds"]:
            seed["uri"] = resolve_uri(seed["uri"])
        for part, values in changes.items():
            document["spec"].setdefault(part, {}).update(values)  # type: ignore[union-attr]
        found: dict[str, set[str]] = collections.defaultdict(set)
        for p in build_prompts(parse_run(document)):
            found[p.seed_source].add(p.prompt_id)
        return found

    base = ids()
    template = ids(prompts={"templates": {"math": "Explain for {{ audience.label }}: {{ text }}"}})
    assert template["web"] == base["web"] and template["math"].isdisjoint(base["math"])
    for generation in ({"model": "other/model"}, {"maxNewTokens": 13}, {"sampling": {"temperature": 0.7}},
                       {"sampling": {"temperature": 0.0, "seed": 2}}):  # fmt: skip
        changed = ids(generation=generation)
        assert all(changed[s].isdisjoint(base[s]) for s in base), generation
    # Where the model runs changes no completion: resuming keeps every document.
    assert ids(generation={"concurrency": 9, "workers": 3, "shardSize": 5}) == base


def test_a_pair_named_by_the_record_is_kept(tmp_path: Path) -> None:
    rows = [
        {"seed_data": "unit one", "audience": "college_students", "format": "textbook_academic_tone"},
        {"seed_data": "unit two", "audience": "grade_school_students", "format": "blogpost"},
        {"seed_data": "unit three", "audience": "unknown_readers", "format": "wikihow"},
        {"seed_data": "unit four", "audience": None, "format": None},
    ]
    document = _web_run(
        _jsonl(tmp_path / "c.jsonl", rows),
        textField="seed_data", audienceField="audience", styleField="format",
        audienceMap={"grade_school_students": "young_children"},
        styleMap={"textbook_academic_tone": "textbook", "blogpost": "blog_post"},
    )  # fmt: skip
    prompts = list(build_prompts(parse_run(document)))
    pairs = collections.defaultdict(list)
    for p in prompts:
        pairs[p.prompt.split('"""')[1].strip() if '"""' in p.prompt else p.seed_id].append(
            (p.audience, p.style)
        )
    assert pairs["unit one"] == [("college_students", "textbook")]
    assert pairs["unit two"] == [("young_children", "blog_post")]
    # An audience the spec does not know leaves the style fixed and the audience to the record.
    assert len(pairs["unit three"]) == 1 and pairs["unit three"][0][1] == "wikihow"
    assert len(pairs["unit four"]) == 3  # nothing named: dealt from the deck as usual


def test_prompt_seeds_regenerate_a_prompt_set_with_lineage(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"Write a textbook unit on topic {i}.", "format": "textbook_academic_tone",
         "audience": "college_students", "seed_data": f"seed {i}", "text": "old", "token_length": 5}
        for i in range(5)
    ]  # fmt: skip
    rows.append({**rows[0], "prompt": ""})
    uri = str(tmp_path / "cosmopedia.parquet")
    pq.write_table(pa.Table.from_pylist(rows), uri)
    document = small_run("regen")
    document["spec"]["seeds"] = [
        {"name": "stanford", "kind": "prompt", "uri": uri, "textField": "prompt",
         "audienceField": "audience", "styleField": "format", "maxChars": 100}
    ]  # fmt: skip
    document["spec"]["prompts"]["variantsPerSeed"] = 4
    prompts = list(build_prompts(parse_run(document)))
    assert [p.prompt for p in prompts] == [f"Write a textbook unit on topic {i}." for i in range(5)]
    assert {(p.audience, p.style, p.template_id, p.seed_kind) for p in prompts} == {
        ("college_students", "textbook_academic_tone", "prompt", "prompt")
    }
    # Resumable like any run: the same ids every time, a new model gives new ones.
    ids = [p.prompt_id for p in prompts]
    assert len(set(ids)) == 5 and ids == [p.prompt_id for p in build_prompts(parse_run(document))]
    document["spec"]["generation"]["model"] = "another/model"
    assert set(ids).isdisjoint(p.prompt_id for p in build_prompts(parse_run(document)))
    # A given prompt is never cut to maxChars: a cut prompt would be another prompt.
    long = "word " * 400
    pq.write_table(pa.Table.from_pylist([{**rows[0], "prompt": long}]), uri)
    assert [p.prompt for p in build_prompts(parse_run(document))] == [long]
