"""A run's decontamination cut into tasks, and what storage says about their progress.

The stage's input (the run's `dataset/` shards, or `dedup/kept.parquet` when dedup ran first) is
cut into row ranges of at most `rows_per_task` rows, in the row order `cosmo decontaminate` reads
them. The plan is stored beside the outputs; submitting the same work again reuses it (and its
`nonce`), so a resubmission resumes instead of starting over. Storage is the truth about which
tasks are finished (their partial summary exists), which failed (an error file) and whether the
plan is done (`done.json` holds its nonce).

Layout under the stage's output folder (`<run>/decontam/`):

    kept.parquet, removed.parquet, report.json, report.md   the outputs, as one process writes them
    tasks/plan.json                                         the current plan
    tasks/done.json                                         the nonce of the last finished plan
    tasks/<nonce>/<task>.{kept.parquet,removed.parquet,summary.json,error.json}   partials
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from cosmoforge import tables
from cosmoforge.postprocess import decontam, evalsets
from cosmoforge.postprocess.stages import check_not_decontaminated, group_column
from cosmoforge.runs.stages import stage_input
from cosmoforge.storage import RunStore

ROWS_PER_TASK = 20_000
TASKS = "tasks"
PLAN = f"{TASKS}/plan.json"
DONE = f"{TASKS}/done.json"


@dataclass(frozen=True)
class Settings:
    """What the index is built from: the spec's `postprocess.decontaminate`."""

    benchmarks: tuple[str, ...]
    config: decontam.Config = field(default_factory=decontam.Config)

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmarks": list(self.benchmarks),
            "ngram": self.config.ngram,
            "threshold": self.config.threshold,
            "min_block_chars": self.config.min_block_chars,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        config = decontam.Config(data["ngram"], data["threshold"], data["min_block_chars"])
        return cls(tuple(data["benchmarks"]), config)


@dataclass(frozen=True)
class Task:
    """Rows [start, stop) of one input file, in the order `cosmo decontaminate` reads them."""

    id: str
    uri: str
    start: int
    stop: int
    format: str = "parquet"  # "parquet": read only the row groups needed; "table": evalsets.read_table

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "uri": self.uri, "start": self.start, "stop": self.stop, "format": self.format}


