"""Fuzz the model server's OpenAPI document with schemathesis, in an interpreter of its own.

Run by `tests/integration/test_modelserver.py` as a child process. In the test session's own
process, threads that earlier tests leave behind (servers, operators) compile templates while
hypothesis and schemathesis compile code on the main thread; CPython 3.11.7 counts the AST
constructor's recursion per interpreter, not per thread (gh-106905), so the two collide into a
SystemError that hypothesis then reports as a flaky test. A fresh interpreter has one thread
that compiles.
"""

from __future__ import annotations

import sys
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from cosmoforge.services.modelserver.app import create_app
from cosmoforge.services.modelserver.canned import Behaviour, CannedEngine

REQUIRED = {"/generate", "/v1/chat/completions", "/v1/completions"}


def main(examples: int) -> int:
    app = create_app(CannedEngine(Behaviour(latency=0.0, tokens=3)))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    missing = REQUIRED - {op.path for op in operations}
    if missing:
        print(f"the OpenAPI document lacks {sorted(missing)}", file=sys.stderr)
        return 1
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case: Any) -> None:
            case.call_and_validate(checks=[schemathesis.checks.not_a_server_error])

        check()
        print(f"{operation.method.upper()} {operation.path}: {examples} examples, no server error")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 15))
