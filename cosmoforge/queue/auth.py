"""NATS credentials: read from the environment (a Kubernetes Secret's keys), never from a URL.

A password in `nats://user:pass@host` ends up wherever the URL goes: ConfigMaps, container
arguments, log lines, CR status. So the chart and the operator pass the URL bare and the
credentials as environment variables from a Secret, and every place that prints a URL prints
`redact(url)`. nats-py takes the credentials as connect options; `connect_options()` builds
them, so each caller of `nats.connect` adds the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

USER_ENV = "COSMO_NATS_USER"
PASSWORD_ENV = "COSMO_NATS_PASSWORD"
TOKEN_ENV = "COSMO_NATS_TOKEN"
CREDS_ENV = "COSMO_NATS_CREDS"  # a path: a NATS .creds file (JWT + nkey seed), for operator-mode servers
ENV_NAMES = (USER_ENV, PASSWORD_ENV, TOKEN_ENV, CREDS_ENV)


def connect_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """nats-py `connect()` options for the credentials set in the environment (none: {})."""
    env = os.environ if environ is None else environ
    user, password = env.get(USER_ENV, "").strip(), env.get(PASSWORD_ENV, "")
    token, creds = env.get(TOKEN_ENV, "").strip(), env.get(CREDS_ENV, "").strip()
    options: dict[str, Any] = {}
    if user:
        options["user"], options["password"] = user, password
    if token:
        options["token"] = token
    if creds:
        options["user_credentials"] = creds
    return options


def has_credentials(url: str) -> bool:
    """Whether any of the comma-separated server URLs carries a user, password or token."""
    return any(urlsplit(part.strip()).netloc.rpartition("@")[1] for part in url.split(","))


def redact(url: str) -> str:
    """The URL(s) with any user, password or token replaced by `***`, for logs, status and errors."""
    parts = []
    for part in url.split(","):
        split = urlsplit(part.strip())
        _, at, host = split.netloc.rpartition("@")
        if at:
            split = split._replace(netloc=f"***@{host}")
        parts.append(urlunsplit(split))
    return ",".join(parts)
