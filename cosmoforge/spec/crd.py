"""Derive the GenerationRun CustomResourceDefinition from the pydantic model.

The CRD is never edited by hand: `cosmo crd` writes it, and a test fails when the checked-in copy
differs from what the model produces. Pydantic emits JSON Schema 2020-12; Kubernetes wants a
structural OpenAPI v3.0 schema, so references are inlined, nullable unions are flattened and
JSON-Schema-only keywords are translated or dropped.
"""

from __future__ import annotations

from typing import Any

import yaml

from cosmoforge.spec.model import API_GROUP, API_VERSION, KIND, GenerationRunSpec, GenerationRunStatus

PLURAL = "generationruns"
SHORT_NAMES = ["gr"]

# Keywords a structural schema accepts; everything else pydantic emits is dropped.
_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "format",
    "nullable",
    "exclusiveMinimum",
    "exclusiveMaximum",
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return _resolve(merged, defs)
        return {key: _resolve(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    return node


def _structural(schema: dict[str, Any]) -> dict[str, Any]:
    schema = dict(schema)
    for union in ("anyOf", "oneOf"):
        if union in schema:
            members = schema.pop(union)
            options = [option for option in members if option.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express a union of {len(options)} types in a CRD schema")
            schema = {**options[0], **schema}
            if len(options) < len(members):
                schema["nullable"] = True
    if "const" in schema:
        schema["enum"] = [schema.pop("const")]
    if "allOf" in schema and len(schema["allOf"]) == 1:
        schema = {**schema.pop("allOf")[0], **schema}
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in schema and not isinstance(schema[bound], bool):
            schema["minimum" if bound == "exclusiveMinimum" else "maximum"] = schema[bound]
            schema[bound] = True
    if "enum" in schema and "type" not in schema:
        schema["type"] = "string"
    if schema.get("default") is None:
        schema.pop("default", None)

    result = {key: value for key, value in schema.items() if key in _KEEP}
    if "properties" in schema:
        result["type"] = "object"
        result["properties"] = {name: _structural(sub) for name, sub in schema["properties"].items()}
        required = [
            name for name in schema.get("required", []) if "default" not in schema["properties"][name]
        ]
        if required:
            result["required"] = required
    elif isinstance(schema.get("additionalProperties"), dict):
        result["type"] = "object"
        result["additionalProperties"] = _structural(schema["additionalProperties"])
    elif schema.get("type") == "object" or "type" not in result:
        result["type"] = "object"
        result["x-kubernetes-preserve-unknown-fields"] = True
    if "items" in schema:
        result["items"] = _structural(schema["items"])
    return result


def openapi_schema(model: type[Any]) -> dict[str, Any]:
    """A structural OpenAPI v3.0 schema for a pydantic model, as Kubernetes accepts it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs))


def custom_resource_definition() -> dict[str, Any]:
    spec_schema = openapi_schema(GenerationRunSpec)
    status_schema = openapi_schema(GenerationRunStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": ["cosmoforge"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
                        {"name": "Generated", "type": "integer", "jsonPath": ".status.generated"},
                        {"name": "Tokens/s", "type": "number", "jsonPath": ".status.tokensPerSecond"},
                        {"name": "ETA", "type": "string", "jsonPath": ".status.eta"},
                        {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
                        {
                            "name": "GPU-hours",
                            "type": "number",
                            "priority": 1,
                            "jsonPath": ".status.spend.gpuHours",
                        },
                        {"name": "Cost", "type": "number", "priority": 1, "jsonPath": ".status.spend.cost"},
                        {
                            "name": "Loss",
                            "type": "number",
                            "priority": 1,
                            "jsonPath": ".status.training.loss",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A synthetic-data generation run after the Cosmopedia recipe.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated from cosmoforge.spec.model by `cosmo crd`; do not edit by hand.\n"
    return header + yaml.safe_dump(custom_resource_definition(), sort_keys=False, width=100)
