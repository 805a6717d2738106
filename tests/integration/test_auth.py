"""The gRPC services' authentication and TLS over real sockets: bearer tokens, certificates, CLI rules.

The dispatcher runs with a real nats-server behind it; the decontaminator with a small real
benchmark index. Each check is a call a stranger on the cluster network could make.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cosmoforge.postprocess.stages import decontam
from cosmoforge.queue import EmbeddedNats, free_port
from cosmoforge.runs.manager import RunManager
from cosmoforge.services import decontaminator as decontam_service
from cosmoforge.services.decontaminator import DecontaminatorClient, DecontaminatorError
from cosmoforge.services.dispatcher.client import DispatcherClient, DispatcherError
from cosmoforge.services.dispatcher.server import create_server
from cosmoforge.services.grpcbase import (
    TOKEN_ENV,
    ClientSecurity,
    CredentialsError,
    ServerSecurity,
    authorized,
    read_token,
)
from processes import COSMO, services, wait_serving

TOKEN = "s3cret-token-for-the-auth-test"
BENCHMARKS = [str(Path(__file__).parents[1] / "data" / "benchmarks" / "arc_easy.jsonl")]


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@contextlib.asynccontextmanager
async def dispatcher(nats_url: str, security: ServerSecurity) -> AsyncIterator[str]:
    """A dispatcher in this process (its gRPC over a real socket); yields its target."""
    manager = RunManager(nats_url, poll_seconds=0.2)
    server, _, port = create_server(manager, 0, "127.0.0.1", security)
    await manager.start()
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        await manager.close()


# --- pure rules ---------------------------------------------------------------------------------


def test_authorized_wants_the_exact_bearer_token() -> None:
    assert authorized([("authorization", f"Bearer {TOKEN}")], TOKEN)
    assert authorized([("authorization", f"Bearer {TOKEN}".encode())], TOKEN)
    for metadata in (
        [],
        None,
        [("authorization", TOKEN)],
        [("authorization", f"Bearer {TOKEN}x")],
        [("authorization", f"bearer {TOKEN}"[:-1])],
        [("x-token", f"Bearer {TOKEN}")],
    ):
        assert not authorized(metadata, TOKEN), metadata


def test_read_token_prefers_the_file_and_strips_the_newline(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert read_token(token_file, {TOKEN_ENV: "from-env"}) == TOKEN
    assert read_token(None, {TOKEN_ENV: " from-env "}) == "from-env"
    assert read_token(None, {}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(CredentialsError, match="empty"):
        read_token(tmp_path / "empty")
    with pytest.raises(CredentialsError, match="missing") as error:
        read_token(tmp_path / "missing")
    assert TOKEN not in str(error.value)


def test_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError):
        ServerSecurity(token=TOKEN, cert_file=str(tmp_path / "tls.crt"))


# --- the dispatcher over a socket ---------------------------------------------------------------


async def test_dispatcher_refuses_calls_without_the_token(nats_server: EmbeddedNats) -> None:
    async with dispatcher(nats_server.url, ServerSecurity(token=TOKEN)) as target:
        for security in (ClientSecurity(), ClientSecurity(token="wrong")):
            async with DispatcherClient(target, timeout=10, security=security) as client:
                with pytest.raises(DispatcherError) as refused:
                    await client.list_runs()
                assert refused.value.code == "UNAUTHENTICATED"
                with pytest.raises(DispatcherError) as refused:
                    await client.start_run("apiVersion: x\n")
                assert refused.value.code == "UNAUTHENTICATED"
                with pytest.raises(DispatcherError) as refused:
                    await client.cancel("any-run")
                assert refused.value.code == "UNAUTHENTICATED"
                with pytest.raises(DispatcherError) as refused:
                    async for _ in client.watch("any-run"):
                        pass
                assert refused.value.code == "UNAUTHENTICATED"
        async with DispatcherClient(target, timeout=10, security=ClientSecurity(token=TOKEN)) as client:
            assert await client.list_runs() == []
            with pytest.raises(DispatcherError) as missing:
                await client.get_status("no-such-run")
            assert missing.value.code == "NOT_FOUND"  # past authentication, into the servicer
        # Probes carry no metadata: health stays open, and says no more than SERVING.
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_dispatcher_over_tls(nats_server: EmbeddedNats, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    security = ServerSecurity(token=TOKEN, cert_file=str(cert), key_file=str(key))
    async with dispatcher(nats_server.url, security) as target:
        trusted = ClientSecurity(token=TOKEN, ca_file=str(cert))
        async with DispatcherClient(target, timeout=10, security=trusted) as client:
            assert await client.list_runs() == []
        async with DispatcherClient(target, timeout=5, security=ClientSecurity(token=TOKEN)) as client:
            with pytest.raises(DispatcherError) as plaintext:  # a plaintext client cannot talk TLS
                await client.list_runs()
            assert plaintext.value.code == "UNAVAILABLE"
        untrusting = ClientSecurity(token=TOKEN, tls=True)  # the system roots do not know this cert
        async with DispatcherClient(target, timeout=5, security=untrusting) as client:
            with pytest.raises(DispatcherError) as unknown:
                await client.list_runs()
            assert unknown.value.code == "UNAVAILABLE"
        async with DispatcherClient(target, timeout=10, security=ClientSecurity(ca_file=str(cert))) as client:
            with pytest.raises(DispatcherError) as refused:  # TLS is not a substitute for the token
                await client.list_runs()
            assert refused.value.code == "UNAUTHENTICATED"


# --- the decontaminator -------------------------------------------------------------------------


async def test_decontaminator_refuses_streams_without_the_token() -> None:
    index = decontam_service.build_index(BENCHMARKS, decontam.Config())
    server, _, port = decontam_service.create_server(
        index, 0, "127.0.0.1", security=ServerSecurity(token=TOKEN)
    )
    await server.start()
    try:
        target = f"127.0.0.1:{port}"
        async with DecontaminatorClient(target, timeout=10, security=ClientSecurity()) as client:
            with pytest.raises(DecontaminatorError) as refused:
                [v async for v in client.check([{"id": "a", "text": "hello"}])]
            assert refused.value.code == "UNAUTHENTICATED"
            with pytest.raises(DecontaminatorError) as refused:
                await client.report()
            assert refused.value.code == "UNAUTHENTICATED"
        async with DecontaminatorClient(target, timeout=10, security=ClientSecurity(token=TOKEN)) as client:
            verdicts = [v async for v in client.check([{"id": "a", "text": "hello"}])]
            assert [v["id"] for v in verdicts] == ["a"]
            assert (await client.report())["documents"] == 1
    finally:
        await server.stop(None)


# --- the command line ---------------------------------------------------------------------------


def _cosmo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != TOKEN_ENV} | (env or {})
    return subprocess.run([*COSMO, *args], capture_output=True, text=True, timeout=120, env=environ)


def test_servers_refuse_to_listen_beyond_loopback_without_a_token() -> None:
    nats = "nats://127.0.0.1:1"
    served = _cosmo("dispatcher", "--nats", nats, "--host", "0.0.0.0", "--port", str(free_port()))
    assert served.returncode == 2
    assert "without a token" in served.stderr
    served = _cosmo("decontaminator", "--benchmark", BENCHMARKS[0], "--host", "0.0.0.0", "--port", "0")
    assert served.returncode == 2
    assert "without a token" in served.stderr


def test_cli_token_from_file_and_environment(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with services(tmp_path) as group:
        served = group.dispatcher(nats_server.url, 0, "--token-file", str(token_file))
        wait_serving(served)
        target = served.target
        refused = _cosmo("runs", "--dispatcher", target)
        assert refused.returncode == 1
        assert "UNAUTHENTICATED" in refused.stderr
        assert _cosmo("runs", "--dispatcher", target, "--token-file", str(token_file)).returncode == 0
        assert _cosmo("runs", "--dispatcher", target, env={TOKEN_ENV: TOKEN}).returncode == 0
        wrong = _cosmo("cancel", "some-run", "--dispatcher", target, env={TOKEN_ENV: "nope"})
        assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
    assert TOKEN not in served.output()
