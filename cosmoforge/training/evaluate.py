"""Score a checkpoint on the benchmarks the Cosmopedia blog reports, with lighteval.

The nine tasks (ARC-Easy/Challenge, OpenBookQA, MMLU, PIQA, HellaSwag, SIQA, WinoGrande, BoolQ)
are asked in cloze form and scored by log-likelihood: each answer is a continuation of the
question, and the model is right when the gold continuation is the most likely one (`acc`) or
the most likely per character (`acc_norm`). That is how small models such as cosmo-1b are
compared; letter-choice prompts only start to work well above a billion parameters.

lighteval does the work: its `LightevalTask` loads and formats the data, its transformers model
computes the log-likelihoods, its metrics score them. cosmoforge skips one piece, lighteval's
task registry, because building it imports every built-in task and one of those downloads a
file at import time, which fails without network. The task definitions here are plain
`LightevalTaskConfig`s; by default they read the benchmarks from the Hub, and `data_dir` points
them at local copies with the same columns (one folder per task, `<split>.jsonl` or parquet).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosmoforge.training import TrainingError, remote

Prompt = tuple[str, list[str], int]


def _arc(line: dict[str, Any]) -> Prompt:
    labels = list(line["choices"]["label"])
    return (
        f"Question: {line['question']}\nAnswer:",
        [f" {text}" for text in line["choices"]["text"]],
        labels.index(str(line["answerKey"]).strip()),
    )


def _openbookqa(line: dict[str, Any]) -> Prompt:
    labels = list(line["choices"]["label"])
    return (
        f"Question: {line['question_stem']}\nAnswer:",
        [f" {text}" for text in line["choices"]["text"]],
        labels.index(str(line["answerKey"]).strip()),
    )


def _mmlu(line: dict[str, Any]) -> Prompt:
    subject = str(line.get("subject", "")).replace("_", " ")
    header = f"The following are questions about {subject}.\n" if subject else ""
    return (
        f"{header}Question: {line['question']}\nAnswer:",
        [f" {choice}" for choice in line["choices"]],
        int(line["answer"]),
    )


def _piqa(line: dict[str, Any]) -> Prompt:
    return f"Question: {line['goal']}\nAnswer:", [f" {line['sol1']}", f" {line['sol2']}"], int(line["label"])


def _hellaswag_clean(text: str) -> str:
    # WikiHow-sourced rows carry markup such as "[header]" and doubled spaces.
    text = re.sub(r"\[[^\]]*\]", "", text.replace(" [title]", ". "))
    return re.sub(r"\s{2,}", " ", text).strip()


def _hellaswag(line: dict[str, Any]) -> Prompt:
    context = f"{line['ctx_a']} {str(line['ctx_b']).capitalize()}".strip()
    query = _hellaswag_clean(f"{line['activity_label']}: {context}")
    return query, [f" {_hellaswag_clean(ending)}" for ending in line["endings"]], int(line["label"])


def _siqa(line: dict[str, Any]) -> Prompt:
    answers = [line["answerA"], line["answerB"], line["answerC"]]
    return (
        f"Question: {line['context']} {line['question']}\nAnswer:",
        [f" {answer}" for answer in answers],
        int(line["label"]) - 1,
    )


def _winogrande(line: dict[str, Any]) -> Prompt:
    # Partial scoring: the shared prefix is the query, each option plus the rest of the
    # sentence is a continuation, so the options compete on the words that follow them.
    before, _, after = str(line["sentence"]).partition("_")
    options = [line["option1"], line["option2"]]
    return before.rstrip(), [f" {option}{after}" for option in options], int(line["answer"]) - 1


def _boolq(line: dict[str, Any]) -> Prompt:
    answer = line["answer"]
    truth = answer if isinstance(answer, bool) else str(answer).strip().lower() in ("yes", "true")
    question = str(line["question"]).rstrip("?")
    return f"{line['passage']}\nQuestion: {question}?\nAnswer:", [" yes", " no"], 0 if truth else 1


@dataclass(frozen=True)
class BenchmarkTask:
    name: str
    prompt: Callable[[dict[str, Any]], Prompt]
    hub_repo: str
    hub_subset: str
    split: str


TASKS: dict[str, BenchmarkTask] = {
    task.name: task
    for task in (
        BenchmarkTask("arc_easy", _arc, "allenai/ai2_arc", "ARC-Easy", "test"),
        BenchmarkTask("arc_challenge", _arc, "allenai/ai2_arc", "ARC-Challenge", "test"),
        BenchmarkTask("openbookqa", _openbookqa, "allenai/openbookqa", "main", "test"),
        BenchmarkTask("mmlu", _mmlu, "cais/mmlu", "all", "test"),
        BenchmarkTask("piqa", _piqa, "ybisk/piqa", "plain_text", "validation"),
        BenchmarkTask("hellaswag", _hellaswag, "Rowan/hellaswag", "default", "validation"),
        BenchmarkTask("siqa", _siqa, "allenai/social_i_qa", "default", "validation"),
        BenchmarkTask("winogrande", _winogrande, "allenai/winogrande", "winogrande_xl", "validation"),
        BenchmarkTask("boolq", _boolq, "google/boolq", "default", "validation"),
    )
}


@dataclass
class TaskScore:
    task: str
    source: str
    split: str
    samples: int
    acc: float
    acc_norm: float


@dataclass
class EvalResult:
    checkpoint: str
    max_samples: int | None
    seconds: float
    scores: list[TaskScore] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {
            "checkpoint": self.checkpoint,
            "engine": f"lighteval {version('lighteval')}",
            "metrics": {
                "acc": "gold continuation has the highest log-likelihood",
                "acc_norm": "same, with log-likelihood divided by the continuation's characters",
            },
            "max_samples": self.max_samples,
            "seconds": round(self.seconds, 2),
            "tasks": [score.__dict__ for score in self.scores],
        }

    def to_markdown(self) -> str:
        parts = self.checkpoint.rstrip("/").rsplit("/", 2)
        name = parts[-2] if parts[-1] == "checkpoint" and len(parts) > 1 else parts[-1]
        lines = [
            f"# Evaluation of `{name}`",
            "",
            "Log-likelihood scoring in cloze form (lighteval). "
            + (f"At most {self.max_samples} samples per task: " if self.max_samples else "")
            + ("a smoke test, not a comparable score." if self.max_samples else "full splits."),
            "",
            "| task | samples | acc | acc_norm | split | data |",
            "|---|---:|---:|---:|---|---|",
        ]
        for score in self.scores:
            lines.append(
                f"| {score.task} | {score.samples} | {score.acc:.3f} | {score.acc_norm:.3f} "
                f"| {score.split} | {score.source} |"
            )
        return "\n".join(lines) + "\n"


def resolve_checkpoint(path: str) -> str:
    """Accept the checkpoint folder itself or the training output folder that holds it (local
    or any fsspec URI); return the checkpoint folder."""
    folder = path.rstrip("/")
    if remote.is_file(remote.join(folder, "checkpoint", "config.json")):
        folder = remote.join(folder, "checkpoint")
    if not remote.is_file(remote.join(folder, "config.json")):
        raise TrainingError(f"{path} is not a checkpoint: no config.json (train one with `cosmo train`)")
    if not any(
        remote.is_file(remote.join(folder, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        raise TrainingError(f"checkpoint {path} has no tokenizer files")
    return folder


def _local_split(folder: Path, split: str) -> Path | None:
    for suffix in (".jsonl", ".json", ".parquet"):
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def plan_tasks(tasks: list[str], data_dir: str | None) -> list[tuple[BenchmarkTask, str]]:
    """Check task names and local data before loading anything; return (task, data source)."""
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise TrainingError(f"unknown task(s) {', '.join(unknown)}: use {', '.join(TASKS)}")
    if not tasks:
        raise TrainingError("no tasks to evaluate")
    planned = []
    for name in dict.fromkeys(tasks):
        task = TASKS[name]
        if data_dir is None:
            planned.append((task, task.hub_repo))
            continue
        folder = Path(data_dir) / name
        if _local_split(folder, task.split) is None:
            raise TrainingError(f"no {task.split} data for {name} in {folder} (expected {task.split}.jsonl)")
        planned.append((task, str(folder.resolve())))
    return planned


def _task_config(task: BenchmarkTask, source: str, local: bool) -> Any:
    from lighteval.metrics.dynamic_metrics import LogLikelihoodAccMetric
    from lighteval.metrics.normalizations import LogProbCharNorm
    from lighteval.tasks.lighteval_task import LightevalTaskConfig
    from lighteval.tasks.requests import Doc

    def prompt_function(line: dict[str, Any], task_name: str | None = None) -> Any:
        query, choices, gold = task.prompt(line)
        return Doc(task_name=task_name or task.name, query=query, choices=choices, gold_index=gold)

    return LightevalTaskConfig(
        name=f"cosmo_{task.name}",
        prompt_function=prompt_function,
        hf_repo=source,
        hf_subset="default" if local else task.hub_subset,
        hf_avail_splits=[task.split],
        evaluation_splits=[task.split],
        metrics=[LogLikelihoodAccMetric(), LogLikelihoodAccMetric(normalization=LogProbCharNorm())],
        generation_size=-1,
        stop_sequence=None,
    )


def evaluate(
    checkpoint: str,
    output: str | Path,
    tasks: list[str] | None = None,
    max_samples: int | None = None,
    data_dir: str | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> EvalResult:
    """Score `checkpoint` on `tasks`; write results.json and results.md into `output`.

    Checkpoint, task data and output may each be a local folder or an fsspec URI: remote ones
    are downloaded to (or uploaded from) a temporary folder, since lighteval reads local files.
    """
    folder = resolve_checkpoint(checkpoint)
    if max_samples is not None and max_samples < 1:
        raise TrainingError(f"max samples must be at least 1, got {max_samples}")
    if data_dir is None or not remote.is_remote(data_dir):
        plan_tasks(list(tasks or TASKS), data_dir)  # fail before any download
    elif not remote.exists(data_dir):
        raise TrainingError(f"task data folder {data_dir} does not exist")
    with (
        remote.local_copy(folder, prefix="cosmo-eval-model-", skip=("resume",)) as local_model,
        remote.local_copy(data_dir or ".", prefix="cosmo-eval-data-") as local_data,
        remote.staging(str(output), prefix="cosmo-eval-") as out,
    ):
        result = _evaluate_local(
            local_model,
            out,
            tasks=tasks,
            max_samples=max_samples,
            data_dir=str(local_data) if data_dir is not None else None,
            batch_size=batch_size,
            device=device,
        )
        result.checkpoint = folder
        if data_dir is not None and remote.is_remote(data_dir):
            for score in result.scores:
                score.source = remote.join(data_dir, score.task)
        _write_results(result, out)
        if remote.is_remote(str(output)):
            for name in ("results.json", "results.md"):
                remote.upload_file(out / name, remote.join(str(output), name))
    return result


def _write_results(result: EvalResult, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")
    (out / "results.md").write_text(result.to_markdown(), encoding="utf-8")


def _evaluate_local(
    folder: Path,
    out: Path,
    tasks: list[str] | None,
    max_samples: int | None,
    data_dir: str | None,
    batch_size: int,
    device: str,
) -> EvalResult:
    planned = plan_tasks(list(tasks or TASKS), data_dir)

    from lighteval.models.transformers.transformers_model import TransformersModel, TransformersModelConfig
    from lighteval.tasks.lighteval_task import LightevalTask

    started = time.perf_counter()
    docs_by_task: dict[str, tuple[BenchmarkTask, str, Any, list[Any]]] = {}
    for task, source in planned:
        lighteval_task = LightevalTask(_task_config(task, source, local=data_dir is not None))
        try:
            docs = lighteval_task.get_docs(max_samples)
        except Exception as error:
            raise TrainingError(
                f"cannot load {task.name} from {source}: {str(error).splitlines()[0]}"
            ) from None
        docs_by_task[task.name] = (task, source, lighteval_task, docs)

    # lighteval caches responses per model name; a fresh cache per call keeps a retrained
    # checkpoint at the same path from being answered with the old model's scores. Without the
    # registry its cache warns once per request that it cannot check task hashes: silenced.
    cache_logger = logging.getLogger("lighteval.utils.cache_management")
    previous_level = cache_logger.level
    cache_logger.setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="cosmo-eval-cache-") as cache:
        model = TransformersModel(
            TransformersModelConfig(
                model_name=str(folder.resolve()),
                dtype="float32",
                device=device,
                batch_size=batch_size,
                cache_dir=cache,
            )
        )
        all_docs = [doc for _, _, _, docs in docs_by_task.values() for doc in docs]
        try:
            responses = model.loglikelihood(all_docs)
        finally:
            cache_logger.setLevel(previous_level)
        del model

    result = EvalResult(checkpoint=str(folder), max_samples=max_samples, seconds=0.0)
    offset = 0
    for task, source, lighteval_task, docs in docs_by_task.values():
        sums: dict[str, float] = {"acc": 0.0, "acc_norm": 0.0}
        for doc, response in zip(docs, responses[offset : offset + len(docs)], strict=True):
            for metric in lighteval_task.metrics:
                for key, value in metric.compute_sample(doc=doc, model_response=response).items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        offset += len(docs)
        count = max(1, len(docs))
        shown = source if data_dir is None else os.path.relpath(source, Path(data_dir).resolve().parent)
        result.scores.append(
            TaskScore(task.name, shown, task.split, len(docs), sums["acc"] / count, sums["acc_norm"] / count)
        )
    result.seconds = time.perf_counter() - started
    return result