@dataclass(frozen=True)
class Plan:
    nonce: str
    input: str
    out: str
    settings: Settings
    text_field: str
    group_column: str | None
    rows_per_task: int
    sources: tuple[tuple[str, int, str], ...]  # (uri, rows, fingerprint) of every input file
    tasks: tuple[Task, ...]

    @property
    def documents(self) -> int:
        return sum(rows for _, rows, _ in self.sources)

    def task(self, task_id: str) -> Task:
        for task in self.tasks:
            if task.id == task_id:
                return task
        raise KeyError(task_id)

    def same_work(self, other: Plan) -> bool:
        """Same input files, settings and output: the outputs of one are those of the other.

        How the rows are cut into tasks does not change the outputs, so it is not compared: a
        plan in progress is resumed with its own cut.
        """
        cut = {"nonce": "", "rows_per_task": 0, "tasks": []}
        return self.as_dict() | cut == other.as_dict() | cut

    def as_dict(self) -> dict[str, Any]:
        return {
            "nonce": self.nonce,
            "input": self.input,
            "out": self.out,
            "settings": self.settings.as_dict(),
            "text_field": self.text_field,
            "group_column": self.group_column,
            "rows_per_task": self.rows_per_task,
            "sources": [list(source) for source in self.sources],
            "tasks": [task.as_dict() for task in self.tasks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            nonce=data["nonce"],
            input=data["input"],
            out=data["out"],
            settings=Settings.from_dict(data["settings"]),
            text_field=data["text_field"],
            group_column=data["group_column"],
            rows_per_task=data["rows_per_task"],
            sources=tuple((uri, rows, fingerprint) for uri, rows, fingerprint in data["sources"]),
            tasks=tuple(Task(**task) for task in data["tasks"]),
        )


def out_store(out: str) -> RunStore:
    """The stage's output folder as a RunStore (atomic writes on local disks, one PUT elsewhere)."""
    out = out if "://" in out else os.path.abspath(out)
    fs, root = url_to_fs(out)
    return RunStore(fs, root.rstrip("/"), out.rstrip("/"))


def part(nonce: str, task_id: str, kind: str) -> str:
    return f"{TASKS}/{nonce}/{task_id}.{kind}"


def _input_files(input_uri: str) -> tuple[Any, list[tables.TableFile]]:
    """(fs, files) of an input, in the order one process reads them (`tables.list_files`)."""
    try:
        return tables.list_files(input_uri)
    except tables.TableError as error:
        raise evalsets.InputError(str(error)) from None


def _fingerprint(fs: Any, path: str) -> str:
    with contextlib.suppress(Exception):
        return str(fs.checksum(path))  # size and modification time (local), ETag (object stores)
    return ""


def make_plan(
    input_uri: str,
    out: str,
    settings: Settings,
    text_field: str = "text",
    group_field: str | None = None,
    rows_per_task: int = ROWS_PER_TASK,
) -> Plan:
    """Cut the input into tasks; checks the columns as `cosmo decontaminate` does (InputError)."""
    if rows_per_task < 1:
        raise decontam.DecontamError(f"rows per task must be at least 1, got {rows_per_task}")
    if not settings.benchmarks:
        raise evalsets.BenchmarkError("at least one benchmark is needed")
    input_uri = input_uri if "://" in input_uri else os.path.abspath(input_uri)  # workers run elsewhere
    fs, files = _input_files(input_uri)
    columns: list[str] = []
    sources: list[tuple[str, int, str]] = []
    tasks: list[Task] = []
    for file in files:
        uri, path, kind = file.uri, file.path, file.format
        try:
            if kind == "parquet":
                with fs.open(path, "rb") as handle:
                    meta = pq.ParquetFile(handle)
                    rows, names = meta.metadata.num_rows, meta.schema_arrow.names
            else:
                table = evalsets.read_table(uri)
                rows, names = table.num_rows, table.column_names
        except (OSError, pa.ArrowException) as error:
            raise evalsets.InputError(f"{uri}: cannot read: {error}") from None
        columns += [name for name in names if name not in columns]
        sources.append((uri, rows, _fingerprint(fs, path)))
        # An empty file still gets a task: its schema belongs in the outputs, as in one process.
        for start in range(0, max(rows, 1), rows_per_task):
            tasks.append(Task(f"t{len(tasks):06d}", uri, start, min(start + rows_per_task, rows), kind))
    if text_field not in columns:
        raise evalsets.InputError(
            f"input has no column {text_field!r} (columns: {', '.join(columns)}); "
            "choose one with --text-field"
        )
    check_not_decontaminated(columns)
    return Plan(
        nonce=uuid.uuid4().hex[:12],
        input=input_uri,
        out=out_store(out).uri,
        settings=settings,
        text_field=text_field,
        group_column=group_column(columns, group_field),
        rows_per_task=rows_per_task,
        sources=tuple(sources),
        tasks=tuple(tasks),
    )


def read_spec(output: str, run: str) -> Any:
    """The run's GenerationRun from `<output>/<run>/spec.yaml` (DecontamError when unusable)."""
    from cosmoforge.spec.model import SpecError, parse_run, single_document

    store = RunStore.open(output, run)
    text = store.read_text("spec.yaml")
    if text is None:
        raise decontam.DecontamError(f"no spec.yaml under {store.uri}")
    source = store.url("spec.yaml")
    try:
        return parse_run(single_document(text, source), source)
    except SpecError as error:
        raise decontam.DecontamError(str(error).replace("\n", "; ")) from None


def settings_of(spec: Any) -> Settings:
    """The index settings of a run: its `spec.postprocess.decontaminate`."""
    wanted = spec.spec.postprocess.decontaminate
    return Settings(
        tuple(wanted.benchmarks), decontam.Config(wanted.ngram, wanted.threshold, wanted.min_block_chars)
    )


def plan_for_run(
    output: str,
    run: str,
    input_uri: str | None = None,
    text_field: str = "text",
    group_field: str | None = None,
    rows_per_task: int = ROWS_PER_TASK,
) -> Plan:
    """The run's decontamination stage as tasks: what `cosmo run` decontaminates, where it writes.

    The input is what the previous stage kept (`dedup/kept.parquet` when dedup is enabled, else
    the compacted `dataset/`), the output `<run>/decontam/`, the settings the spec's.
    """
    spec = read_spec(output, run)
    postprocess = spec.spec.postprocess
    if not postprocess.decontaminate.enabled:
        raise decontam.DecontamError(f"{run}: spec.postprocess.decontaminate.enabled is false")
    store = RunStore.open(output, run)
    source = input_uri or store.url(stage_input(spec.spec, "decontaminate"))
    return make_plan(source, store.url("decontam"), settings_of(spec), text_field, group_field, rows_per_task)


def load_plan(out: str) -> Plan | None:
    text = out_store(out).read_text(PLAN)
    return Plan.from_dict(json.loads(text)) if text is not None else None


def store_plan(plan: Plan, replace: bool = False) -> Plan:
    """The plan to work on: the stored one when it describes the same work, else `plan`.

    `replace` starts over with `plan` (and its cut) even then.
    """
    store = out_store(plan.out)
    current = load_plan(plan.out)
    if current is not None and current.same_work(plan) and not replace:
        return current
    if current is not None:
        store.remove(f"{TASKS}/{current.nonce}")  # partials of other work; their late writes are ignored
    store.write_text(PLAN, json.dumps(plan.as_dict(), indent=2))
    return plan


def is_done(plan: Plan) -> bool:
    text = out_store(plan.out).read_text(DONE)
    return text is not None and json.loads(text).get("nonce") == plan.nonce


def _listed(plan: Plan, suffix: str) -> dict[str, str]:
    """{task id: path} of the plan's partial files ending in `suffix`, from one listing."""
    store = out_store(plan.out)
    folder = store.path(TASKS, plan.nonce)
    store.fs.invalidate_cache(folder)
    try:
        # One listing, no exists() before it: the plan's finalizer removes the folder at any moment.
        listing = store.fs.ls(folder, detail=False)
    except FileNotFoundError:
        return {}
    found = {}
    for path in listing:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(f".{suffix}"):
            found[name.removesuffix(f".{suffix}")] = path
    return found


def finished_tasks(plan: Plan) -> set[str]:
    return set(_listed(plan, "summary.json")) & {task.id for task in plan.tasks}


def task_errors(plan: Plan) -> dict[str, str]:
    store = out_store(plan.out)
    errors = {}
    for task_id, path in _listed(plan, "error.json").items():
        with contextlib.suppress(FileNotFoundError):
            errors[task_id] = json.loads(store.fs.cat_file(path))["error"]
    return errors
