"""Spec problems as one short line for places many people read: CR conditions, Events, gRPC
status details and logs.

A problem's reason may come from a parser that quotes what it read (a seed row, a URL with a
password in it). Everyone who can list Events in a namespace reads a condition, so what goes
there is cut to the first line of each reason, a bounded length and a bounded count, and
credentials in URLs and `key=value` secrets are masked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cosmoforge.redaction import MASK, redact_urls

MAX_REASON_CHARS = 200
MAX_PROBLEMS = 8
MAX_MESSAGE_CHARS = 1024

_SECRET_PAIR = re.compile(
    r"(?i)(?P<key>[\w.-]*(?:token|password|passwd|secret|api[_-]?key|access[_-]?key|credential)[\w.-]*)"
    r"(?P<sep>\s*[=:]\s*)(?P<value>[^\s&;,'\"]+)"
)


def redact(text: str) -> str:
    """`text` with URL credentials and `token=...`-style values masked."""
    return _SECRET_PAIR.sub(lambda m: f"{m.group('key')}{m.group('sep')}{MASK}", redact_urls(text))


def short_reason(reason: str) -> str:
    """The first line of a reason, masked and cut to MAX_REASON_CHARS."""
    lines = reason.strip().splitlines()
    line = redact(lines[0].strip() if lines else "invalid")
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 3] + "..."


def summary(problems: Sequence[tuple[str, str]]) -> str:
    """`field: reason; field: reason; ... (and N more)`, at most MAX_MESSAGE_CHARS long."""
    shown = [f"{short_reason(field)}: {short_reason(reason)}" for field, reason in problems[:MAX_PROBLEMS]]
    text = "; ".join(shown)
    more = f" (and {len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
    room = MAX_MESSAGE_CHARS - len(more)
    return (text if len(text) <= room else text[: room - 3] + "...") + more
