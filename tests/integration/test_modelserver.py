"""The model server speaks TGI's and OpenAI's APIs to their own clients, over either engine.

Every test that takes `model_server` runs against SmolLM2 decoded with continuous batching
(`--parallel 4`) and one request at a time (`--parallel 1`). Constrained decoding included: a
JSON schema in TGI's `grammar` or in `response_format` (TGI's and OpenAI's spellings) gives an
answer that parses and validates, and a schema the server cannot honour is a 422, as TGI
answers. The canned engine (the fake server of the load tests) runs behind the same app.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import NotFoundError, OpenAI, UnprocessableEntityError
from text_generation import AsyncClient, Client
from text_generation.errors import ValidationError
from text_generation.types import Grammar, GrammarType, Message

from cosmoforge.generation.inference import InferenceError, TGIBackend, classify
from cosmoforge.services.modelserver.background import BackgroundServer
from cosmoforge.services.modelserver.canned import Behaviour, FakeServer
from cosmoforge.services.modelserver.decoding import TextStream
from cosmoforge.services.modelserver.engine import ContextTooLong, GrammarError, Job, SamplingParams, room_for
from cosmoforge.services.modelserver.grammar import (
    grammar_for_schema,
    schema_from_grammar,
    schema_from_response_format,
)
from cosmoforge.services.modelserver.llama import EMBEDDED_MODEL_ID
from cosmoforge.services.modelserver.serve import llama_engine
from cosmoforge.spec.model import Engine, GenerationSpec


@pytest.fixture(scope="module", params=[4, 1], ids=["batched", "sequential"])
def model_server(request: pytest.FixtureRequest) -> Iterator[str]:
    pytest.importorskip("llama_cpp")
    with BackgroundServer(llama_engine(parallel=request.param)) as server:
        yield server.url


def test_health_and_info(model_server: str) -> None:
    assert httpx.get(f"{model_server}/health").status_code == 200
    info = httpx.get(f"{model_server}/info").json()
    assert info["model_id"] == EMBEDDED_MODEL_ID
    assert info["max_total_tokens"] == 2048


def test_tgi_client_generate_and_stream(model_server: str) -> None:
    client = Client(model_server, timeout=60)
    response = client.generate("The capital of France is", max_new_tokens=8, seed=1)
    assert response.generated_text.strip()
    assert response.details.generated_tokens <= 8
    assert response.details.finish_reason.value in ("length", "eos_token")
    streamed = list(client.generate_stream("The capital of France is", max_new_tokens=8, seed=1))
    assert streamed[-1].generated_text == "".join(r.token.text for r in streamed[:-1])
    assert streamed[-1].details is not None


def test_raw_generate_route_and_async_chat(model_server: str) -> None:
    body = {"inputs": "Two plus two is", "parameters": {"max_new_tokens": 5}}
    reply = httpx.post(f"{model_server}/generate", json=body, timeout=60).json()
    assert reply["generated_text"] and reply["details"]["generated_tokens"] <= 5

    async def chat() -> str:
        client = AsyncClient(model_server, timeout=60)
        done = await client.chat(messages=[Message(role="user", content="Say hello.")], max_tokens=10, seed=1)
        assert done.usage["completion_tokens"] <= 10 and done.model == EMBEDDED_MODEL_ID
        return done.choices[0].message.content or ""

    assert asyncio.run(chat()).strip()


def test_openai_client_chat(model_server: str) -> None:
    client = OpenAI(base_url=f"{model_server}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=EMBEDDED_MODEL_ID,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=6,
        stop=["\n\n"],
    )
    assert reply.choices[0].message.content is not None
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 6


def test_prompt_longer_than_the_context_is_a_permanent_error(model_server: str) -> None:
    client = Client(model_server, timeout=60)
    with pytest.raises(ValidationError, match="must be <= 2048"):
        client.generate("word " * 3000, max_new_tokens=4)

    async def too_long() -> None:
        backend = TGIBackend(model_server, GenerationSpec(engine=Engine.embedded, max_new_tokens=4))
        await backend.complete("word " * 3000)

    with pytest.raises(InferenceError) as caught:
        asyncio.run(too_long())
    assert caught.value.kind == "context_length" and not caught.value.transient


def test_error_classification() -> None:
    assert classify(TimeoutError()).transient
    assert classify(ConnectionRefusedError()).kind == "connection"
    assert not classify(ValidationError("Input validation error: inputs tokens must be <= 10")).transient


# --- constrained decoding: a JSON schema in TGI's and OpenAI's spellings --------------------------

LABEL = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "minLength": 3, "maxLength": 40},
        "educational_score": {"type": "integer", "minimum": 0, "maximum": 10},
    },
    "required": ["topic", "educational_score"],
    "additionalProperties": False,
}
ASK = "Extract: The probe entered orbit around Jupiter. Which subject is this, and how educational?"


def assert_valid(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    jsonschema = pytest.importorskip("jsonschema")
    answer = json.loads(text)
    jsonschema.validate(answer, schema)
    return dict(answer)


def test_tgi_grammar_constrains_generate_and_stream(model_server: str) -> None:
    body = {
        "inputs": ASK + "\nAnswer:",
        "parameters": {"max_new_tokens": 80, "grammar": {"type": "json", "value": LABEL}},
    }
    reply = httpx.post(f"{model_server}/generate", json=body, timeout=120).json()
    assert reply["details"]["finish_reason"] == "eos_token", reply  # the grammar closed the object
    answer = assert_valid(reply["generated_text"], LABEL)
    assert list(answer) == ["topic", "educational_score"]  # written in the schema's order

    client = Client(model_server, timeout=120)
    # TGI's own client, with the schema as JSON text (TGI accepts both forms).
    grammar = Grammar(type=GrammarType.Json, value=json.dumps(LABEL))
    streamed = list(client.generate_stream(ASK + "\nAnswer:", max_new_tokens=80, grammar=grammar))
    assert streamed[-1].generated_text is not None
    assert_valid(streamed[-1].generated_text, LABEL)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object", "value": LABEL},  # TGI's Messages API
        {"type": "json", "value": LABEL},  # TGI's alias
        {"type": "json_schema", "value": {"name": "label", "strict": True, "schema": LABEL}},  # TGI
        {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": LABEL}},  # OpenAI
    ],
    ids=["tgi-json_object", "tgi-json", "tgi-json_schema", "openai-json_schema"],
)
def test_chat_honours_a_json_schema_in_response_format(
    model_server: str, response_format: dict[str, Any]
) -> None:
    body = {
        "messages": [{"role": "user", "content": ASK}],
        "max_tokens": 80,
        "temperature": 0,
        "response_format": response_format,
    }
    reply = httpx.post(f"{model_server}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert_valid(choice["message"]["content"], LABEL)


def test_openai_client_json_mode_and_structured_outputs(model_server: str) -> None:
    client = OpenAI(base_url=f"{model_server}/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": ASK}]
    structured = client.chat.completions.create(
        model=EMBEDDED_MODEL_ID,
        messages=messages,
        max_tokens=80,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "label", "schema": LABEL}},
    )
    assert_valid(structured.choices[0].message.content or "", LABEL)
    # JSON mode: any object. The model may write until max_tokens, so only a finished answer
    # is required to parse; either way it is an object from the first character.
    json_mode = client.chat.completions.create(
        model=EMBEDDED_MODEL_ID,
        messages=messages,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    content = (json_mode.choices[0].message.content or "").lstrip()
    assert content.startswith("{")
    if json_mode.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        ({"type": "json", "value": {"type": "banana"}}, "grammar is not valid"),
        ({"type": "json", "value": "{not json"}, "grammar is not valid: not JSON"),
        ({"type": "json", "value": 5}, "a JSON schema is an object"),
        ({"type": "json", "value": {"type": "integer", "minimum": 5, "maximum": 1}}, "no integer lies"),
        (
            {"type": "json", "value": {"properties": {"a": {"$ref": "#/$defs/missing"}}}},
            "grammar is not valid",
        ),
        ({"type": "regex", "value": "[a-z]+"}, "regex grammars are not supported"),
        ({"type": "xml", "value": "<a/>"}, "unknown grammar type 'xml'"),
    ],
)
def test_a_grammar_the_server_cannot_honour_is_a_422(
    model_server: str, grammar: dict[str, Any], message: str
) -> None:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "grammar": grammar}}
    for route in ("/generate", "/generate_stream"):
        reply = httpx.post(f"{model_server}{route}", json=body, timeout=60)
        assert reply.status_code == 422, (route, reply.text)
        assert reply.json()["error_type"] == "validation"
        assert message in reply.json()["error"] and reply.json()["error"].startswith("Input validation error")


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}}, "not valid"),
        ({"type": "json_schema", "json_schema": "label"}, "needs an object in 'json_schema'"),
        ({"type": "yaml"}, "unknown response_format type 'yaml'"),
    ],
)
def test_a_response_format_the_server_cannot_honour_is_a_422(
    model_server: str, response_format: dict[str, Any], message: str
) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "response_format": response_format,
    }
    reply = httpx.post(f"{model_server}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 422 and message in reply.json()["error"], reply.text
    client = OpenAI(base_url=f"{model_server}/v1", api_key="unused", max_retries=0)
    messages: Any = body["messages"]
    wire_format: Any = response_format
    with pytest.raises(UnprocessableEntityError):
        client.chat.completions.create(
            model=EMBEDDED_MODEL_ID, messages=messages, max_tokens=4, response_format=wire_format
        )


def test_wire_formats_map_to_one_schema_and_bounded_integers_to_enums() -> None:
    named = {"name": "label", "schema": LABEL}
    for response_format in (
        {"type": "json_object", "value": LABEL},
        {"type": "json", "value": json.dumps(LABEL)},
        {"type": "json_schema", "value": named},
        {"type": "json_schema", "json_schema": named},
        {"type": "json_object", "schema": LABEL},  # llama-cpp-python's server
    ):
        assert schema_from_response_format(response_format) == LABEL
    assert schema_from_response_format({"type": "json_object"}) == {"type": "object"}
    assert schema_from_response_format({"type": "text"}) is None
    assert schema_from_response_format(None) is None
    assert schema_from_grammar({"type": "json_schema", "value": named}) == LABEL
    with pytest.raises(GrammarError, match="needs a JSON schema in 'value'"):
        schema_from_grammar({"type": "json"})

    grammar = grammar_for_schema(LABEL)
    assert grammar is not None
    # llama.cpp's converter ignores minimum/maximum; as an enum the range is enforced.
    assert '"0" | "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9" | "10"' in grammar
    assert 'root ::= "{" space topic-kv "," space educational-score-kv "}" space' in grammar  # in order
    assert r'char ::= [^"\\\x7F\x00-\x1F]' in grammar  # no raw newline inside a string: strict JSON
    wide = grammar_for_schema({"type": "integer", "minimum": 0, "maximum": 10**6})
    assert wide is not None and '"999999"' not in wide  # too wide to list: left to the model
    assert grammar_for_schema(None) is None


# --- continuous batching, and the routes and checks it came with ------------------------------------


def test_concurrent_requests_share_decode_steps_and_keep_their_own_seed(model_server: str) -> None:
    async def generate(client: httpx.AsyncClient, prompt: str, seed: int) -> str:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "temperature": 0.9, "seed": seed}}
        reply = await client.post(f"{model_server}/generate", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert 0 < reply.json()["details"]["generated_tokens"] <= 8
        return str(reply.json()["generated_text"])

    async def run(requests: list[tuple[str, int]]) -> list[str]:
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(generate(client, p, seed) for p, seed in requests))

    answers = asyncio.run(run([("Once upon a time", 7), ("The ocean is", 3)] * 3))
    assert all(answer.strip() for answer in answers)
    stats = httpx.get(f"{model_server}/stats").json()
    if stats["engine"] == "batched":
        assert stats["mean_batch"] > 1, stats  # the six requests did share decode steps
        assert stats["active"] == 0 and stats["waiting"] == 0  # and every slot was given back
    # A seed is the sequence's own: alone in the batch twice, the same answer twice. (Alongside
    # others it may differ: llama.cpp's float sums are not batch-invariant, as on vLLM. So may a
    # prompt evaluated whole or after a cached prefix: the first call below puts the prefix in
    # the cache, so the two compared calls take the same path.)
    asyncio.run(run([("The ocean is", 3)]))
    assert asyncio.run(run([("The ocean is", 3)])) == asyncio.run(run([("The ocean is", 3)]))


def test_concurrent_streams_each_get_all_their_tokens_and_one_end(model_server: str) -> None:
    """A decode step's tokens reach their streams together; none is lost, mixed up or late."""

    async def stream(client: AsyncClient, prompt: str) -> None:
        pieces, last = [], None
        async for response in client.generate_stream(prompt, max_new_tokens=12, stop_sequences=["\n\n"]):
            if response.details is not None:
                last = response
            else:
                pieces.append(response.token.text)
        assert last is not None and last.generated_text == "".join(pieces)
        assert 0 < last.details.generated_tokens <= 12

    async def run() -> None:
        client = AsyncClient(model_server, timeout=120)
        prompts = ["Once upon a time", "The ocean is", "Bees make", "A prime number is"] * 2
        await asyncio.gather(*(stream(client, prompt) for prompt in prompts))

    asyncio.run(run())
    stats = httpx.get(f"{model_server}/stats").json()
    if stats["engine"] == "batched":
        assert stats["active"] == 0 and stats["waiting"] == 0


