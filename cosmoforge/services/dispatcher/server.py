"""The dispatcher's gRPC server: a thin servicer over RunManager, the health service, and main().

The servicer only translates — messages to calls, exceptions to status codes — so everything
it does can be read in `runs.py` and tested without gRPC. `create_server()` builds a server
without starting anything, for tests and embedding; `serve()` runs one until SIGTERM/SIGINT
and stops it gracefully (in-flight calls get a grace period, health turns NOT_SERVING first so
load balancers stop sending new ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health

from cosmoforge.generation import metrics
from cosmoforge.queue.topology import ACK_WAIT_SECONDS
from cosmoforge.redaction import redact_urls
from cosmoforge.runs.manager import RunConflict, RunManager, RunNotFound, StartFailed
from cosmoforge.services import grpcbase
from cosmoforge.services.dispatcher.proto import SERVICE, pb, pb_grpc, problems_metadata, to_message
from cosmoforge.services.runpages import RunPages, serving
from cosmoforge.spec.model import SpecError
from cosmoforge.spec.problems import summary

log = logging.getLogger("cosmoforge.services.dispatcher")

GRACE_SECONDS = 10.0
MAX_SPEC_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, bytes], ...] = ()


def failure_for(error: Exception) -> Failure:
    """The gRPC status a manager exception stands for (URL credentials in its text masked)."""
    failure = _failure_for(error)
    return Failure(failure.code, redact_urls(failure.details), failure.trailers)


def _failure_for(error: Exception) -> Failure:
    if isinstance(error, SpecError):
        problems = [(field, redact_urls(reason)) for field, reason in error.problems]
        details = summary(problems)
        return Failure(
            grpc.StatusCode.INVALID_ARGUMENT, f"invalid spec: {details}", problems_metadata(problems)
        )
    if isinstance(error, RunNotFound):
        return Failure(grpc.StatusCode.NOT_FOUND, str(error.args[0] if error.args else error))
    if isinstance(error, RunConflict):
        return Failure(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    if isinstance(error, StartFailed):
        return Failure(grpc.StatusCode.UNAVAILABLE, str(error))
    return Failure(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


class DispatcherServicer(pb_grpc.DispatcherServicer):
    def __init__(self, manager: RunManager):
        self.manager = manager

    async def StartRun(self, request: pb.StartRunRequest, context: grpc.aio.ServicerContext) -> pb.RunStatus:
        if len(request.spec_yaml.encode()) > MAX_SPEC_BYTES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"spec larger than {MAX_SPEC_BYTES} bytes")
        try:
            return to_message(await self.manager.start_run(request.spec_yaml))
        except Exception as error:  # every failure becomes a status code with a readable message
            await _abort(context, error)
            raise  # abort raises; this only tells type checkers so

    async def GetRunStatus(
        self, request: pb.GetRunStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunStatus:
        try:
            return to_message(self.manager.status(request.run))
        except RunNotFound as error:
            await _abort(context, error)
            raise

    async def WatchRun(
        self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RunEvent]:
        heartbeat = request.heartbeat_seconds if request.heartbeat_seconds > 0 else 5.0
        try:
            async for status, reason in self.manager.watch(request.run, heartbeat):
                yield pb.RunEvent(status=to_message(status), reason=reason)
        except RunNotFound as error:
            await _abort(context, error)

    async def CancelRun(
        self, request: pb.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunStatus:
        try:
            return to_message(await self.manager.cancel(request.run))
        except (RunNotFound, RunConflict) as error:
            await _abort(context, error)
            raise

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunsResponse:
        return pb.ListRunsResponse(runs=[to_message(status) for status in self.manager.list_runs()])


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    failure = failure_for(error)
    if failure.code == grpc.StatusCode.INTERNAL:  # a bug, not a bad request: keep the traceback
        log.error("request failed", exc_info=error)
    await context.abort(failure.code, failure.details, trailing_metadata=failure.trailers)


def create_server(
    manager: RunManager,
    port: int = 0,
    host: str = grpcbase.DEFAULT_HOST,
    security: grpcbase.ServerSecurity | None = None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A server with the Dispatcher and health services bound to host:port (0: a free port).

    With `security`, every Dispatcher call needs its bearer token, and TLS is on if it has a
    certificate."""
    server = grpcbase.new_server(security)
    pb_grpc.add_DispatcherServicer_to_server(DispatcherServicer(manager), server)
    health_servicer, bound = grpcbase.bind(server, host, port, security)
    return server, health_servicer, bound


async def serve(
    nats_url: str,
    port: int,
    host: str = grpcbase.DEFAULT_HOST,
    *,
    security: grpcbase.ServerSecurity | None = None,
    compact: bool = True,
    use_wandb: bool = False,
    ack_wait: float = ACK_WAIT_SECONDS,
    ui_port: int | None = None,
) -> None:
    """Run the dispatcher until SIGTERM or SIGINT; with `ui_port`, serve the run pages too."""
    # A dispatcher serves a cluster: runs are told apart by namespace as well as name.
    manager = RunManager(nats_url, compact=compact, use_wandb=use_wandb, ack_wait=ack_wait, namespaced=True)
    server, health_servicer, bound = create_server(manager, port, host, security)
    stop = grpcbase.stop_on_signals()
    try:
        await manager.start()
        await server.start()
        await grpcbase.serving(health_servicer, SERVICE)
        log.info("dispatcher listening on %s:%d", host, bound, extra={"port": bound})
        async with contextlib.AsyncExitStack() as pages:
            if ui_port is not None:
                page_port = await pages.enter_async_context(serving(RunPages.of(manager), host, ui_port))
                log.info("run pages on http://%s:%d/runs/<run>", host, page_port, extra={"port": page_port})
            await stop.wait()
    finally:
        await grpcbase.shut_down(server, health_servicer, GRACE_SECONDS)
        await manager.close()
        log.info("dispatcher stopped")


def main(
    nats_url: str,
    port: int,
    host: str = grpcbase.DEFAULT_HOST,
    metrics_port: int = 0,
    compact: bool = True,
    use_wandb: bool = False,
    ack_wait: float = ACK_WAIT_SECONDS,
    ui_port: int | None = None,
    security: grpcbase.ServerSecurity | None = None,
) -> int:
    metrics.serve(metrics_port)
    options: dict[str, Any] = {"compact": compact, "use_wandb": use_wandb, "ack_wait": ack_wait}
    options["security"] = security
    asyncio.run(serve(nats_url, port, host, ui_port=ui_port, **options))
    return 0
