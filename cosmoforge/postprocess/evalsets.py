"""Evaluation benchmarks as decontamination sees them.

Decontamination is only as good as its idea of a "benchmark sample": the text a model is
scored on. For each benchmark this module fixes which split is evaluated and which fields,
put together, make that text: the question (or context) plus the text of the correct answer,
because a document that holds both gives the answer away.

| name          | Hub id, config                     | split      | benchmark sample                      |
|---------------|------------------------------------|------------|---------------------------------------|
| mmlu          | cais/mmlu, all                     | test       | question + choices[answer]            |
| hellaswag     | Rowan/hellaswag                    | validation | ctx + endings[label], [step] marks cut |
| piqa          | ybisk/piqa, plain_text             | validation | goal + sol1/sol2 (label 0/1)          |
| siqa          | allenai/social_i_qa                | validation | context + question + answerA/B/C (1-3) |
| winogrande    | allenai/winogrande, winogrande_xl  | validation | sentence, "_" := option1/2 (answer)   |
| openbookqa    | allenai/openbookqa, main           | test       | question_stem + choice of answerKey   |
| arc_easy      | allenai/ai2_arc, ARC-Easy          | test       | question + choice of answerKey        |
| arc_challenge | allenai/ai2_arc, ARC-Challenge     | test       | question + choice of answerKey        |
| boolq         | google/boolq                       | validation | passage + question + "yes"/"no"       |

A row without a usable answer (an unlabeled test row) contributes its question alone, which is
still text the model is tested on. Benchmarks come from the Hub by name, or from local files:

- `PATH` in a benchmark's real schema (the columns above): a file named after a benchmark
  (`arc_easy.jsonl`) is that benchmark; otherwise the schema is recognised from the columns
  and names the benchmark (`arc` for the ARC schema, shared by both sets);
- `NAME=PATH` to name the benchmark and, when NAME is a known benchmark, insist on its schema;
- any parquet/jsonl file with a `text` column (the sample as is) and an optional `task_name`
  column naming each row's benchmark (else the file's stem, or NAME).

Files are whatever `cosmoforge.tables` reads: parquet, jsonl/json, csv, Arrow IPC, or a
`datasets.save_to_disk` folder, on local disk or any fsspec URI.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa

from cosmoforge import tables
from cosmoforge.postprocess.decontam import BenchmarkItem, DecontamError
from cosmoforge.tables import TableError


class InputError(TableError, DecontamError):
    """An input file or column that cannot be used as given; the CLI prints it as one line."""


class BenchmarkError(InputError):
    """An unknown benchmark name, or a benchmark file that cannot be read as one."""


Row = Mapping[str, Any]


# --- what a benchmark sample is --------------------------------------------------------------


def _join(*parts: object) -> str:
    return " ".join(str(p).strip() for p in parts if p is not None and str(p).strip())


def _pick(options: Sequence[Any], position: int | None) -> Any:
    return options[position] if position is not None and 0 <= position < len(options) else None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _keyed_choice(choices: Mapping[str, Sequence[str]] | None, key: Any) -> str | None:
    if not choices or key is None:
        return None
    labels = [str(label).strip() for label in choices.get("label") or []]
    texts = list(choices.get("text") or [])
    key = str(key).strip()
    if key in labels:
        return str(_pick(texts, labels.index(key)))
    # Some ARC rows use 1-4 where others use A-D.
    if key.isdigit() and labels and labels[0].isalpha():
        return _pick(texts, int(key) - 1)
    return None


_LETTERS = {letter: number for number, letter in enumerate("ABCDEFGH")}


def _mmlu(row: Row) -> str:
    answer = row.get("answer")
    position = (
        _LETTERS[answer.strip()]
        if isinstance(answer, str) and answer.strip() in _LETTERS
        else _as_int(answer)
    )
    return _join(row.get("question"), _pick(list(row.get("choices") or []), position))


_WIKIHOW_MARK = re.compile(r"\[[^\]]*\]")


def _hellaswag_text(text: str) -> str:
    # WikiHow rows carry "[title]" / "[step]" / "[header]" marks that evaluation strips
    # before showing the text; a copy of the text would not have them either.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\s+", " ", _WIKIHOW_MARK.sub("", text)).strip()


def _hellaswag(row: Row) -> str:
    ctx = row.get("ctx") or _join(row.get("ctx_a"), row.get("ctx_b"))
    ending = _pick(list(row.get("endings") or []), _as_int(row.get("label")))
    return _hellaswag_text(_join(ctx, ending))


def _piqa(row: Row) -> str:
    return _join(row.get("goal"), _pick([row.get("sol1"), row.get("sol2")], _as_int(row.get("label"))))


def _siqa(row: Row) -> str:
    label = _as_int(row.get("label"))
    answers = [row.get("answerA"), row.get("answerB"), row.get("answerC")]
    return _join(
        row.get("context"), row.get("question"), _pick(answers, None if label is None else label - 1)
    )


def _winogrande(row: Row) -> str:
    sentence = str(row.get("sentence") or "")
    answer = _as_int(row.get("answer"))
    option = _pick([row.get("option1"), row.get("option2")], None if answer is None else answer - 1)
    return _join(sentence.replace("_", str(option), 1) if option is not None else sentence)


def _openbookqa(row: Row) -> str:
    return _join(row.get("question_stem"), _keyed_choice(row.get("choices"), row.get("answerKey")))


def _arc(row: Row) -> str:
    return _join(row.get("question"), _keyed_choice(row.get("choices"), row.get("answerKey")))


def _boolq(row: Row) -> str:
    answer = row.get("answer")
    word = {True: "yes", False: "no"}.get(answer) if isinstance(answer, bool) else None
    return _join(row.get("passage"), row.get("question"), word)


def _plain(row: Row) -> str:
    return str(row.get("text") or "")


@dataclass(frozen=True)
class EvalSet:
    name: str
    hub_id: str
    config: str | None
    split: str
    columns: frozenset[str]  # the columns that identify this schema in a local file
    sample: Callable[[Row], str]


def _set(
    name: str, hub: str, config: str | None, split: str, columns: str, sample: Callable[[Row], str]
) -> EvalSet:
    return EvalSet(name, hub, config, split, frozenset(columns.split()), sample)


EVAL_SETS: dict[str, EvalSet] = {
    s.name: s
    for s in (
        _set("mmlu", "cais/mmlu", "all", "test", "question choices answer", _mmlu),
        _set("hellaswag", "Rowan/hellaswag", None, "validation", "ctx endings label", _hellaswag),
        _set("piqa", "ybisk/piqa", "plain_text", "validation", "goal sol1 sol2 label", _piqa),
        _set(
            "siqa",
            "allenai/social_i_qa",
            None,
            "validation",
            "context question answerA answerB answerC",
            _siqa,
        ),
        _set(
            "winogrande",
            "allenai/winogrande",
            "winogrande_xl",
            "validation",
            "sentence option1 option2",
            _winogrande,
        ),
        _set(
            "openbookqa", "allenai/openbookqa", "main", "test", "question_stem choices answerKey", _openbookqa
        ),
        _set("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", "question choices answerKey", _arc),
        _set("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", "question choices answerKey", _arc),
        _set("boolq", "google/boolq", None, "validation", "question passage answer", _boolq),
    )
}
KNOWN = tuple(EVAL_SETS)

# Schema recognition order: most specific column sets first (mmlu's would also match a
# file with extra columns, arc's is shared by both ARC sets and so is named "arc").
_SCHEMAS: list[tuple[str, EvalSet]] = [
    ("hellaswag", EVAL_SETS["hellaswag"]),
    ("siqa", EVAL_SETS["siqa"]),
    ("piqa", EVAL_SETS["piqa"]),
    ("winogrande", EVAL_SETS["winogrande"]),
    ("openbookqa", EVAL_SETS["openbookqa"]),
    ("arc", EVAL_SETS["arc_easy"]),
    ("boolq", EVAL_SETS["boolq"]),
    ("mmlu", EVAL_SETS["mmlu"]),
]


def items_from_rows(benchmark: str, rows: Iterable[Row], sample: Callable[[Row], str]) -> list[BenchmarkItem]:
    """One item per row, numbered by row so a finding points back into the split."""
    return [BenchmarkItem(benchmark, number, sample(row)) for number, row in enumerate(rows)]


def detect_schema(columns: Iterable[str]) -> tuple[str, Callable[[Row], str]] | None:
    present = set(columns)
    for label, evalset in _SCHEMAS:
        if evalset.columns <= present:
            return label, evalset.sample
    if "text" in present:
        return "text", _plain
    return None


def items_from_table(table: pa.Table, name: str | None, source: str) -> list[BenchmarkItem]:
    """Items of a local benchmark file: its real schema, or a `text` column (+ `task_name`)."""
    columns = table.column_names
    if name in EVAL_SETS and "text" not in columns:
        evalset = EVAL_SETS[name]
        if not evalset.columns <= set(columns):
            missing = ", ".join(sorted(evalset.columns - set(columns)))
            raise BenchmarkError(
                f"{source}: neither a `text` column nor the {name} schema (missing {missing}); "
                f"columns: {', '.join(columns)}"
            )
        return items_from_rows(name, table.to_pylist(), evalset.sample)
    stem = PurePosixPath(source.rstrip("/")).name.split(".")[0]
    if name is None and stem in EVAL_SETS and EVAL_SETS[stem].columns <= set(columns):
        # A file named after a benchmark in that benchmark's schema: arc_easy.jsonl is ARC-Easy.
        return items_from_rows(stem, table.to_pylist(), EVAL_SETS[stem].sample)
    detected = detect_schema(columns)
    if detected is None:
        raise BenchmarkError(
            f"{source}: no `text` column and not in a known benchmark schema; columns: {', '.join(columns)}"
        )
    label, sample = detected
    stem = name or stem
    if label != "text":
        return items_from_rows(name or label, table.to_pylist(), sample)
    rows = table.to_pylist()
    tasks = [row.get("task_name") for row in rows] if "task_name" in columns else [None] * len(rows)
    numbers: dict[str, int] = {}
    items = []
    for row, task in zip(rows, tasks, strict=True):
        benchmark = str(task) if task else stem
        items.append(BenchmarkItem(benchmark, numbers.get(benchmark, 0), _plain(row)))
        numbers[benchmark] = numbers.get(benchmark, 0) + 1
    return items


def load_from_hub(name: str) -> list[BenchmarkItem]:
    """The evaluated split from the Hugging Face Hub (needs the network or a warm cache)."""
    import datasets

    evalset = EVAL_SETS[name]
    try:
        rows = datasets.load_dataset(evalset.hub_id, evalset.config, split=evalset.split)
    except Exception as error:  # datasets raises many types; the user needs the one line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BenchmarkError(
            f"cannot load {name} ({evalset.hub_id}, split {evalset.split}) from the Hub: {first_line}; "
            f"pass a local file instead, e.g. --benchmark {name}=PATH"
        ) from error
    return items_from_rows(name, rows, evalset.sample)


_NAMED = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)=(?P<path>.+)")


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "://" in spec or spec.endswith(tables.SUFFIXES) or spec.startswith(".")


def load_benchmark(
    spec: str, hub: Callable[[str], list[BenchmarkItem]] = load_from_hub
) -> list[BenchmarkItem]:
    """Items for `NAME`, `PATH` or `NAME=PATH`; unknown names fail listing the known ones."""
    named = _NAMED.fullmatch(spec)
    if named:
        return items_from_table(read_table(named["path"]), named["name"], named["path"])
    if spec in EVAL_SETS and not tables.exists(spec):
        return hub(spec)
    if _looks_like_path(spec) or tables.exists(spec):
        return items_from_table(read_table(spec), None, spec)
    raise BenchmarkError(
        f"unknown benchmark {spec!r}: use one of {', '.join(KNOWN)}, a file path, or NAME=PATH"
    )


def _source(spec: str) -> str | None:
    """The file or folder `load_benchmark(spec)` reads, or None when it reads the Hub (or fails)."""
    named = _NAMED.fullmatch(spec)
    if named:
        return named["path"]
    if spec in EVAL_SETS and not tables.exists(spec):
        return None
    return spec if _looks_like_path(spec) or tables.exists(spec) else None


def fingerprint(specs: Sequence[str]) -> bytes | None:
    """A digest of everything `load_benchmarks(specs)` reads: the specs and their files' bytes.

    Equal fingerprints mean equal items, so a cached benchmark index can be found without
    parsing the files. None when a spec reads the Hub or its files cannot be listed and read
    (loading the items then says what is wrong).
    """
    hashed = hashlib.sha256()
    for spec in specs:
        source = _source(spec)
        if source is None:
            return None
        hashed.update(len(spec.encode()).to_bytes(8, "little") + spec.encode())
        try:
            fs, files = tables.list_files(source)
            for file in files:
                paths = sorted(fs.find(file.path)) if file.format == tables.SAVED_DATASET else [file.path]
                for path in paths:
                    data = fs.cat_file(path)
                    hashed.update(f"{path}\0{len(data)}\0".encode())
                    hashed.update(data)
        except Exception:  # fsspec back ends raise many types; loading the items reports the problem
            return None
    return hashed.digest()


def load_benchmarks(specs: Sequence[str]) -> list[BenchmarkItem]:
    items: list[BenchmarkItem] = []
    for spec in specs:
        loaded = load_benchmark(spec)
        if not loaded:
            raise BenchmarkError(f"benchmark {spec!r} has no rows")
        items.extend(loaded)
    return items


# --- reading tables --------------------------------------------------------------------------
#
# `cosmoforge.tables` reads every table. Decontamination's callers (its commands, the embedded
# run, the workers) handle DecontamError, so its input problems are InputErrors: both kinds.


@contextlib.contextmanager
def input_errors() -> Iterator[None]:
    """Raise the TableErrors of the block as InputErrors, with the same message."""
    try:
        yield
    except InputError:
        raise
    except TableError as error:
        raise InputError(str(error)) from None


def read_table(uri: str) -> pa.Table:
    """`tables.read_table`, raising InputError."""
    with input_errors():
        return tables.read_table(uri)


def text_column(table: pa.Table, field: str) -> list[str]:
    """`tables.text_column`, raising InputError."""
    with input_errors():
        return tables.text_column(table, field)
