"""The embedded model server speaks TGI's and OpenAI's APIs to their own clients.

Constrained decoding included: a JSON schema in TGI's `grammar` or in `response_format` (TGI's
and OpenAI's spellings) gives an answer that parses and validates, and a schema the server
cannot honour is a 422, as TGI answers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from openai import OpenAI, UnprocessableEntityError
from text_generation import AsyncClient, Client
from text_generation.errors import ValidationError
from text_generation.types import Grammar, GrammarType, Message

from cosmoforge.inference import InferenceError, TGIBackend, classify
from cosmoforge.modelserver import (
    EMBEDDED_MODEL_ID,
    GrammarError,
    grammar_for_schema,
    schema_from_grammar,
    schema_from_response_format,
)
from cosmoforge.spec import GenerationSpec


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
        backend = TGIBackend(model_server, GenerationSpec(engine="embedded", max_new_tokens=4))
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
    with pytest.raises(UnprocessableEntityError):
        client.chat.completions.create(
            model=EMBEDDED_MODEL_ID, messages=body["messages"], max_tokens=4, response_format=response_format
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
