"""The Decontaminator gRPC service: benchmark decontamination for documents sent over the wire.

`cosmo decontaminate` needs a dataset on disk; a generation pipeline that wants verdicts as it
writes (or a worker that checks shards elsewhere) needs the index in a long-lived process
instead. Building the index is the expensive part, so the server builds it once at start and
every call reads the same one. The servicer only translates: documents go through
`decontam.check_batch` unchanged, so a verdict here is the verdict the CLI gives for the same
text, and a `decontam.Report` keeps the CLI's report up to date incrementally, in memory
bounded by the index rather than by the documents seen.

Verification runs on every core: `serve()` starts a `decontam.Checker` (processes forked once,
before the server exists, each inheriting the index) and the servicer hands each batch to it.
A stream keeps several batches in flight, so one fast client keeps every process busy, and
yields their verdicts in the order the documents came.

`create_server()` builds a server without starting anything (tests, embedding); `serve()` runs
one until SIGTERM/SIGINT, turns health NOT_SERVING and stops gracefully. `DecontaminatorClient`
takes and returns plain data, so callers never touch protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health

from cosmoforge.postprocess.stages import decontam, evalsets
from cosmoforge.services import grpcbase
from cosmoforge.services.protogen import ensure_generated

ensure_generated()

from cosmoforge._proto.v1 import decontaminator_pb2 as pb  # noqa: E402
from cosmoforge._proto.v1 import decontaminator_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("cosmoforge.decontaminator")

SERVICE = "cosmoforge.v1.Decontaminator"
GRACE_SECONDS = 10.0
# A 10 MB document is legal input (docs/postprocess.md); gRPC's default limit is 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

Document = Mapping[str, str]  # "text", optional "id" and "group"


# --- the report -------------------------------------------------------------------------------


def report_reply(report: dict[str, Any]) -> pb.ReportReply:
    return pb.ReportReply(
        documents=report["documents"],
        documents_removed=report["documents_removed"],
        documents_kept=report["documents_kept"],
        empty_documents=report["empty_documents"],
        benchmarks={
            name: pb.BenchmarkCounts(
                items=entry["items"], removed=entry["removed"], unique_items=entry["unique_items"]
            )
            for name, entry in report["benchmarks"].items()
        },
        report_json=json.dumps(report),
    )


# --- conversions ------------------------------------------------------------------------------


def verdict_message(doc_id: str, verdict: decontam.Verdict) -> pb.Verdict:
    best = verdict.best
    if best is None:
        return pb.Verdict(id=doc_id, contaminated=False)
    return pb.Verdict(
        id=doc_id,
        contaminated=verdict.contaminated,
        benchmark=best.benchmark,
        item_index=best.item_index,
        item_text=best.item_text,
        ngram=best.ngram,
        ratio=best.ratio,
    )


def verdict_dict(message: pb.Verdict) -> dict[str, Any]:
    return {
        "id": message.id,
        "contaminated": message.contaminated,
        "benchmark": message.benchmark,
        "item_index": message.item_index,
        "item_text": message.item_text,
        "ngram": message.ngram,
        "ratio": message.ratio,
    }


# --- the servicer -----------------------------------------------------------------------------


class DecontaminatorServicer(pb_grpc.DecontaminatorServicer):
    """Checks documents in batches of whatever has arrived, so a client may wait for each verdict.

    With a `checker` holding processes, a stream has up to `checker.workers + 1` batches in
    flight: while the oldest is checked, the next ones already are, and verdicts still leave in
    document order. Without one, batches are checked in a thread of this process.
    """

    def __init__(
        self,
        index: decontam.Index,
        batch_size: int = decontam.BATCH_SIZE,
        checker: decontam.Checker | None = None,
    ) -> None:
        self.index = index
        self.batch_size = batch_size
        self.checker = checker
        self.depth = checker.workers + 1 if checker is not None and checker.workers > 1 else 1
        self.report = decontam.Report.of(index, grouped=True)

    def _check(self, texts: list[str]) -> list[decontam.Verdict]:
        if self.checker is None:
            return decontam.check_batch(texts, self.index)
        return list(self.checker.check_all(texts))

    async def Check(
        self, request_iterator: AsyncIterator[pb.Document], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Verdict]:
        pending: asyncio.Queue[pb.Document | None] = asyncio.Queue(maxsize=4 * self.batch_size)
        reader = asyncio.create_task(_read_into(request_iterator, pending))
        in_flight: deque[tuple[list[pb.Document], asyncio.Future[list[decontam.Verdict]]]] = deque()
        loop = asyncio.get_running_loop()
        ended = False
        try:
            while True:
                # Start batches while there is room: wait for documents only with nothing in flight.
                while not ended and len(in_flight) < self.depth and (not in_flight or not pending.empty()):
                    batch = await self._next_batch(pending)
                    if not batch:
                        ended = True
                        break
                    texts = [document.text for document in batch]
                    in_flight.append((batch, loop.run_in_executor(None, self._check, texts)))
                if not in_flight:
                    break
                batch, future = in_flight.popleft()
                try:
                    verdicts = await future
                except Exception as error:  # a bug, not a bad request: keep the traceback
                    log.error("check failed", exc_info=error)
                    await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
                for document, verdict in zip(batch, verdicts, strict=True):
                    self.report.add(
                        verdict, document.group, empty=not document.text.strip(), doc_id=document.id
                    )
                    yield verdict_message(document.id, verdict)
            await reader  # surfaces a failed request stream
        finally:
            reader.cancel()
            for _, future in in_flight:
                future.cancel()

    async def _next_batch(self, pending: asyncio.Queue[pb.Document | None]) -> list[pb.Document]:
        """At least one document (waiting for it), then whatever else is already queued."""
        first = await pending.get()
        if first is None:
            return []
        batch, chars = [first], len(first.text)
        while len(batch) < self.batch_size and chars < decontam.BATCH_CHARS and not pending.empty():
            document = pending.get_nowait()
            if document is None:
                pending.put_nowait(None)  # seen again by the next call, which ends the stream
                break
            batch.append(document)
            chars += len(document.text)
        return batch

    async def Report(self, request: pb.ReportRequest, context: grpc.aio.ServicerContext) -> pb.ReportReply:
        return report_reply(self.report.as_dict())


async def _read_into(
    requests: AsyncIterator[pb.Document], pending: asyncio.Queue[pb.Document | None]
) -> None:
    try:
        async for document in requests:
            await pending.put(document)
    except Exception:
        with contextlib.suppress(asyncio.QueueFull):
            pending.put_nowait(None)  # wake the checker; awaiting the reader raises the error
        raise
    await pending.put(None)  # the end of the stream


# --- the server -------------------------------------------------------------------------------


def build_index(benchmarks: list[str], config: decontam.Config) -> decontam.Index:
    """The index every call shares; raises BenchmarkError for an unknown or unreadable benchmark."""
    if not benchmarks:
        raise evalsets.BenchmarkError("at least one --benchmark is needed")
    return decontam.build_index(evalsets.load_benchmarks(benchmarks), config)


def create_server(
    index: decontam.Index,
    port: int = 0,
    host: str = grpcbase.DEFAULT_HOST,
    checker: decontam.Checker | None = None,
    batch_size: int = decontam.BATCH_SIZE,
    security: grpcbase.ServerSecurity | None = None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A server with the Decontaminator and health services bound to host:port (0: a free port).

    `checker` (the caller's, started before this call and closed after the server stops) spreads
    verification over its processes; without one, batches are checked in threads of this process.
    With `security`, every Decontaminator call needs its bearer token (TLS with a certificate).
    """
    server = grpcbase.new_server(security, options=_CHANNEL_OPTIONS)
    servicer = DecontaminatorServicer(index, batch_size, checker)
    pb_grpc.add_DecontaminatorServicer_to_server(servicer, server)
    health_servicer, bound = grpcbase.bind(server, host, port, security)
    return server, health_servicer, bound


