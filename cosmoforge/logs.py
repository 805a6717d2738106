"""Log set-up for the long-running processes: text for people, JSON lines for log pipelines.

On a cluster, logs of many generator pods and the dispatcher end up in one store (Loki,
Elasticsearch, Cloud Logging); one JSON object per line with the run and worker as fields lets
them be filtered without regular expressions. Fields passed with `extra={...}` become keys.
Either way, credentials inside URLs are masked in the written line (`redaction.redact_urls`),
whichever library's message or traceback quoted them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from cosmoforge.redaction import redact_urls

FORMATS = ("text", "json")
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_urls(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_urls(self._json(record))

    def _json(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure(fmt: str = "text", level: int | str = logging.INFO) -> None:
    """Route every logger to stderr in `fmt`; replaces handlers set up before."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; use one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
