"""What every cosmoforge gRPC service shares: health, authentication, TLS, binding, signals, clients.

The dispatcher and the decontaminator differ only in their servicers; listening, reporting
SERVING, checking the bearer token on every call, TLS, stopping gracefully on SIGTERM and
opening a channel are the same everywhere, so they are written once here.

Authentication is a shared secret: a server given a token answers UNAUTHENTICATED to any call
whose `authorization` metadata is not `Bearer <token>`. The health service is the one
exception, because kubelet's gRPC probes cannot send metadata and a health answer reveals
nothing. The token travels in the clear unless TLS is on, so a server that listens beyond
loopback should have both (the chart gives it a token; TLS certificates come from the cluster's
issuer).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

TOKEN_ENV = "COSMOFORGE_TOKEN"
TLS_CA_ENV = "COSMOFORGE_TLS_CA"
AUTH_HEADER = "authorization"
# Calls to these services need no token: probes cannot send one and the answers are public.
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
DEFAULT_HOST = "127.0.0.1"


class CredentialsError(ValueError):
    """A token or certificate file cannot be used; the message names the file, never its content."""


def read_token(
    token_file: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The bearer token from `token_file`, else from $COSMOFORGE_TOKEN; None when neither is set.

    Surrounding whitespace is dropped (Secrets mounted as files often end in a newline)."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise CredentialsError(f"cannot read the token file {token_file}: {error}") from None
        if not token:
            raise CredentialsError(f"the token file {token_file} is empty")
        return token
    env = os.environ if environ is None else environ
    return env.get(TOKEN_ENV, "").strip() or None


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (a server there may go without a token)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerSecurity:
    """What a server demands: a bearer token on every call, TLS when a certificate is given."""

    token: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise CredentialsError("TLS needs both a certificate file and a key file")

    def credentials(self) -> grpc.ServerCredentials | None:
        if not self.cert_file or not self.key_file:
            return None
        key, cert = _read_bytes(self.key_file), _read_bytes(self.cert_file)
        return grpc.ssl_server_credentials([(key, cert)])

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenInterceptor(self.token)] if self.token else []


@dataclass(frozen=True)
class ClientSecurity:
    """What a client presents: the bearer token, and TLS (with `ca_file` as the trusted root, or the
    system's roots when `tls` is set without one)."""

    token: str | None = None
    tls: bool = False
    ca_file: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTH_HEADER, f"Bearer {self.token}"),) if self.token else ()

    def channel(self, target: str, options: Sequence[tuple[str, Any]] | None) -> grpc.aio.Channel:
        if not (self.tls or self.ca_file):
            return grpc.aio.insecure_channel(target, options=options)
        roots = _read_bytes(self.ca_file) if self.ca_file else None
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)

    @classmethod
    def load(
        cls, token_file: str | None = None, ca_file: str | None = None, tls: bool = False
    ) -> ClientSecurity:
        """The token from `token_file` or $COSMOFORGE_TOKEN; TLS when asked for or a CA is given
        (`ca_file`, else $COSMOFORGE_TLS_CA)."""
        ca_file = ca_file or os.environ.get(TLS_CA_ENV, "").strip() or None
        return cls(token=read_token(token_file), tls=tls or bool(ca_file), ca_file=ca_file)


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CredentialsError(f"cannot read {path}: {error.strerror or error}") from None


def authorized(metadata: Sequence[tuple[str, str | bytes]] | None, token: str) -> bool:
    """Whether the call's metadata carries `Bearer <token>`; compared in constant time so the
    answer's timing does not leak how much of a guess was right."""
    expected = f"Bearer {token}".encode()
    for key, value in metadata or ():
        if key == AUTH_HEADER:
            given = value if isinstance(value, bytes) else value.encode()
            return hmac.compare_digest(given, expected)
    return False


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the bearer token (health checks excepted) before the servicer runs."""

    def __init__(self, token: str):
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        metadata = handler_call_details.invocation_metadata
        if authorized(metadata, self._token):
            return handler
        return _refusing(handler)


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")


async def _refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await _refuse(request, context)
    yield  # pragma: no cover - abort raises; the yield makes this an async generator


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary or streaming each way) that only answers UNAUTHENTICATED."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse_stream, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse_stream, **codec)
    return grpc.unary_unary_rpc_method_handler(_refuse, **codec)


def new_server(
    security: ServerSecurity | None = None, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.aio.Server:
    """A server whose every call (health aside) passes the token check when `security` has a token."""
    interceptors = (security or ServerSecurity()).interceptors()
    return grpc.aio.server(interceptors=interceptors, options=options)


def bind(
    server: grpc.aio.Server, host: str, port: int, security: ServerSecurity | None = None
) -> tuple[health.aio.HealthServicer, int]:
    """Add the health service and listen on host:port (0: a free port), with TLS when `security`
    has a certificate; returns the bound port."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = security.credentials() if security else None
    address = f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return health_servicer, bound


async def serving(health_servicer: health.aio.HealthServicer, service: str) -> None:
    for name in ("", service):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def shut_down(
    server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, grace: float
) -> None:
    with contextlib.suppress(Exception):
        await health_servicer.enter_graceful_shutdown()
    await server.stop(grace)


class Client:
    """A channel with async-context handling; subclasses add the stub and pass `self.metadata`
    (the bearer token, if any) on every call."""

    def __init__(
        self,
        target: str,
        timeout: float | None = 60.0,
        options: Sequence[tuple[str, Any]] | None = None,
        security: ClientSecurity | None = None,
    ):
        self.target, self.timeout = target, timeout
        # Callers that pass nothing get the process's own settings ($COSMOFORGE_TOKEN, $COSMOFORGE_TLS_CA):
        # that is how the operator, given the chart's Secret as environment, reaches the dispatcher.
        security = security or ClientSecurity.load()
        self.metadata = security.metadata
        self.channel = security.channel(target, options)

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server accepts connections (or raise TimeoutError)."""
        await asyncio.wait_for(self.channel.channel_ready(), timeout)