async def serve(
    index: decontam.Index,
    port: int,
    host: str = grpcbase.DEFAULT_HOST,
    workers: int | None = None,
    security: grpcbase.ServerSecurity | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, verifying on `workers` processes (default: every core)."""
    # The processes fork before gRPC starts any thread, and inherit the index.
    checker = decontam.Checker(index, workers)
    try:
        await _serve(index, port, host, checker, security)
    finally:
        checker.close()


async def _serve(
    index: decontam.Index,
    port: int,
    host: str,
    checker: decontam.Checker,
    security: grpcbase.ServerSecurity | None,
) -> None:
    server, health_servicer, bound = create_server(index, port, host, checker, security=security)
    stop = grpcbase.stop_on_signals()
    try:
        await server.start()
        await grpcbase.serving(health_servicer, SERVICE)
        sizes = index.items_per_benchmark()
        log.info(
            "decontaminator listening on %s:%d with %d items (%s), %d checking process(es)",
            host,
            bound,
            len(index.items),
            ", ".join(f"{name} {count}" for name, count in sorted(sizes.items())),
            checker.workers,
            extra={"port": bound},
        )
        await stop.wait()
    finally:
        await grpcbase.shut_down(server, health_servicer, GRACE_SECONDS)
        log.info("decontaminator stopped")


def main(
    benchmarks: list[str],
    config: decontam.Config,
    port: int,
    host: str = grpcbase.DEFAULT_HOST,
    workers: int | None = None,
    security: grpcbase.ServerSecurity | None = None,
) -> int:
    """Build the index (errors surface before anything listens), then serve it."""
    index = build_index(benchmarks, config)
    asyncio.run(serve(index, port, host, workers, security))
    return 0


# --- the client -------------------------------------------------------------------------------


class DecontaminatorError(Exception):
    def __init__(self, code: str, details: str):
        self.code, self.details = code, details
        super().__init__(f"{code}: {details}")


def _document(document: Document) -> pb.Document:
    return pb.Document(id=document.get("id", ""), text=document["text"], group=document.get("group", ""))


async def _documents(documents: Iterable[Document] | AsyncIterable[Document]) -> AsyncIterator[pb.Document]:
    if isinstance(documents, AsyncIterable):
        async for document in documents:
            yield _document(document)
    else:
        for document in documents:
            yield _document(document)


class DecontaminatorClient(grpcbase.Client):
    """`async with DecontaminatorClient("host:port") as c: async for v in c.check(docs): ...`."""

    def __init__(
        self, target: str, timeout: float | None = 60.0, security: grpcbase.ClientSecurity | None = None
    ):
        super().__init__(target, timeout, options=_CHANNEL_OPTIONS, security=security)
        self.stub = pb_grpc.DecontaminatorStub(self.channel)

    async def check(
        self, documents: Iterable[Document] | AsyncIterable[Document]
    ) -> AsyncIterator[dict[str, Any]]:
        """One verdict dict per document, in order; documents are dicts with `text`, `id`, `group`."""
        call = self.stub.Check(_documents(documents), metadata=self.metadata)
        try:
            async for verdict in call:
                yield verdict_dict(verdict)
        except grpc.aio.AioRpcError as error:
            raise DecontaminatorError(error.code().name, error.details() or "") from None
        finally:
            call.cancel()

    async def report(self) -> dict[str, Any]:
        """The server's report so far, as `cosmo decontaminate` writes report.json."""
        try:
            reply = await self.stub.Report(pb.ReportRequest(), timeout=self.timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise DecontaminatorError(error.code().name, error.details() or "") from None
        report: dict[str, Any] = json.loads(reply.report_json)
        return report
