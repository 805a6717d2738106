"""The embedded model server speaks TGI's and OpenAI's APIs to their own clients."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from openai import OpenAI
from text_generation import AsyncClient, Client
from text_generation.errors import ValidationError
from text_generation.types import Message

from cosmoforge.inference import InferenceError, TGIBackend, classify
from cosmoforge.modelserver import EMBEDDED_MODEL_ID
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