def test_stop_strings_cut_streamed_and_whole_answers_alike(model_server: str) -> None:
    client = Client(model_server, timeout=60)
    prompt, stop = "Count: one, two, three, four, five,", [","]
    whole = client.generate(prompt, max_new_tokens=20, stop_sequences=stop)
    streamed = list(client.generate_stream(prompt, max_new_tokens=20, stop_sequences=stop))
    assert "," not in whole.generated_text
    assert streamed[-1].generated_text == whole.generated_text  # greedy: the same text both ways
    assert whole.details.finish_reason.value == "eos_token" or whole.details.generated_tokens == 20


def test_tgi_refuses_a_prompt_that_leaves_no_room_for_max_new_tokens(model_server: str) -> None:
    """TGI's rule: inputs + max_new_tokens must fit the context; the answer is never cut short."""
    client = Client(model_server, timeout=60)
    with pytest.raises(ValidationError, match=r"must be <= 2048. Given: \d+ `inputs` tokens and 2000"):
        client.generate("word " * 100, max_new_tokens=2000)
    # The OpenAI routes keep answering within the room left, as they did (a full context would
    # take a minute to prefill on a small CPU, so the rule is checked where it lives).
    wants_4000 = SamplingParams(max_tokens=4000)
    assert room_for(Job(wants_4000, prompt="x"), prompt_tokens=2040, n_ctx=2048) == 8
    with pytest.raises(ContextTooLong, match="Given: 2040 `inputs` tokens and 4000 `max_new_tokens`"):
        room_for(Job(wants_4000, prompt="x", strict_context=True), prompt_tokens=2040, n_ctx=2048)
    with pytest.raises(ContextTooLong):
        room_for(Job(wants_4000, prompt="x"), prompt_tokens=2048, n_ctx=2048)


