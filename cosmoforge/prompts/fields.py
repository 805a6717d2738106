"""Field paths: how a spec names a value inside a seed row, nested or not.

Real instruction datasets nest what a recipe needs: OpenHermes-2.5 keeps its turns in
`conversations`, a list of `{from, value}` records whose first turn is sometimes a system
prompt; UltraChat keeps its turns in `data`, a list of strings. A field path reaches into them:

- `meta.title`: a key of a record (a struct column, a JSON object);
- `data[0]`, `data[-1]`: an item of a list, counted from the end when negative;
- `conversations[from=human].value`: the first item of a list whose key `from` equals `human`.

Parsing is separate from evaluating so that a spec's paths are checked once, when it is
validated, and each row costs only a walk over a few steps.

When the data cannot have the value, `resolve` raises `FieldMissing` naming what exists there
(a key that no row of a parquet file can have is a spec mistake); when this row simply has
none (a null on the way, a list too short, no item matching a selector) the value is None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

_NAME = r"[^.\[\]=]+"
_STEP = re.compile(rf"\.({_NAME})|\[(-?\d+)\]|\[({_NAME})=([^\]]*)\]")


class FieldPathError(ValueError):
    """A field path that does not parse; the message says where."""


class FieldMissing(LookupError):
    """A key the data does not have at all; `available` lists the keys that exist there."""

    def __init__(self, path: str, at: str, available: list[str]):
        self.path, self.at, self.available = path, at, available
        where = f"{at!r} in {path!r}" if at != path else repr(path)
        super().__init__(f"field {where} missing (has: {', '.join(available) or 'nothing'})")


@dataclass(frozen=True)
class Key:
    name: str


@dataclass(frozen=True)
class Index:
    position: int


@dataclass(frozen=True)
class Select:
    """The first list item whose `key` reads as `value`."""

    key: str
    value: str


Step = Key | Index | Select


@dataclass(frozen=True)
class FieldPath:
    text: str
    steps: tuple[Step, ...]

    @property
    def column(self) -> str:
        """The top-level column the path starts at."""
        first = self.steps[0]
        assert isinstance(first, Key)
        return first.name

    @property
    def is_column(self) -> bool:
        return len(self.steps) == 1


@cache
def parse(text: str) -> FieldPath:
    """`text` as steps; FieldPathError names the character where it stops making sense."""
    head = re.match(_NAME, text)
    if head is None:
        raise FieldPathError(f"field path {text!r} must start with a column name")
    steps: list[Step] = [Key(head.group(0).strip())]
    position = head.end()
    while position < len(text):
        match = _STEP.match(text, position)
        if match is None:
            raise FieldPathError(
                f"field path {text!r}: cannot read {text[position:]!r} at character {position + 1}; "
                "use name.key, name[0] or name[key=value]"
            )
        key, index, select_key, select_value = match.groups()
        if key is not None:
            steps.append(Key(key.strip()))
        elif index is not None:
            steps.append(Index(int(index)))
        else:
            steps.append(Select(select_key.strip(), select_value.strip()))
        position = match.end()
    return FieldPath(text, tuple(steps))


def _spell(steps: tuple[Step, ...]) -> str:
    out = ""
    for step in steps:
        if isinstance(step, Key):
            out += f".{step.name}" if out else step.name
        elif isinstance(step, Index):
            out += f"[{step.position}]"
        else:
            out += f"[{step.key}={step.value}]"
    return out


def _matches(item: Any, select: Select) -> bool:
    if not isinstance(item, dict) or item.get(select.key) is None:
        return False
    value = item[select.key]
    if isinstance(value, bool):  # str(True) is "True"; specs write true
        return select.value.lower() == str(value).lower()
    return str(value) == select.value


def resolve(path: FieldPath | str, row: Any) -> Any:
    """The value `path` names in `row`, or None where this row has none."""
    path = parse(path) if isinstance(path, str) else path
    value = row
    for number, step in enumerate(path.steps):
        if value is None:
            return None
        if isinstance(step, Key):
            if not isinstance(value, dict):
                raise FieldMissing(path.text, _spell(path.steps[: number + 1]), [])
            if step.name not in value:
                raise FieldMissing(path.text, _spell(path.steps[: number + 1]), sorted(value))
            value = value[step.name]
        elif not isinstance(value, list | tuple):
            kind = type(value).__name__
            raise FieldMissing(path.text, _spell(path.steps[: number + 1]), [f"a {kind}, not a list"])
        elif isinstance(step, Index):
            if not -len(value) <= step.position < len(value):
                return None
            value = value[step.position]
        else:
            value = next((item for item in value if _matches(item, step)), None)
    return value
