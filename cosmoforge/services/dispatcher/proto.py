"""The generated gRPC messages and stubs, plus the conversions between them and plain data.

Importing this module makes sure the generated code exists and matches `protos/` (see
`cosmoforge.services.protogen`); everything else in the dispatcher imports the messages from here.
Conversions live here so that the server and the client agree on them by construction.
"""

from __future__ import annotations

from typing import Any

from cosmoforge.services.protogen import ensure_generated

ensure_generated()

from cosmoforge._proto.v1 import dispatcher_pb2 as pb  # noqa: E402
from cosmoforge._proto.v1 import dispatcher_pb2_grpc as pb_grpc  # noqa: E402
from cosmoforge.redaction import redact_urls  # noqa: E402
from cosmoforge.runs.status import RunStatus  # noqa: E402

__all__ = [
    "PROBLEMS_KEY",
    "SERVICE",
    "pb",
    "pb_grpc",
    "problems_from_metadata",
    "problems_metadata",
    "to_dict",
    "to_message",
]

SERVICE = "cosmoforge.v1.Dispatcher"
# Binary trailing metadata carrying a SpecProblems message on INVALID_ARGUMENT.
PROBLEMS_KEY = "cosmoforge-spec-problems-bin"

_PHASES = {
    "Pending": pb.PHASE_PENDING,
    "Generating": pb.PHASE_GENERATING,
    "Succeeded": pb.PHASE_SUCCEEDED,
    "Failed": pb.PHASE_FAILED,
    "Cancelled": pb.PHASE_CANCELLED,
}
_PHASE_NAMES = {number: name for name, number in _PHASES.items()}


def to_message(status: RunStatus) -> pb.RunStatus:
    """The status as sent: its free text (messages, error reasons) with URL credentials masked."""
    data = status.to_dict()
    data["message"] = redact_urls(data["message"])
    data["errors"] = {redact_urls(reason): count for reason, count in data["errors"].items()}
    data["phase"] = _PHASES.get(status.phase, pb.PHASE_UNSPECIFIED)
    return pb.RunStatus(**data)


def to_dict(message: pb.RunStatus) -> dict[str, Any]:
    """A RunStatus message as a plain dict with the field names of `state.RunStatus`."""
    status = RunStatus(
        run=message.run,
        phase=_PHASE_NAMES.get(message.phase, "Unknown"),
        prompts=message.prompts,
        already_done=message.already_done,
        published=message.published,
        generated=message.generated,
        failed=message.failed,
        queued=message.queued,
        in_flight=message.in_flight,
        tokens=message.tokens,
        tokens_per_second=message.tokens_per_second,
        output_uri=message.output_uri,
        message=message.message,
        errors=dict(message.errors),
        started_at=message.started_at,
        updated_at=message.updated_at,
    )
    return status.to_dict()


def problems_metadata(problems: list[tuple[str, str]]) -> tuple[tuple[str, bytes], ...]:
    message = pb.SpecProblems(problems=[pb.SpecProblem(field=f, reason=r) for f, r in problems])
    return ((PROBLEMS_KEY, message.SerializeToString()),)


def problems_from_metadata(metadata: Any) -> list[tuple[str, str]]:
    for key, value in metadata or ():
        if key == PROBLEMS_KEY and isinstance(value, bytes):
            message = pb.SpecProblems.FromString(value)
            return [(problem.field, problem.reason) for problem in message.problems]
    return []
