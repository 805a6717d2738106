"""Topic clustering: real embeddings (the shipped all-MiniLM-L6-v2), real faiss, a real small
chat model (SmolLM2-135M on llama.cpp) behind a real HTTP server on a loopback port.

The corpus in tests/data/clustering/subjects.jsonl is ours: ten short texts on each of four
clearly different subjects, so "documents on different subjects land in different clusters" is
a fact the test can check. Labelling goes through the embedded model server with the label
schema as structured output, so every cluster gets a topic and a score (the words a 135M model
picks are not asserted); a plain HTTP server over the same model, which ignores or refuses the
structured-output field, pins parsing, retries, the fallback and the shape of what is recorded.
"""

from __future__ import annotations

import argparse
import collections
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cosmoforge.clustering.embed import (
    DEFAULT_MODEL,
    EmbeddingCache,
    batch_key,
    embed_batch,
    load_embedder,
    normalize_rows,
    shipped_model_path,
)
from cosmoforge.clustering.kmeans import (
    BottomKSample,
    ClusteringInputError,
    MembersSample,
    effective_k,
    fit_centroids,
    hash_keys,
    smooth_by_neighbours,
)
from cosmoforge.clustering.label import (
    LABEL_SCHEMA,
    ChatClient,
    EndpointError,
    LabelParseError,
    LabelResult,
    build_messages,
    chat_url,
    excluded_by,
    keep_decision,
    label_cluster,
    parse_label,
    refuses_structured_output,
    response_format,
)
from cosmoforge.clustering.pipeline import (
    ClusterConfig,
    ClusterInput,
    document_topics,
    read_assignments,
    read_topics,
    run_clustering,
)
from cosmoforge.prompts.seeds import record_hash

CORPUS = Path(__file__).parents[1] / "data" / "clustering" / "subjects.jsonl"
SUBJECTS = ("astronomy", "baking", "football", "medicine")


def corpus_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines()]


@pytest.fixture(scope="module")
def embedder() -> Any:
    return load_embedder(DEFAULT_MODEL)


def assignments(out: Path) -> pa.Table:
    return pa.concat_tables(list(read_assignments(str(out))))


def subject_clusters(table: pa.Table) -> dict[str, collections.Counter[int]]:
    by_subject: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for doc_id, cluster in zip(table["id"].to_pylist(), table["cluster_id"].to_pylist(), strict=True):
        by_subject[doc_id.split("-")[0]][cluster] += 1
    return by_subject


def assert_subjects_separated(table: pa.Table) -> None:
    by_subject = subject_clusters(table)
    majority = {subject: counts.most_common(1)[0] for subject, counts in by_subject.items()}
    assert sorted(by_subject) == sorted(SUBJECTS)
    # Every subject has its own cluster, and (almost) all of its documents are in it.
    assert len({cluster for cluster, _ in majority.values()}) == len(SUBJECTS), by_subject
    purity = sum(count for _, count in majority.values()) / table.num_rows
    assert purity >= 0.9, by_subject


# --- parsing and the keep rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "topic", "score"),
    [
        ('{"topic": "Astronomy", "educational_score": 8}', "Astronomy", 8.0),
        ('```json\n{"topic": "Bread baking", "educational_score": "7"}\n```\n', "Bread baking", 7.0),
        ('Sure! Here it is: {"Topic": "Football", "Score": 3} Hope this helps.', "Football", 3.0),
        ("Topic: Cardiology\nEducational score: 7/10", "Cardiology", 7.0),
        ("**Topic:** Home gardening\n**Score:** 85/100", "Home gardening", 8.5),
        ('{"topic": "Astronomy", "educational_score": 8', "Astronomy", 8.0),  # cut off mid-object
        ('{"label": "Space science", "rating": 6.5}', "Space science", 6.5),
        ('{"topic": "Bread", "educational_score": "8 out of 10"}', "Bread", 8.0),
        ('{"topic": "\\"Cooking\\".", "educational_score": 0}', "Cooking", 0.0),
    ],
)
def test_parse_label_reads_loose_answers(answer: str, topic: str, score: float) -> None:
    label = parse_label(answer)
    assert (label.topic, label.score) == (topic, score)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("", "empty answer"),
        ("I cannot help with that.", "no topic"),
        ('{"topic": "Astronomy"}', "no educational score"),
        ('{"topic": "", "educational_score": 5}', "empty topic"),
        ('{"topic": "...", "score": 5}', "empty topic"),
        ('{"topic": "Astronomy", "educational_score": 14}', "outside 0-10"),
    ],
)
def test_parse_label_rejects_unusable_answers(answer: str, reason: str) -> None:
    with pytest.raises(LabelParseError, match=reason):
        parse_label(answer)


