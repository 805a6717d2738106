"""What every cosmoforge gRPC service shares: a health service, binding, signals, clients.

The dispatcher and the decontaminator differ only in their servicers; listening, reporting
SERVING, stopping gracefully on SIGTERM and opening a channel are the same everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def bind(server: grpc.aio.Server, host: str, port: int) -> tuple[health.aio.HealthServicer, int]:
    """Add the health service and listen on host:port (0: a free port); returns the bound port."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
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
    """An insecure channel with async-context handling; subclasses add the stub and calls."""

    def __init__(
        self, target: str, timeout: float | None = 60.0, options: Sequence[tuple[str, Any]] | None = None
    ):
        self.target, self.timeout = target, timeout
        self.channel = grpc.aio.insecure_channel(target, options=options)

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server accepts connections (or raise TimeoutError)."""
        await asyncio.wait_for(self.channel.channel_ready(), timeout)
