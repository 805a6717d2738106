"""Credentials inside URLs, masked before text leaves the process (statuses, errors, cards).

A URI in a spec or on a command line may carry `user:password@` (an S3 key pair, a NATS or
HTTP password); error messages from storage and network libraries quote such URIs verbatim.
Every place that turns text into something others read — a gRPC status, a CR condition, a
dataset card — passes it through `redact_urls` first, so a secret given in a URI stays where
it was given.
"""

from __future__ import annotations

import re

# `scheme://userinfo@`: everything between `://` and the first `@` before any `/` or space.
_URL_CREDENTIALS = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^\s/@'\"]+@", re.IGNORECASE)
MASK = "***"


def redact_urls(text: str) -> str:
    """`text` with the user, password or token of every URL in it replaced by `***`."""
    return _URL_CREDENTIALS.sub(rf"\1{MASK}@", text)