def test_a_malformed_answer_is_sent_back_with_a_reminder() -> None:
    # A scripted conversation, to pin the retry policy; the real model is exercised below.
    answers = iter(["I think these are about space.", '{"topic": "Astronomy", "educational_score": 9}'])
    seen: list[list[dict[str, str]]] = []

    def complete(messages: list[dict[str, str]]) -> str:
        seen.append(messages)
        return next(answers)

    result = label_cluster(["Jupiter is a gas giant."], complete, attempts=3, wait_seconds=0)
    assert (result.topic, result.score, result.attempts, result.error) == ("Astronomy", 9.0, 2, None)
    base = len(build_messages(["Jupiter is a gas giant."]))
    assert len(seen[0]) == base and len(seen[1]) == base + 2 and seen[1][:base] == seen[0]
    assert seen[1][base] == {"role": "assistant", "content": "I think these are about space."}
    assert "could not be read (no topic)" in seen[1][base + 1]["content"]


def test_the_prompt_shows_worked_examples_before_the_cluster() -> None:
    messages = build_messages(["Jupiter is a gas giant.", "x" * 900], max_chars=100)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    for answer in (messages[2], messages[4]):
        example = json.loads(answer["content"])
        assert set(example) == {"topic", "educational_score"}
        assert 0 <= example["educational_score"] <= 10
    last = messages[-1]["content"]
    assert "Extract 1: Jupiter is a gas giant." in last and "Extract 2: " + "x" * 99 + "…\n" in last


def test_structured_output_is_spelled_for_the_engine() -> None:
    assert response_format("tgi") == {"type": "json_object", "value": LABEL_SCHEMA}
    assert response_format("embedded") == {"type": "json_object", "value": LABEL_SCHEMA}
    for engine in ("openai", "vllm"):
        assert response_format(engine) == {
            "type": "json_schema",
            "json_schema": {"name": "cluster_label", "schema": LABEL_SCHEMA, "strict": True},
        }
    assert LABEL_SCHEMA["required"] == ["topic", "educational_score"]
    assert LABEL_SCHEMA["additionalProperties"] is False
    # Refusals of the field (TGI without grammar support, OpenAI's schema check) versus others.
    assert refuses_structured_output(422, '{"error":"Input validation error: grammar is not supported"}')
    assert refuses_structured_output(400, "Invalid schema for response_format 'cluster_label'")
    assert not refuses_structured_output(422, "Input validation error: inputs tokens must be <= 2048")
    assert not refuses_structured_output(404, "no route response_format")
    assert not refuses_structured_output(500, "grammar compilation crashed")


def test_keep_rule() -> None:
    exclude = ("explicit adult content", "celebrity gossip", "obituaries")
    assert excluded_by("Celebrity News and Gossip", exclude) == "celebrity gossip"
    assert excluded_by("Local obituary notices", exclude) == "obituaries"
    assert excluded_by("Adult education", exclude) is None
    assert keep_decision(LabelResult("Astronomy", 8, 1), 3, exclude) == (True, None)
    assert keep_decision(LabelResult("Astronomy", 2, 1), 3, exclude) == (False, "score 2 < 3")
    assert keep_decision(LabelResult("Celebrity gossip", 6, 1), 3, exclude) == (
        False,
        "excluded topic 'celebrity gossip'",
    )
    assert keep_decision(LabelResult(None, None, 3, "LabelParseError: no topic"), 3, exclude) == (
        False,
        "label failed",
    )
    assert keep_decision(None, 3, exclude) == (True, None)  # unlabelled runs keep everything


def test_chat_url_accepts_either_kind_of_base() -> None:
    assert chat_url("http://tgi:8080") == "http://tgi:8080/v1/chat/completions"
    assert chat_url("http://tgi:8080/") == "http://tgi:8080/v1/chat/completions"
    assert chat_url("https://api.example/v1") == "https://api.example/v1/chat/completions"
    assert chat_url("http://x/v1/chat/completions") == "http://x/v1/chat/completions"


# --- sampling and k-means ----------------------------------------------------------------------------


def test_samples_do_not_depend_on_how_the_stream_is_batched() -> None:
    rows = np.arange(1000, dtype=np.float32)[:, None] * np.ones((1, 3), dtype=np.float32)
    keys = hash_keys(np.arange(1000), seed=5)
    samples = []
    for size in (1000, 7, 128):
        sample = BottomKSample(50)
        members = MembersSample(3)
        for start in range(0, 1000, size):
            sample.add(keys[start : start + size], rows[start : start + size])
            members.add(
                keys[start : start + size],
                np.arange(start, min(start + size, 1000)) % 4,
                [str(i) for i in range(start, min(start + size, 1000))],
                ["t"] * len(keys[start : start + size]),
            )
        samples.append((sample.sorted_rows()[:, 0].tolist(), [members.members(c) for c in range(4)]))
    assert samples[0] == samples[1] == samples[2]
    assert len(samples[0][0]) == 50 and all(len(m) == 3 for m in samples[0][1])
    assert not np.array_equal(hash_keys(np.arange(10), 1), hash_keys(np.arange(10), 2))


