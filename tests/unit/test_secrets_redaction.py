"""No secret given to cosmoforge comes back out: not in a manifest, an error, a status or a card.

Each secret here is a distinct string; every place a secret could leak to (rendered children,
chart output, gRPC statuses, render errors) is searched for all of them.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from conftest import small_run
from cosmoforge.operator.render import Platform, RenderError, render_all
from cosmoforge.redaction import redact_urls
from cosmoforge.runs.status import RunStatus
from cosmoforge.services.dispatcher.proto import to_dict, to_message
from cosmoforge.services.dispatcher.server import failure_for
from cosmoforge.spec.model import SpecError, parse_run

NATS_PASSWORD = "nats-pw-Zq81"
S3_SECRET = "s3-secret-Lk02"
API_PASSWORD = "api-pw-Rt55"
SECRETS = (NATS_PASSWORD, S3_SECRET, API_PASSWORD)


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"s3://AKIA:{S3_SECRET}@bucket/key", "s3://***@bucket/key"),
        (f"cannot open 'https://bob:{API_PASSWORD}@llm/v1': 401", "cannot open 'https://***@llm/v1': 401"),
        (
            f"nats://{NATS_PASSWORD}@nats:4222 and tls://u:{NATS_PASSWORD}@n2",
            "nats://***@nats:4222 and tls://***@n2",
        ),
        ("user@example.com wrote s3://bucket/a@b", "user@example.com wrote s3://bucket/a@b"),
    ],
)
def test_redact_urls_masks_userinfo_only(text: str, masked: str) -> None:
    assert redact_urls(text) == masked


def _run(**changes: Any) -> Any:
    document = small_run("leak", engine="tgi", gpusPerReplica=1)
    document["metadata"]["namespace"] = "gen"
    for path, value in changes.items():
        node = document["spec"]
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return parse_run(document)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"output": {"uri": f"s3://AKIA:{S3_SECRET}@bucket/runs"}}, "spec.output.uri"),
        (
            {
                "generation.engine": "openai",
                "generation.endpoint": f"https://bob:{API_PASSWORD}@llm.example.com/v1",
            },
            "spec.generation.endpoint",
        ),
    ],
)
def test_credentials_in_spec_uris_never_reach_a_manifest(changes: dict[str, Any], field: str) -> None:
    platform = Platform(output_base="s3://datasets/runs", nats_secret="nats-auth", storage_secret="s3")
    with pytest.raises(RenderError) as refused:
        render_all(_run(**changes), platform)
    assert refused.value.field == field
    assert not leaks(str(refused.value))


def test_rendered_children_name_secrets_and_hold_none() -> None:
    platform = Platform(output_base="s3://datasets/runs", nats_secret="nats-auth", storage_secret="s3")
    document = small_run("leak", engine="tgi", gpusPerReplica=1)
    document["metadata"]["namespace"] = "gen"
    document["spec"]["generation"]["serving"] = {"hfTokenSecret": {"name": "hf", "key": "token"}}
    document["spec"]["postprocess"] = {"decontaminate": {"workers": 2}}
    manifests = render_all(parse_run(document), platform)
    text = yaml.safe_dump_all(manifests)
    assert not leaks(text)
    generator = next(m for m in manifests if m["metadata"]["name"] == "leak-generator")
    container = generator["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "nats-auth"}} in container["envFrom"]
    # Only the pods that talk to NATS get its credentials.
    server = next(
        m for m in manifests if m["metadata"]["name"] == "leak-inference" and m["kind"] == "Deployment"
    )
    assert "envFrom" not in server["spec"]["template"]["spec"]["containers"][0]
    with pytest.raises(ValueError, match="credentials") as refused:
        Platform(nats_url=f"nats://cosmo:{NATS_PASSWORD}@nats:4222")
    assert not leaks(str(refused.value))


def test_statuses_and_errors_sent_over_grpc_are_masked() -> None:
    status = RunStatus(
        run="leak",
        phase="Failed",
        message=f"cannot read s3://AKIA:{S3_SECRET}@bucket/seeds.jsonl",
        errors={f"connection to https://bob:{API_PASSWORD}@llm/v1 refused": 3},
    )
    sent = to_dict(to_message(status))
    assert not leaks(repr(sent))
    assert "s3://***@bucket/seeds.jsonl" in sent["message"]
    for error in (
        OSError(f"nats://cosmo:{NATS_PASSWORD}@nats:4222 unreachable"),
        SpecError("leak", [("spec.seeds[0].uri", f"cannot open s3://AKIA:{S3_SECRET}@bucket/x")]),
    ):
        failure = failure_for(error)
        assert not leaks(failure.details) and not leaks(repr(failure.trailers))
