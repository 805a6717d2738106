"""The operator's settings, read from its environment once, when the operator starts.

The chart sets them as environment variables; reading them at start-up into one frozen value
(rather than at import) lets tests build the settings they want and hand them to
`handlers.registry`, with no environment to set before an import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cosmoforge.operator.render import Platform

DEFAULT_INTERVAL = 10.0


@dataclass(frozen=True)
class OperatorSettings:
    """`platform`: what children need beyond the spec (the image of each role among them);
    `interval`: seconds between reconciles of a run (autoscaling, status roll-up, the next
    stage); `post_events`: Kubernetes Events."""

    platform: Platform = field(default_factory=Platform)
    interval: float = DEFAULT_INTERVAL
    post_events: bool = True

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"the reconcile interval must be positive, got {self.interval}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if environ is None else environ
        interval = env.get("COSMO_OPERATOR_INTERVAL", "").strip()
        return cls(
            platform=Platform.from_env(env),
            interval=float(interval) if interval else DEFAULT_INTERVAL,
            post_events=env.get("COSMO_OPERATOR_EVENTS", "1").strip() != "0",
        )
