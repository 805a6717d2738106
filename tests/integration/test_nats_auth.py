"""NATS with credentials, as the chart runs it: a real nats-server that requires a user and password.

Credentials reach clients through environment variables (a Secret's keys), never a URL; a
client without them fails at once with a message that says what to set, and the password is
never printed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from conftest import REPO, small_run
from cosmoforge.processes import stop_process
from cosmoforge.queue import EmbeddedNats, auth, free_port, nats_server_binary
from cosmoforge.queue.pull import NatsAuthError, connect_unless_stopped
from cosmoforge.services.dispatcher.client import DispatcherClient, DispatcherError
from cosmoforge.services.grpcbase import ClientSecurity
from cosmoforge.storage import RunStore
from processes import COSMO, services, wait_serving

USER, PASSWORD = "cosmo-worker", "n4ts-pa55word-for-the-test"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(store_dir=str(tmp_path / "js"), user=USER, password=PASSWORD) as server:
        yield server


def credentials_env() -> dict[str, str]:
    return {auth.USER_ENV: USER, auth.PASSWORD_ENV: PASSWORD}


def without_credentials() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in auth.ENV_NAMES}


def test_connect_options_come_from_the_environment() -> None:
    assert auth.connect_options({}) == {}
    assert auth.connect_options(credentials_env()) == {"user": USER, "password": PASSWORD}
    assert auth.connect_options({auth.TOKEN_ENV: " t0k "}) == {"token": "t0k"}
    assert auth.connect_options({auth.CREDS_ENV: "/secrets/nats.creds"}) == {
        "user_credentials": "/secrets/nats.creds"
    }


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://nats:4222", "nats://nats:4222"),
        (f"nats://{USER}:{PASSWORD}@nats:4222", "nats://***@nats:4222"),
        ("tls://s3cr3t-token@nats.messaging:4222", "tls://***@nats.messaging:4222"),
        (f"nats://a:{PASSWORD}@n1:4222,nats://n2:4222", "nats://***@n1:4222,nats://n2:4222"),
    ],
)
def test_urls_are_redacted(url: str, shown: str) -> None:
    assert auth.redact(url) == shown
    assert auth.has_credentials(url) == (shown != url)


async def test_a_client_connects_with_credentials_from_the_environment(
    secured: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in credentials_env().items():
        monkeypatch.setenv(name, value)
    nc = await connect_unless_stopped(secured.url, asyncio.Event())
    assert nc is not None and nc.is_connected
    js = nc.jetstream()
    await js.add_stream(name="AUTHED", subjects=["authed.>"])
    assert (await js.publish("authed.x", b"hello")).seq == 1
    await nc.close()


async def test_a_client_without_credentials_fails_at_once(
    secured: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in auth.ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(NatsAuthError) as refused:
        await asyncio.wait_for(connect_unless_stopped(secured.url, asyncio.Event()), 20)
    assert auth.USER_ENV in str(refused.value)
    monkeypatch.setenv(auth.USER_ENV, USER)
    monkeypatch.setenv(auth.PASSWORD_ENV, "wrong")
    with pytest.raises(NatsAuthError) as refused:
        await asyncio.wait_for(connect_unless_stopped(secured.url, asyncio.Event()), 20)
    assert "wrong" not in str(refused.value)


def test_processes_use_the_secret_and_never_print_it(secured: EmbeddedNats, tmp_path: Path) -> None:
    out = tmp_path / "out"
    document = small_run("secured")
    RunStore.open(str(out), "secured").write_text("spec.yaml", yaml.safe_dump(document))
    worker = [*COSMO, "worker", "--nats", secured.url, "--out", str(out), "--run", "secured",
              "--endpoint", "http://127.0.0.1:9", "--worker-id", "w"]  # fmt: skip
    refused = subprocess.run(worker, capture_output=True, text=True, timeout=120, env=without_credentials())
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "refused the credentials" in refused.stderr and auth.USER_ENV in refused.stderr
    # The dispatcher answers SERVING only once its NATS connection is up: the credentials worked.
    env_before = dict(os.environ)
    os.environ.update(credentials_env())
    try:
        with services(tmp_path) as group:
            dispatcher = group.dispatcher(secured.url)
            wait_serving(dispatcher)
            assert dispatcher.process.poll() is None
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    for text in (refused.stdout, refused.stderr, dispatcher.output()):
        assert PASSWORD not in text


def test_a_live_dispatcher_never_echoes_a_secret(secured: EmbeddedNats, tmp_path: Path) -> None:
    """Token, NATS password and a password inside a seed URI: none in replies, statuses or logs."""
    token, seed_password = "bearer-Tk-77x", "seed-pw-Qm3"
    token_file = tmp_path / "token"
    token_file.write_text(token)
    document = small_run("leaky")
    document["spec"]["output"] = {"uri": str(tmp_path / "out")}
    document["spec"]["seeds"][0]["uri"] = f"http://reader:{seed_password}@127.0.0.1:9/seeds.jsonl"
    secrets = (token, PASSWORD, seed_password)

    async def exercise(target: str) -> list[str]:
        seen = []
        async with DispatcherClient(target, timeout=60, security=ClientSecurity(token=token)) as client:
            try:
                seen.append(repr(await client.start_run(yaml.safe_dump(document))))
            except DispatcherError as error:
                seen += [str(error), repr(error.problems)]
            for _ in range(300):  # building prompts from the seed fails in the background
                status = await client.get_status("leaky")
                if status["phase"] not in ("Pending", "Generating"):
                    break
                await asyncio.sleep(0.2)
            seen.append(repr(await client.list_runs()))
        async with DispatcherClient(target, timeout=10, security=ClientSecurity(token="wrong")) as client:
            try:
                await client.list_runs()
            except DispatcherError as error:
                seen.append(str(error))
        return seen

    env_before = dict(os.environ)
    os.environ.update(credentials_env())
    try:
        with services(tmp_path) as group:
            dispatcher = group.dispatcher(secured.url, 0, "--token-file", str(token_file))
            seen = asyncio.run(exercise(dispatcher.target))
            dispatcher.terminate()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert "Failed" in seen[1], seen  # the unreadable seed failed the run, with a message quoting it
    for text in [*seen, dispatcher.output()]:
        assert not [secret for secret in secrets if secret in text], text[-2000:]


def test_the_charts_bundled_server_requires_the_secrets_credentials(tmp_path: Path) -> None:
    """The chart's nats.conf and Secret, run by the real nats-server as the StatefulSet runs them."""
    with helm.Chart.load(REPO / "charts" / "cosmoforge") as chart:
        files = chart.render({}, name="cf", namespace="cosmo", is_install=True)
    documents = [
        d for name, text in files.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d
    ]
    (secret,) = [
        d for d in documents if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-nats-auth")
    ]
    (config,) = [
        d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-nats-config")
    ]
    env = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    (tmp_path / "nats.conf").write_text(config["data"]["nats.conf"])
    port = free_port()
    command = [nats_server_binary(), f"--config={tmp_path / 'nats.conf'}", "-a", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, env={**without_credentials(), **env}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

        async def attempt(environment: dict[str, str]) -> None:
            saved = dict(os.environ)
            os.environ.clear()
            os.environ.update(environment)
            try:
                nc = await asyncio.wait_for(
                    connect_unless_stopped(f"nats://127.0.0.1:{port}", asyncio.Event()), 20
                )
                assert nc is not None and nc.is_connected
                await nc.close()
            finally:
                os.environ.clear()
                os.environ.update(saved)

        asyncio.run(attempt({**without_credentials(), **env}))
        with pytest.raises(NatsAuthError):
            asyncio.run(attempt(without_credentials()))
    finally:
        stop_process(server, timeout=10)
