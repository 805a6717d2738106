"""JSON schemas in TGI's and OpenAI's wire formats, turned into llama.cpp grammars.

Constrained decoding is part of those APIs, and a small model needs it most: a JSON schema in
TGI's `grammar` parameter (`/generate`) or in `response_format` (chat, in TGI's and in OpenAI's
and vLLM's spelling) becomes GBNF text, so the answer is JSON of that shape whatever the model
would have said. A schema the server cannot honour is refused with 422, as TGI does. Pure
functions: the engines take the GBNF text and do not care where it came from.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from cosmoforge.services.modelserver.engine import GrammarError

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
# An integer range with at most this many values is decoded as the list of its values (below).
MAX_ENUMERATED_RANGE = 1000


def schema_from_grammar(grammar: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema in TGI's `parameters.grammar` on `/generate`, or None for free text.

    TGI's shape is `{"type": "json", "value": <schema>}` (`json_object` is an alias) or
    `{"type": "json_schema", "value": {"name": ..., "schema": <schema>}}`; `regex` is TGI's too
    but has no llama.cpp equivalent here, so it is refused rather than ignored.
    """
    if grammar is None:
        return None
    kind = grammar.get("type")
    if kind in ("json", "json_object"):
        if "value" not in grammar:
            raise GrammarError(f"grammar of type {kind!r} needs a JSON schema in 'value'")
        return _schema(grammar["value"])
    if kind == "json_schema":
        return _named_schema(grammar.get("value"), "value")
    if kind == "regex":
        raise GrammarError("regex grammars are not supported by the embedded model; send a JSON schema")
    raise GrammarError(f"unknown grammar type {kind!r}: expected 'json', 'json_object' or 'json_schema'")


def schema_from_response_format(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema in a chat request's `response_format`, in any of the spellings in use.

    - OpenAI and vLLM: `{"type": "json_schema", "json_schema": {"name": ..., "schema": ...}}`;
      `{"type": "json_object"}` (JSON mode: any object); `{"type": "text"}` (no constraint).
    - TGI: `{"type": "json_object" | "json", "value": <schema>}` and
      `{"type": "json_schema", "value": {"name": ..., "schema": ...}}`.
    - llama-cpp-python's server: `{"type": "json_object", "schema": <schema>}`.
    """
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind in ("json_object", "json"):
        for key in ("value", "schema"):
            if key in response_format:
                return _schema(response_format[key])
        return ANY_JSON_OBJECT
    if kind == "json_schema":
        if "json_schema" in response_format:
            return _named_schema(response_format["json_schema"], "json_schema")
        return _named_schema(response_format.get("value"), "value")
    if kind == "regex":
        raise GrammarError("regex grammars are not supported by the embedded model; send a JSON schema")
    raise GrammarError(
        f"unknown response_format type {kind!r}: expected 'text', 'json_object', 'json' or 'json_schema'"
    )


def _named_schema(config: Any, field: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise GrammarError(f"response_format of type 'json_schema' needs an object in {field!r}")
    return _schema(config["schema"]) if "schema" in config else ANY_JSON_OBJECT


def _schema(value: Any) -> dict[str, Any]:
    """A JSON schema given as an object or as JSON text (TGI takes both), checked for validity."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise GrammarError(f"grammar is not valid: not JSON: {error}") from None
    if not isinstance(value, dict):
        raise GrammarError(f"grammar is not valid: a JSON schema is an object, not {type(value).__name__}")
    try:
        import jsonschema
    except ImportError:  # not a dependency of the embedded model; the converter below still checks
        return value
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as error:
        raise GrammarError(f"grammar is not valid: {error.message}") from None
    except (TypeError, LookupError) as error:  # e.g. an unhashable "$schema"; still the client's input
        raise GrammarError(f"grammar is not valid: {error}") from None
    return value


def grammar_for_schema(schema: dict[str, Any] | None) -> str | None:
    """GBNF text that only lets a model write JSON valid under `schema` (None: no constraint)."""
    # Key order is kept: the grammar writes properties in the schema's order, and a model that
    # names the topic before it scores it answers differently from one that scores first.
    return None if schema is None else _gbnf(json.dumps(_enumerate_integer_ranges(schema)))


# The converter's string character admits raw control characters (a newline inside a string),
# which JSON forbids and strict parsers reject; llama.cpp's own C++ converter excludes them.
_LOOSE_CHAR = r'char ::= [^"\\] |'
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


@functools.lru_cache(maxsize=64)
def _gbnf(schema_text: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(schema_text)
    except Exception as error:  # the converter signals bad input with asserts, KeyErrors, ...
        raise GrammarError(f"grammar is not valid: {error or type(error).__name__}") from None
    return gbnf.replace(_LOOSE_CHAR, _STRICT_CHAR)


def _enumerate_integer_ranges(node: Any) -> Any:
    """Bounded integers as enums: llama.cpp's converter ignores minimum and maximum.

    `{"type": "integer", "minimum": 0, "maximum": 10}` admits the same JSON as
    `{"enum": [0, 1, ..., 10]}`, which the converter does turn into a grammar. Wider ranges
    (over `MAX_ENUMERATED_RANGE` values) keep their bounds unenforced, as the converter leaves them.
    """
    if isinstance(node, list):
        return [_enumerate_integer_ranges(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _enumerate_integer_ranges(value) for key, value in node.items()}
    if node.get("type") != "integer" or "enum" in node or "const" in node:
        return node
    low, high = _integer_bounds(node)
    if low is None or high is None:
        return node
    if low > high:
        raise GrammarError(f"grammar is not valid: no integer lies between {low} and {high}")
    if high - low >= MAX_ENUMERATED_RANGE:
        return node
    kept = {key: value for key, value in node.items() if key in ("title", "description")}
    return {**kept, "enum": list(range(low, high + 1))}


def _integer_bounds(node: dict[str, Any]) -> tuple[int | None, int | None]:
    def number(key: str) -> float | None:
        value = node.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    low_values = [v for v in (number("minimum"), _plus(number("exclusiveMinimum"), 1e-9)) if v is not None]
    high_values = [v for v in (number("maximum"), _plus(number("exclusiveMaximum"), -1e-9)) if v is not None]
    low = math.ceil(max(low_values)) if low_values else None
    high = math.floor(min(high_values)) if high_values else None
    return low, high


def _plus(value: float | None, delta: float) -> float | None:
    return None if value is None else value + delta
