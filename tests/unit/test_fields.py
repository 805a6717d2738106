"""Field paths: parsing, and evaluation over rows shaped like the real instruction datasets."""

from __future__ import annotations

import pytest

from cosmoforge.prompts.fields import FieldMissing, FieldPathError, Index, Key, Select, parse, resolve

HERMES = {
    "conversations": [
        {"from": "system", "value": "You are helpful.", "weight": None},
        {"from": "human", "value": "Why is the sky blue?", "weight": 0.0},
        {"from": "gpt", "value": "Rayleigh scattering.", "weight": 1.0},
        {"from": "human", "value": "And sunsets?", "weight": 0.0},
    ],
    "source": "airoboros2.2",
    "meta": {"title": "Sky", "tags": ["physics", "light"], "score": 3},
}


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("text", (Key("text"),)),
        ("meta.title", (Key("meta"), Key("title"))),
        ("data[0]", (Key("data"), Index(0))),
        ("data[-1]", (Key("data"), Index(-1))),
        ("conversations[0].value", (Key("conversations"), Index(0), Key("value"))),
        ("conversations[from=human].value", (Key("conversations"), Select("from", "human"), Key("value"))),
        ("a.b[2][key=some value].c", (Key("a"), Key("b"), Index(2), Select("key", "some value"), Key("c"))),
    ],
)
def test_paths_parse_into_steps(text: str, steps: tuple[object, ...]) -> None:
    path = parse(text)
    assert path.steps == steps and path.column == steps[0].name  # type: ignore[attr-defined]
    assert path.is_column == (len(steps) == 1)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("", "must start with a column name"),
        ("[0]", "must start with a column name"),
        ("data[", "cannot read '[' at character 5"),
        ("data[x]", "cannot read '[x]' at character 5"),
        ("data.", "cannot read '.' at character 5"),
        ("a]b", "cannot read ']b' at character 2"),
    ],
)
def test_bad_paths_say_where(text: str, where: str) -> None:
    with pytest.raises(FieldPathError, match=where.replace("[", r"\[")):
        parse(text)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("source", "airoboros2.2"),
        ("meta.title", "Sky"),
        ("meta.tags[1]", "light"),
        ("meta.tags[-1]", "light"),
        ("conversations[0].value", "You are helpful."),
        ("conversations[from=human].value", "Why is the sky blue?"),  # the first human turn only
        ("conversations[from=gpt].weight", 1.0),
        ("meta.score", 3),
    ],
)
def test_values_are_found(path: str, value: object) -> None:
    assert resolve(path, HERMES) == value


@pytest.mark.parametrize(
    "path",
    [
        "meta.tags[5]",  # list too short in this row
        "conversations[from=tool].value",  # no such turn in this row
        "conversations[0].weight",  # a null value
        "conversations[0].weight.x",  # a null on the way stops the walk
    ],
)
def test_what_a_row_lacks_reads_as_none(path: str) -> None:
    assert resolve(path, HERMES) is None


def test_selector_compares_booleans_and_numbers_as_written() -> None:
    row = {"turns": [{"ok": False, "n": 1, "v": "a"}, {"ok": True, "n": 2, "v": "b"}]}
    assert resolve("turns[ok=true].v", row) == "b"
    assert resolve("turns[n=1].v", row) == "a"
    assert resolve("turns[n=3].v", row) is None


def test_what_the_data_cannot_have_names_what_exists() -> None:
    with pytest.raises(FieldMissing) as caught:
        resolve("conversation[0].value", HERMES)
    assert str(caught.value) == (
        "field 'conversation' in 'conversation[0].value' missing (has: conversations, meta, source)"
    )
    with pytest.raises(FieldMissing, match=r"^field 'meta.name' missing \(has: score, tags, title\)$"):
        resolve("meta.name", HERMES)
    with pytest.raises(
        FieldMissing, match=r"^field 'conversations\[1\].text' missing \(has: from, value, weight\)"
    ):
        resolve("conversations[1].text", HERMES)
    with pytest.raises(FieldMissing, match="a str, not a list"):
        resolve("source[0]", HERMES)