@pytest.mark.parametrize("count", [300, 21_000])  # exact search, then the inverted-file index
def test_neighbour_smoothing_pulls_documents_towards_their_group(count: int) -> None:
    rng = np.random.default_rng(0)
    centres = normalize_rows(rng.standard_normal((3, 32)))
    groups = np.arange(count) % 3
    vectors = normalize_rows(centres[groups] + 0.15 * rng.standard_normal((count, 32)))
    smoothed = smooth_by_neighbours(vectors, 5)
    assert smoothed.shape == vectors.shape
    assert np.allclose(np.linalg.norm(smoothed, axis=1), 1.0, atol=1e-5)
    before = np.einsum("ij,ij->i", vectors, centres[groups]).mean()
    after = np.einsum("ij,ij->i", smoothed, centres[groups]).mean()
    assert after > before + 0.05
    assert np.array_equal(smooth_by_neighbours(vectors[:5], 5), vectors[:5])  # too few to smooth


def test_k_never_exceeds_the_distinct_documents() -> None:
    vectors = np.eye(3, 8, dtype=np.float32)
    assert effective_k(145, np.concatenate([vectors, vectors])) == 3
    assert effective_k(2, vectors) == 2
    with pytest.raises(ClusteringInputError):
        effective_k(5, np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(ClusteringInputError, match="3 documents cannot make 5 clusters"):
        fit_centroids(vectors, 5, seed=0)


# --- the stage over a real corpus -----------------------------------------------------------------------


def test_the_default_model_ships_in_a_package(embedder: Any) -> None:
    assert shipped_model_path(DEFAULT_MODEL) is not None
    assert shipped_model_path("all-MiniLM-L6-v2") == shipped_model_path(DEFAULT_MODEL)
    vectors = embedder.encode(
        ["The striker scored a goal.", "The goalkeeper saved a penalty.", "Bake bread."]
    )
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_a_model2vec_static_model_loads_by_name(tmp_path: Path) -> None:
    model2vec = pytest.importorskip("model2vec")
    from tokenizers import Tokenizer

    # A static model over the shipped MiniLM vocabulary with seeded vectors: real model2vec code,
    # no download and no distillation (which takes minutes here).
    path = shipped_model_path(DEFAULT_MODEL)
    assert path is not None
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    vectors = np.random.default_rng(0).standard_normal((tokenizer.get_vocab_size(), 16)).astype(np.float32)
    model2vec.StaticModel(vectors, tokenizer).save_pretrained(str(tmp_path / "static"))
    static = load_embedder(f"model2vec:{tmp_path / 'static'}")
    encoded = static.encode(["bread dough", "bread dough", "a comet's tail"])
    assert static.dim == 16 and encoded.shape == (3, 16)
    assert np.allclose(np.linalg.norm(encoded, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(encoded[0], encoded[1]) and not np.allclose(encoded[0], encoded[2])
    assert static.name == f"model2vec:{tmp_path / 'static'}"


def test_subjects_land_in_different_clusters(tmp_path: Path, embedder: Any) -> None:
    out = tmp_path / "topics"
    summary = run_clustering(
        ClusterInput(str(CORPUS), id_field="id"), str(out), ClusterConfig(clusters=4), embedder=embedder
    )
    assert (summary.documents, summary.clusters, summary.skipped_empty) == (40, 4, 0)
    table = assignments(out)
    assert table.column_names == ["id", "cluster_id", "distance"]
    assert sorted(table["id"].to_pylist()) == sorted(row["id"] for row in corpus_rows())
    assert all(0.0 <= d <= 1.0 for d in table["distance"].to_pylist())
    assert_subjects_separated(table)

    topics = read_topics(str(out))
    assert topics["cluster_id"].to_pylist() == [0, 1, 2, 3]
    assert sum(topics["size"].to_pylist()) == 40
    assert all(topics["kept"].to_pylist())  # not labelled: nothing to judge by
    for cluster, examples in zip(
        topics["cluster_id"].to_pylist(), topics["example_ids"].to_pylist(), strict=True
    ):
        members = set(table.filter(pc.equal(table["cluster_id"], cluster))["id"].to_pylist())
        assert examples and set(examples) <= members and len(examples) <= 10
    assert (out / "clusters.png").read_bytes().startswith(b"\x89PNG")
    assert "<svg" in (out / "clusters.html").read_text() or "plotly" in (out / "clusters.html").read_text()
    assert "4 of 4 clusters kept, 40 of 40 documents" in (out / "topics.md").read_text()
    assert np.load(out / "centroids.npy").shape == (4, 384)
    assert json.loads((out / "summary.json").read_text())["documents"] == 40


def test_rerun_with_the_same_seed_reads_the_cache_and_gives_the_same_clusters(
    tmp_path: Path, embedder: Any
) -> None:
    data = ClusterInput(str(CORPUS), id_field="id")
    config = ClusterConfig(clusters=4, read_batch=16)
    cache = str(tmp_path / "cache")
    first = run_clustering(data, str(tmp_path / "a"), config, embedder=embedder, cache_uri=cache)
    second = run_clustering(data, str(tmp_path / "b"), config, embedder=embedder, cache_uri=cache)
    assert (first.embedded_batches, second.embedded_batches, second.cached_batches) == (3, 0, 6)
    assert assignments(tmp_path / "a").equals(assignments(tmp_path / "b"))
    assert read_topics(str(tmp_path / "a")).equals(read_topics(str(tmp_path / "b")))

    other = run_clustering(
        data,
        str(tmp_path / "c"),
        ClusterConfig(clusters=4, read_batch=16, seed=7),
        embedder=embedder,
        cache_uri=cache,
    )
    assert other.embedded_batches == 0
    assert_subjects_separated(assignments(tmp_path / "c"))


def test_outputs_and_cache_go_to_object_storage(s3_bucket: str, embedder: Any) -> None:
    out = f"s3://{s3_bucket}/run/topics"
    data = ClusterInput(str(CORPUS), id_field="id")
    first = run_clustering(data, out, ClusterConfig(clusters=4, read_batch=20), embedder=embedder)
    second = run_clustering(data, out, ClusterConfig(clusters=4, read_batch=20), embedder=embedder)
    assert (first.embedded_batches, second.embedded_batches, second.cached_batches) == (2, 0, 4)
    assert read_topics(out).num_rows == 4
    assert_subjects_separated(pa.concat_tables(list(read_assignments(out))))
    assert first.outputs["map"] == f"{out}/clusters.png"


def test_embedding_cache_is_keyed_by_model_and_texts(tmp_path: Path, embedder: Any) -> None:
    cache = EmbeddingCache.open(str(tmp_path / "cache"))
    vectors = embed_batch(embedder, ["one text", "another"], cache)
    assert (cache.misses, cache.hits) == (1, 0)
    assert np.array_equal(embed_batch(embedder, ["one text", "another"], cache), vectors)
    assert (cache.misses, cache.hits) == (1, 1)
    assert batch_key("model-a", ["x"]) != batch_key("model-b", ["x"]) != batch_key("model-a", ["y"])
    # A torn file is not trusted: the batch is embedded again.
    (path,) = (tmp_path / "cache").rglob("*.npy")
    path.write_bytes(b"not numpy")
    assert np.array_equal(embed_batch(embedder, ["one text", "another"], cache), vectors)
    assert cache.misses == 2


def test_parquet_input_keeps_its_id_column_and_skips_empty_texts(tmp_path: Path, embedder: Any) -> None:
    blanks: list[dict[str, Any]] = [{"id": "blank-1", "text": "   "}, {"id": "blank-2", "text": None}]
    rows: list[dict[str, Any]] = [*corpus_rows()[:12], *blanks]
    source = tmp_path / "web.parquet"
    pq.write_table(pa.Table.from_pylist([{"url": r["id"], "content": r["text"]} for r in rows]), source)
    out = tmp_path / "out"
    summary = run_clustering(
        ClusterInput(str(source), text_field="content", id_field="url"),
        str(out),
        ClusterConfig(clusters=2, read_batch=5),
        embedder=embedder,
    )
    assert (summary.documents, summary.skipped_empty) == (12, 2)
    table = assignments(out)
    assert table.column_names == ["url", "cluster_id", "distance"]
    assert table["url"].to_pylist() == [r["id"] for r in rows[:12]]  # file order, shard by shard
    assert len(list((out / "assignments").glob("part-*.parquet"))) == 3
    assert document_topics(str(out)) == {}  # nothing labelled, so no topic to condition on


def test_fewer_documents_than_clusters_lowers_k(tmp_path: Path, embedder: Any) -> None:
    source = tmp_path / "few.jsonl"
    source.write_text("".join(json.dumps({"text": row["text"]}) + "\n" for row in corpus_rows()[::10]))
    with pytest.warns(UserWarning, match="only 4 distinct documents in the sample for 145 clusters"):
        summary = run_clustering(
            ClusterInput(str(source)), str(tmp_path / "out"), ClusterConfig(), embedder=embedder
        )
    assert summary.clusters == 4
    table = assignments(tmp_path / "out")
    # Without an id column a document's id is the hash of its record (cosmoforge.prompts.seeds).
    ids = [record_hash({"text": row["text"]}) for row in corpus_rows()[::10]]
    assert table.column_names[0] == "row" and table["row"].to_pylist() == ids
    assert sorted(table["cluster_id"].to_pylist()) == [0, 1, 2, 3]


def test_duplicate_documents_make_one_cluster(tmp_path: Path, embedder: Any) -> None:
    source = tmp_path / "same.jsonl"
    source.write_text((json.dumps({"text": "The same page, copied."}) + "\n") * 5)
    with pytest.warns(UserWarning, match="using k=1"):
        summary = run_clustering(
            ClusterInput(str(source)), str(tmp_path / "out"), ClusterConfig(clusters=3), embedder=embedder
        )
    assert summary.clusters == 1 and summary.documents == 5


@pytest.mark.parametrize(
    ("content", "field", "message"),
    [
        ("", "text", "no document has text in field 'text'"),
        ('{"text": ""}\n{"text": "  "}\n', "text", r"no document has text .*\(2 rows with empty text\)"),
        ('{"body": "words"}\n', "text", "field 'text' missing"),
        ("{not json\n", "text", "invalid JSON"),
    ],
)
def test_bad_input_is_a_clear_error(
    tmp_path: Path, embedder: Any, content: str, field: str, message: str
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text(content)
    with pytest.raises(ClusteringInputError, match=message):
        run_clustering(
            ClusterInput(str(source), text_field=field),
            str(tmp_path / "out"),
            ClusterConfig(),
            embedder=embedder,
        )


def test_missing_input_is_a_clear_error(tmp_path: Path, embedder: Any) -> None:
    with pytest.raises(ClusteringInputError, match="no such file"):
        run_clustering(
            ClusterInput(str(tmp_path / "nope.jsonl")),
            str(tmp_path / "out"),
            ClusterConfig(),
            embedder=embedder,
        )


# --- labelling against a real model over HTTP ------------------------------------------------------------


class ChatServer:
    """SmolLM2-135M (llama.cpp) answering OpenAI-style chat completions on a loopback port.

    A server without structured output: it ignores `response_format`, or refuses it with TGI's
    422 when `refuse_structured` is set. `faults` holds HTTP statuses to answer the next
    requests with, to exercise the client's handling of a server that is briefly unhealthy.
    """

    def __init__(self) -> None:
        from llama_cpp import Llama

        from cosmoforge.services.modelserver.llama import embedded_model_path

        self.llama = Llama(model_path=str(embedded_model_path()), n_ctx=2048, n_threads=2, verbose=False)
        self.lock = threading.Lock()
        self.faults: collections.deque[int] = collections.deque()
        self.requests: list[dict[str, Any]] = []
        self.refuse_structured = False  # answer 422 to response_format, as TGI without grammars
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if self.path != "/v1/chat/completions":
                    return self.reply(404, {"error": f"no route {self.path}"})
                if server.faults:
                    return self.reply(server.faults.popleft(), {"error": "injected"})
                if server.refuse_structured and "response_format" in body:
                    # What TGI answers when started with --disable-grammar-support.
                    error = {
                        "error": "Input validation error: grammar is not supported",
                        "error_type": "validation",
                    }
                    return self.reply(422, error)
                with server.lock:
                    result = server.llama.create_chat_completion(
                        messages=body["messages"],
                        max_tokens=body.get("max_tokens", 32),
                        temperature=body.get("temperature", 0.0),
                        seed=body.get("seed", 0),
                    )
                self.reply(200, dict(result))  # type: ignore[arg-type]  # not streaming: one response

            def reply(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture(scope="module")
def chat_server() -> Iterator[ChatServer]:
    pytest.importorskip("llama_cpp")
    server = ChatServer()
    yield server
    server.close()


@pytest.fixture
def server(chat_server: ChatServer) -> ChatServer:
    chat_server.faults.clear()
    chat_server.requests.clear()
    chat_server.refuse_structured = False
    return chat_server


EXTRACTS = [row["text"] for row in corpus_rows() if row["id"].startswith("astronomy")][:3]


def test_answers_that_never_parse_are_retried_then_recorded(server: ChatServer) -> None:
    client = ChatClient(server.url, max_tokens=1)  # one token can never hold a topic and a score
    result = label_cluster(EXTRACTS, client, attempts=3, max_chars=120, wait_seconds=0)
    assert not result.ok and result.attempts == 3 and len(server.requests) == 3
    assert result.error is not None and result.error.startswith("LabelParseError")
    assert result.raw is not None  # the last answer is kept for inspection
    base = len(build_messages(EXTRACTS))
    assert [len(request["messages"]) for request in server.requests] == [base, base + 2, base + 2]
    assert all(request["max_tokens"] == 1 and request["seed"] == 42 for request in server.requests)
    assert all(request["response_format"] == response_format("tgi") for request in server.requests)


def test_server_errors_are_retried(server: ChatServer) -> None:
    server.faults.extend([503, 429])
    result = label_cluster(
        EXTRACTS, ChatClient(server.url, max_tokens=24), attempts=3, max_chars=120, wait_seconds=0
    )
    assert len(server.requests) == 3 and result.attempts == 3
    # The third request reached the model; whatever it said was parsed or recorded, not raised.
    assert result.ok or (result.error is not None and result.error.startswith("LabelParseError"))


def test_server_errors_that_do_not_pass_are_recorded(server: ChatServer) -> None:
    server.faults.extend([500, 500])
    result = label_cluster(EXTRACTS, ChatClient(server.url), attempts=2, wait_seconds=0)
    assert not result.ok and result.attempts == 2
    assert result.error is not None and result.error.startswith("EndpointBusy") and "HTTP 500" in result.error


def test_a_server_that_refuses_structured_output_gets_the_prompt_alone(server: ChatServer) -> None:
    server.refuse_structured = True
    client = ChatClient(server.url, engine="openai", model="smollm2", max_tokens=32)
    assert client.output_format == "json_schema"
    first = label_cluster(EXTRACTS, client, attempts=1, max_chars=120, wait_seconds=0)
    # Refused, asked again at once without the field: still one attempt, answered by the model.
    assert len(server.requests) == 2 and first.attempts == 1
    assert server.requests[0]["response_format"]["type"] == "json_schema"
    assert "response_format" not in server.requests[1]
    assert server.requests[0]["messages"] == server.requests[1]["messages"]
    assert first.ok or (first.error is not None and first.error.startswith("LabelParseError"))
    # Remembered: the next cluster is asked without the field straight away.
    label_cluster(EXTRACTS[:1], client, attempts=1, max_chars=120, wait_seconds=0)
    assert len(server.requests) == 3 and "response_format" not in server.requests[2]
    assert client.output_format.startswith("prompt (structured output refused: HTTP 422")
    assert client.structured_fallback is not None and "grammar is not supported" in client.structured_fallback


def test_a_refusal_that_is_not_about_structured_output_still_stops(server: ChatServer) -> None:
    server.faults.append(422)  # {"error": "injected"}: nothing about the field
    with pytest.raises(EndpointError, match="HTTP 422"):
        label_cluster(EXTRACTS, ChatClient(server.url), attempts=3, wait_seconds=0)
    assert len(server.requests) == 1


def test_a_wrong_endpoint_stops_labelling(server: ChatServer) -> None:
    with pytest.raises(EndpointError, match="HTTP 404"):
        label_cluster(EXTRACTS, ChatClient(server.url + "/wrong"), attempts=3, wait_seconds=0)
    assert len(server.requests) == 1  # not retried: it would fail the same way


def test_labelled_run_records_a_label_or_a_failure_per_cluster(
    tmp_path: Path, embedder: Any, server: ChatServer
) -> None:
    config = ClusterConfig(
        clusters=4,
        samples_per_label=2,
        label_chars=120,
        label_attempts=2,
        label_wait_seconds=0,
        min_educational_score=5,
    )
    client = ChatClient(server.url, max_tokens=32)
    summary = run_clustering(
        ClusterInput(str(CORPUS), id_field="id"),
        str(tmp_path / "out"),
        config,
        embedder=embedder,
        complete=client,
    )
    topics = read_topics(str(tmp_path / "out")).to_pylist()
    assert len(topics) == 4 and summary.labelled + summary.label_failures == 4
    assert 4 <= len(server.requests) <= 8
    for row in topics:
        assert 1 <= row["label_attempts"] <= 2 and len(row["example_ids"]) == 2
        if row["label"] is None:
            assert row["label_error"] and row["kept"] is False and row["reason"] == "label failed"
        else:
            assert 0 <= row["score"] <= 10 and row["label_error"] is None
            result = LabelResult(row["label"], row["score"], row["label_attempts"])
            assert (row["kept"], row["reason"]) == keep_decision(result, 5, config.exclude_topics)
    labels = {row["cluster_id"]: row["label"] for row in topics if row["kept"]}
    mapping = document_topics(str(tmp_path / "out"))
    named = {doc: label for doc, label in mapping.items() if label is not None}
    assert set(named.values()) <= set(labels.values())
    assert len(named) == sum(row["size"] for row in topics if row["kept"])
    # Documents of the dropped clusters are there too, marked None: they seed no prompt.
    assert len(mapping) - len(named) == sum(row["size"] for row in topics if not row["kept"])
    assert summary.label_output == "json_schema"  # asked for; this server ignored it


def test_structured_output_through_the_embedded_server_labels_every_cluster(
    tmp_path: Path, embedder: Any, model_server: str
) -> None:
    client = ChatClient(model_server)
    config = ClusterConfig(clusters=4, label_wait_seconds=0, min_educational_score=0)
    summary = run_clustering(
        ClusterInput(str(CORPUS), id_field="id"),
        str(tmp_path / "out"),
        config,
        embedder=embedder,
        complete=client,
    )
    client.close()
    topics = read_topics(str(tmp_path / "out")).to_pylist()
    assert (summary.labelled, summary.label_failures, summary.label_output) == (4, 0, "json_schema")
    for row in topics:
        assert row["label_error"] is None and row["kept"], row
        assert 3 <= len(row["label"]) <= 60 and row["label"] == row["label"].strip()
        assert row["score"] in set(range(11))  # an integer on the scale, as the schema says
        assert row["label_attempts"] == 1  # constrained decoding: the first answer parses
    assert len(document_topics(str(tmp_path / "out"))) == 40


# --- the command line --------------------------------------------------------------------------------------


def cosmo_cluster(argv: list[str]) -> int:
    from cosmoforge.cli import cluster as commands_cluster

    parser = argparse.ArgumentParser(prog="cosmo")
    commands_cluster.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cluster", *argv])
    return int(args.func(args))


def test_cli_clusters_a_file(tmp_path: Path, embedder: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = cosmo_cluster(
        [
            str(CORPUS),
            "--out",
            str(out),
            "--clusters",
            "4",
            "--id-field",
            "id",
            "--no-label",
            "--restarts",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "40 documents (0 empty skipped) -> 4 clusters" in capsys.readouterr().out
    assert_subjects_separated(assignments(out))
    for name in ("topics.parquet", "topics.md", "clusters.png", "clusters.html", "summary.json"):
        assert (out / name).exists(), name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--clusters", "4"], "labelling needs --endpoint"),
        (["--no-label", "--text-field", "body"], "field 'body' missing"),
        (["--endpoint", "http://127.0.0.1:9", "--engine", "openai"], "--engine openai needs --model"),
        (["--no-label", "--embedding-model", "model2vec:no/such-model"], "cannot load embedding model"),
        (["--no-label", "--restarts", "0"], "--restarts must be at least 1"),
    ],
)
def test_cli_reports_bad_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cosmo_cluster([str(CORPUS), "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err


# --- the k-means fit (cosmoforge/clustering/kmeans.py): smoothing, seeding, bad vectors ---------------------


def separated_subjects(
    subjects: int, per_subject: int, *, seed: int = 0, dim: int = 48
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around `subjects` random directions (cosine about 0.9 to their own, about 0
    to the others), and the subject of each: clusters no reasonable fit may mix."""
    rng = np.random.default_rng(seed)
    centres = normalize_rows(rng.standard_normal((subjects, dim)))
    truth = np.repeat(np.arange(subjects), per_subject)
    noise = 0.5 * rng.standard_normal((len(truth), dim)) / np.sqrt(dim)
    return normalize_rows(centres[truth] + noise), truth


def one_cluster_per_subject(clusters: np.ndarray, truth: np.ndarray) -> bool:
    subjects = int(truth.max() + 1)
    per_subject = [set(clusters[truth == subject].tolist()) for subject in range(subjects)]
    return all(len(found) == 1 for found in per_subject) and len(set(clusters.tolist())) == subjects


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize(
    ("subjects", "per_subject"),
    [(12, 50), (30, 20), (4, 5), (8, 5), (8, 10)],  # smoothed, then too small to smooth
)
def test_the_fit_puts_separated_subjects_in_different_clusters(
    seed: int, subjects: int, per_subject: int
) -> None:
    from cosmoforge.clustering.kmeans import Assigner, fit_topic_centroids

    vectors, truth = separated_subjects(subjects, per_subject, seed=seed)
    centroids = fit_topic_centroids(vectors, subjects, seed)
    assert centroids.shape == (subjects, vectors.shape[1]) and centroids.dtype == np.float32
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    clusters, _ = Assigner(centroids).assign(vectors)
    assert one_cluster_per_subject(clusters, truth)


def test_the_fit_is_the_same_for_a_seed() -> None:
    from cosmoforge.clustering.kmeans import fit_topic_centroids

    rng = np.random.default_rng(3)
    vectors = normalize_rows(rng.standard_normal((900, 32)))  # no structure: many near-ties
    for k in (5, 40):  # smoothed (900 >= 16 * 40), and with smoothing off
        first = fit_topic_centroids(vectors, k, seed=11)
        assert np.array_equal(first, fit_topic_centroids(vectors, k, seed=11))
        assert np.array_equal(first, fit_topic_centroids(vectors.copy(order="F"), k, seed=11))
    small = vectors[:60]
    assert np.array_equal(fit_topic_centroids(small, 6, seed=2), fit_topic_centroids(small, 6, seed=2))


def test_smoothing_keeps_only_mutual_neighbours() -> None:
    from cosmoforge.clustering.kmeans import neighbour_graph

    # Five points on a circle; each one's nearest: 0->1, 1->0, 2->1, 3->2, 4->3. Only 0 and 1
    # choose each other, so the only link besides the self-loops is 0-1.
    angles = np.array([0.0, 0.1, 0.25, 0.45, 1.5])
    points = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    graph = neighbour_graph(points, 1).toarray()
    expected = np.eye(5, dtype=np.float32)
    expected[0, 1] = expected[1, 0] = 1.0
    assert np.array_equal(graph, expected)

    vectors, truth = separated_subjects(3, 40)
    graph = neighbour_graph(vectors, 15).tocoo()
    assert (graph != graph.T).nnz == 0
    assert np.array_equal(truth[graph.row], truth[graph.col])  # no link between subjects


def test_seeding_reports_the_cost_of_its_start() -> None:
    from cosmoforge.clustering.kmeans import Assigner, kmeans_plus_plus, seed_centroids

    vectors, _ = separated_subjects(5, 30)
    for trials in (1, 3):
        centroids, cost = seed_centroids(vectors, 5, seed=4, trials=trials)
        similarity = float(Assigner(centroids).similarity(vectors).sum())
        assert cost == pytest.approx(2.0 * (len(vectors) - similarity), rel=1e-4)
    assert np.array_equal(kmeans_plus_plus(vectors, 5, 4), seed_centroids(vectors, 5, 4)[0])


@pytest.mark.parametrize(
    ("vectors", "k", "message"),
    [
        (np.zeros((0, 8), dtype=np.float32), 2, "no documents to cluster"),
        (np.ones(8, dtype=np.float32), 1, "2-D matrix"),
        (np.ones((4, 0), dtype=np.float32), 1, "2-D matrix"),
        (np.array([[1.0, np.nan], [0.0, 1.0]], dtype=np.float32), 1, "NaN or infinite"),
        (np.array([[1.0, np.inf], [0.0, 1.0]], dtype=np.float32), 1, "NaN or infinite"),
        (np.array([["a", "b"], ["c", "d"]]), 1, "not a numeric matrix"),
        (np.eye(3, 8, dtype=np.float32), 5, "3 documents cannot make 5 clusters"),
        (np.eye(3, 8, dtype=np.float32), 0, "cannot make 0 clusters"),
    ],
)
def test_bad_vectors_are_a_clear_error_not_a_faiss_crash(vectors: Any, k: int, message: str) -> None:
    from cosmoforge.clustering.kmeans import fit_centroids, fit_topic_centroids

    with pytest.raises(ClusteringInputError, match=message):
        fit_topic_centroids(vectors, k, seed=0)
    with pytest.raises(ClusteringInputError, match=message):
        fit_centroids(vectors, k, seed=0)


def test_a_ragged_sample_is_a_clear_error() -> None:
    from cosmoforge.clustering.kmeans import fit_topic_centroids

    with pytest.raises(ClusteringInputError, match="not a numeric matrix"):
        fit_topic_centroids([[1.0, 0.0], [1.0]], 1, seed=0)  # type: ignore[arg-type]


def test_documents_of_dropped_clusters_seed_no_prompt_unless_kept() -> None:
    from cosmoforge.prompts.builder import with_topics
    from cosmoforge.prompts.seeds import SeedRecord

    records = [SeedRecord("web", "web", doc, f"text {doc}") for doc in ("a", "b", "c", "d")]
    records[3] = SeedRecord("web", "web", "d", "text d", topic="its own")
    topics = {"a": "Astronomy", "b": None, "d": None}  # b and d in dropped clusters; c unassigned

    kept = list(with_topics(iter(records), topics))
    assert [(r.id, r.topic) for r in kept] == [("a", "Astronomy"), ("c", None), ("d", "its own")]
    every = list(with_topics(iter(records), topics, keep_dropped=True))
    assert [(r.id, r.topic) for r in every] == [
        ("a", "Astronomy"),
        ("b", None),
        ("c", None),
        ("d", "its own"),
    ]
