"""DispatcherClient: the dispatcher's gRPC API as async methods that take and return plain data.

Callers (the Kubernetes operator, `cosmo submit`, tests) should not need protobuf: statuses
come back as dicts with the field names of `state.RunStatus` (phase as "Pending",
"Generating", "Succeeded", "Failed" or "Cancelled", like `GenerationRunStatus`), and a failed
call raises DispatcherError with the gRPC code and, for an invalid spec, each field and reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from cosmoforge.services import grpcbase
from cosmoforge.services.dispatcher.proto import pb, pb_grpc, problems_from_metadata, to_dict


class DispatcherError(Exception):
    def __init__(self, code: str, details: str, problems: list[tuple[str, str]] | None = None):
        self.code, self.details, self.problems = code, details, problems or []
        super().__init__(f"{code}: {details}")


def _error(error: grpc.aio.AioRpcError) -> DispatcherError:
    problems = problems_from_metadata(error.trailing_metadata())
    return DispatcherError(error.code().name, error.details() or "", problems)


class DispatcherClient(grpcbase.Client):
    """`async with DispatcherClient("host:port") as client: await client.start_run(text)`.

    `security` carries the bearer token (and TLS settings) a dispatcher started with a token wants."""

    def __init__(
        self, target: str, timeout: float | None = 60.0, security: grpcbase.ClientSecurity | None = None
    ):
        super().__init__(target, timeout, security=security)
        self.stub = pb_grpc.DispatcherStub(self.channel)

    async def start_run(self, spec_yaml: str) -> dict[str, Any]:
        try:
            reply = await self.stub.StartRun(
                pb.StartRunRequest(spec_yaml=spec_yaml), timeout=self.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as error:
            raise _error(error) from None
        return to_dict(reply)

    async def get_status(self, run: str) -> dict[str, Any]:
        try:
            reply = await self.stub.GetRunStatus(
                pb.GetRunStatusRequest(run=run), timeout=self.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as error:
            raise _error(error) from None
        return to_dict(reply)

    async def watch(self, run: str, heartbeat_seconds: float = 0.0) -> AsyncIterator[dict[str, Any]]:
        """Status dicts, each with a `reason` key, until the run reaches a final phase."""
        call = self.stub.WatchRun(
            pb.WatchRunRequest(run=run, heartbeat_seconds=heartbeat_seconds), metadata=self.metadata
        )
        try:
            async for event in call:
                yield {**to_dict(event.status), "reason": event.reason}
        except grpc.aio.AioRpcError as error:
            raise _error(error) from None
        finally:
            call.cancel()

    async def cancel(self, run: str) -> dict[str, Any]:
        try:
            reply = await self.stub.CancelRun(
                pb.CancelRunRequest(run=run), timeout=self.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as error:
            raise _error(error) from None
        return to_dict(reply)

    async def list_runs(self) -> list[dict[str, Any]]:
        try:
            reply = await self.stub.ListRuns(
                pb.ListRunsRequest(), timeout=self.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as error:
            raise _error(error) from None
        return [to_dict(status) for status in reply.runs]
