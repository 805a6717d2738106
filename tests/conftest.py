"""Shared fixtures: real servers on loopback ports (nats-server, moto S3, the embedded model)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cosmoforge.queue import EmbeddedNats, free_port

REPO = Path(__file__).resolve().parent.parent
# The `cosmo` command as child processes run it (no console script needed).
COSMO = [sys.executable, "-m", "cosmoforge.cli"]
EXAMPLES = REPO / "manifests" / "examples"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(store_dir=str(tmp_path / "jetstream")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto in server mode); s3fs finds it through AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    import boto3

    name = "cosmo-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def model_server() -> Iterator[str]:
    """The embedded model (SmolLM2-135M on llama.cpp) behind its TGI/OpenAI HTTP server."""
    from cosmoforge.cli.embedded import ModelServer

    server = ModelServer().start()
    yield server.url
    server.stop()


def small_run(name: str = "tiny", **generation: Any) -> dict[str, Any]:
    """A GenerationRun document over the shipped samples, small enough for tests."""
    return {
        "apiVersion": "cosmoforge.io/v1alpha1",
        "kind": "GenerationRun",
        "metadata": {"name": name},
        "spec": {
            "seeds": [
                {
                    "name": "web",
                    "kind": "web",
                    "uri": "cosmoforge://samples/web.jsonl",
                    "idField": "id",
                    "topicField": "topic",
                },
                {"name": "math", "kind": "math", "uri": "cosmoforge://samples/math.jsonl", "idField": "id"},
            ],
            "prompts": {"seed": 3},
            # The nine benchmarks load from the Hub, which tests cannot reach; tests that
            # decontaminate name local benchmark files.
            "postprocess": {"decontaminate": {"enabled": False}},
            "generation": {
                "engine": "embedded",
                "maxNewTokens": 12,
                "sampling": {"temperature": 0.0, "seed": 1},
                "concurrency": 4,
                "shardSize": 3,
                **generation,
            },
        },
    }


def write_spec(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy, which is returned; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