def test_openai_chat_streaming_and_text_completions(model_server: str) -> None:
    client = OpenAI(base_url=f"{model_server}/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "Name a colour."}]
    chunks = list(
        client.chat.completions.create(
            model=EMBEDDED_MODEL_ID, messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model=EMBEDDED_MODEL_ID, messages=messages, max_tokens=8, temperature=0
    )
    assert streamed == whole.choices[0].message.content and streamed.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    completion = client.completions.create(
        model=EMBEDDED_MODEL_ID, prompt="The sky is", max_tokens=5, temperature=0
    )
    assert completion.choices[0].text.strip() and completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 5
    pieces = client.completions.create(
        model=EMBEDDED_MODEL_ID, prompt="The sky is", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text
    both = client.completions.create(model=EMBEDDED_MODEL_ID, prompt=["Hello", "Goodbye"], max_tokens=3)
    assert [c.index for c in both.choices] == [0, 1]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", {"messages": [{}]}),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}),
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
        ("/v1/completions", {"prompt": []}),
        ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": -1}}),
        ("/generate", {"inputs": "hi", "parameters": {"top_p": 2}}),
        ("/generate", {"parameters": {}}),
        ("/generate_stream", ["not", "an", "object"]),
    ],
)
def test_malformed_requests_are_a_422_not_a_500(model_server: str, route: str, body: Any) -> None:
    reply = httpx.post(f"{model_server}{route}", json=body, timeout=60)
    assert reply.status_code == 422, reply.text
    assert (
        reply.json()["error"].startswith("Input validation error")
        and reply.json()["error_type"] == "validation"
    )


def test_text_stream_cuts_at_stop_strings_and_keeps_characters_whole() -> None:
    vocab = {1: b"Hello", 2: b" wor", 3: b"ld", 4: b"\xe2\x82", 5: b"\xac", 6: b"!", 0: b""}

    def run(tokens: list[int], stops: list[str], budget: int = 10) -> tuple[list[str], TextStream]:
        stream = TextStream(vocab.__getitem__, lambda t: t == 0, stops, budget)
        return [stream.push(t) for t in tokens], stream

    pieces, stream = run([1, 2, 3, 6], ["world"])  # the stop arrives split over two tokens
    assert pieces == ["Hello", " ", "", ""] and stream.finish == "stop" and stream.count == 3
    pieces, stream = run([4, 5, 6, 0, 1], [])  # a character split over two tokens; end token
    assert "".join(pieces) == "€!" and pieces[0] == "" and stream.finish == "stop" and stream.count == 3
    pieces, stream = run([1, 2, 3], ["wx"], budget=2)  # held text is released at the budget
    assert "".join(pieces) == "Hello wor" and stream.finish == "length"


# --- the canned engine: the fake server of the load tests and the dispatcher's tests ----------------


def test_canned_engine_answers_injects_503s_and_refuses_other_models() -> None:
    behaviour = Behaviour(latency=0.0, tokens=4, check_model=True, fail_every=3)
    with FakeServer(behaviour) as fake:
        tgi = httpx.post(
            f"{fake.url}/generate", json={"inputs": "a b c", "parameters": {"max_new_tokens": 2}}
        )
        assert (
            tgi.json()["generated_text"] == "lorem lorem" and tgi.json()["details"]["generated_tokens"] == 2
        )
        client = OpenAI(base_url=f"{fake.url}/v1", api_key="unused", max_retries=0)
        messages: Any = [{"role": "user", "content": "one two"}]
        reply = client.chat.completions.create(model=behaviour.model, messages=messages)
        assert reply.choices[0].message.content == behaviour.text and reply.usage is not None
        assert reply.usage.prompt_tokens == 2
        third = httpx.post(
            f"{fake.url}/v1/chat/completions", json={"model": behaviour.model, "messages": messages}
        )
        assert third.status_code == 503 and third.json()["error_type"] == "overloaded"
        with pytest.raises(NotFoundError, match="does not exist"):
            client.chat.completions.create(model="other", messages=messages)
        stream = Client(fake.url).generate_stream("hi", max_new_tokens=3)
        assert [r.token.text for r in stream][:3] == ["lorem", " lorem", " lorem"]
        stats = httpx.get(f"{fake.url}/stats").json()
    assert (
        (stats["generate"], stats["chat"])
        == (2, 3)
        == (behaviour.requests["generate"], behaviour.requests["chat"])
    )
    assert stats["first_at"] <= stats["last_at"]


def test_openapi_document_fuzzed_never_gets_a_server_error() -> None:
    """Whatever the OpenAPI document allows (and a little it does not), never a 5xx."""
    fuzz = Path(__file__).parent.parent / "openapi_fuzz.py"
    done = subprocess.run([sys.executable, str(fuzz), "15"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("no server error") >= 3, done.stdout
