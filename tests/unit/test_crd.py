"""The CRD is generated from the spec model: drift fails, and its schema accepts what the model accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS30Validator

from conftest import EXAMPLES, REPO, small_run
from cosmoforge.spec.crd import crd_yaml, custom_resource_definition
from cosmoforge.spec.model import parse_run

CRD_FILE = REPO / "manifests" / "crds" / "generationruns.yaml"


def _schema() -> dict[str, Any]:
    return custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crd_matches_the_model() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), (
        "CRD drifted from cosmoforge.spec.model: run `make crd` and commit it"
    )


def test_crd_names_status_and_printer_columns() -> None:
    crd = custom_resource_definition()
    assert crd["metadata"]["name"] == "generationruns.cosmoforge.io"
    assert crd["spec"]["names"]["shortNames"] == ["gr"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Tokens/s"] == ".status.tokensPerSecond"


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_schema_is_structural() -> None:
    """Kubernetes rejects refs, unions and missing types in CRD schemas."""
    for node in _walk(_schema()):
        if "properties" in node or "items" in node:
            assert "type" in node
        assert not {"$ref", "anyOf", "oneOf", "allOf", "const", "title", "$defs"} & set(node)
        assert not ("properties" in node and "additionalProperties" in node)


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: Path(p).name)
def test_examples_validate_against_the_crd_schema(example: Path) -> None:
    OAS30Validator(_schema()).validate(yaml.safe_load(example.read_text()))


def test_crd_schema_rejects_what_the_model_rejects() -> None:
    document = small_run()
    validator = OAS30Validator(_schema())
    validator.validate(document)
    parse_run(document)
    for path, value in [
        (("spec", "generation", "maxNewTokens"), 0),
        (("spec", "prompts", "topicConditioning"), 1.5),
        (("spec", "generation", "engine"), "ollama"),
        (("spec", "seeds"), []),
        (("spec", "postprocess", "decontaminate", "workers"), 0),
    ]:
        bad = yaml.safe_load(yaml.safe_dump(document))
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert not validator.is_valid(bad), path
