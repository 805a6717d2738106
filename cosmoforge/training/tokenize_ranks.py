"""Tokenization as ranks of Kubernetes Indexed Jobs (`cosmo tokenize --step`).

`tokenize` ranks each tokenize their share of the dataset's rows (cut by the parquet footers)
into a work folder under OUT and leave a marker with their counts; one `merge` step checks that
every rank finished over the same dataset and tokenizer, shuffles their token files together
with datatrove's merger and publishes them under OUT with the one-process names, `metrics.json`
last: until it is there `cosmo train` refuses the folder.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

from cosmoforge.tables import row_share
from cosmoforge.training import TrainingError
from cosmoforge.training.tokenize import (
    BATCH_DOCUMENTS,
    METRICS_FILE,
    SAVE_FILENAME,
    TOKENIZER_FILE,
    TokenizeOptions,
    TokenizeResult,
    TokenizerInfo,
    absolute,
    build_pipeline,
    count_columns,
    existing_token_files,
    is_local,
    prepare,
    read_metrics,
    tokenizer_file,
    tokenizer_info,
    tokens_by_group,
)

WORK_FOLDER = ".tokenize-work"
STEPS = ("tokenize", "merge")


def step_world_size(step: str, ranks: int) -> int:
    """How many pods an Indexed Job runs for `step`: every rank tokenizes, one merges."""
    if step not in STEPS:
        raise ValueError(f"unknown tokenize step {step!r} (steps: {', '.join(STEPS)})")
    if ranks < 1:
        raise ValueError(f"a tokenization needs at least one rank, got {ranks}")
    return ranks if step == "tokenize" else 1


def work_uri(output: str, world_size: int) -> str:
    """Where the ranks of a `world_size` run keep their token files and counts.

    The world size is part of the name so that files left by a run cut differently are never
    merged with this one's.
    """
    return f"{output.rstrip('/')}/{WORK_FOLDER}/of-{world_size:05d}"


def rank_marker(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def merged_name(index: int) -> str:
    """The name a one-process run gives its `index`-th token file, which the merge reuses."""
    return f"{SAVE_FILENAME}_00000_{index:05d}_doc_shuffled.ds"


@dataclass
class RankResult:
    """What one rank tokenized; saved as its completion marker, which the merge sums."""

    rank: int
    world_size: int
    dataset: str
    rows: list[int]
    documents: int
    tokens: int
    tokenizer: TokenizerInfo
    tokens_by: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0


def _write_whole(fs: Any, path: str, data: bytes) -> None:
    """Write `path` so that it is never seen half written: a local file is renamed into place, and
    an object store only shows an object once its upload is complete."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    partial = f"{path}.partial"
    fs.pipe_file(partial, data)
    os.replace(partial, path)


def _token_counts(fs: Any, token_files: list[str], token_size: int) -> tuple[int, int]:
    """(documents, tokens) of datatrove token files, from their sizes and their indexes' sizes."""
    tokens = sum(fs.size(p) for p in token_files) // token_size
    documents = sum(fs.size(p + ".index") for p in token_files) // 8
    return documents, tokens


def tokenize_rank(
    dataset: str,
    output: str,
    tokenizer: str,
    rank: int,
    world_size: int,
    text_field: str = "text",
    eos_token: str | None = None,
    seed: int = 42,
    batch_size: int = BATCH_DOCUMENTS,
    overwrite: bool = False,
) -> RankResult:
    """Tokenize rank `rank`'s share of `dataset` into the work folder under `output`.

    A rank run again starts its share over and ends with the same files: its marker and token
    files are removed first, the share and the shuffle seed do not change.
    """
    from datatrove.executor import LocalPipelineExecutor

    if not 0 <= rank < world_size:
        raise TrainingError(f"rank {rank} is outside the {world_size} rank(s) 0..{world_size - 1}")
    output, dataset = absolute(output), absolute(dataset)
    files, info, loaded = prepare(dataset, output, tokenizer, text_field, eos_token, overwrite)
    work = work_uri(output, world_size)
    fs, work_path = url_to_fs(work)
    marker = f"{work_path}/{rank_marker(rank)}"
    # The marker goes first: a rank killed while redoing its share must not look finished.
    for stale in [marker, *fs.glob(f"{work_path}/tokens/{SAVE_FILENAME}_{rank:05d}_*")]:
        if fs.exists(stale):
            fs.rm_file(stale)
    fs.makedirs(f"{work_path}/tokens", exist_ok=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cosmo-tokenize-") as scratch:
        logs = os.path.join(scratch, "logs")
        options = TokenizeOptions(
            dataset=files.folder,
            output=f"{work}/tokens",
            tokenizer=tokenizer_file(info, loaded, scratch),
            text_field=text_field,
            eos_token=info.eos_token,
            files=files.files,
            counted=count_columns(files.columns),
            seed=seed,
            batch_size=batch_size,
            logging_dir=logs,
            local_working_dir=os.path.join(scratch, "shuffle"),
            file_rows=files.file_rows,
        )
        # One task of `world_size`, run in this process: datatrove hands the steps this rank.
        LocalPipelineExecutor(
            pipeline=build_pipeline(options),
            tasks=world_size,
            workers=1,
            local_tasks=1,
            local_rank_offset=rank,
            logging_dir=logs,
            skip_completed=False,
        ).run()
        stats = json.loads(Path(logs, "stats.json").read_text())
    token_files = sorted(p for p in fs.glob(f"{work_path}/tokens/{SAVE_FILENAME}_{rank:05d}_*.ds"))
    documents, tokens = _token_counts(fs, token_files, info.token_size)
    result = RankResult(
        rank=rank,
        world_size=world_size,
        dataset=dataset,
        rows=list(row_share(files.rows, rank, world_size)),
        documents=documents,
        tokens=tokens,
        tokenizer=info,
        tokens_by=tokens_by_group(stats),
        seconds=time.perf_counter() - started,
    )
    _write_whole(fs, marker, json.dumps(asdict(result), indent=2).encode())
    return result


def sum_ranks(ranks: list[dict[str, Any]]) -> tuple[int, int, dict[str, dict[str, int]]]:
    """(documents, tokens, tokens by group) of all ranks' markers together."""
    counts: dict[str, Counter[str]] = {}
    for rank in ranks:
        for group, values in rank["tokens_by"].items():
            counts.setdefault(group, Counter()).update(values)
    tokens_by = {group: dict(sorted(values.items())) for group, values in sorted(counts.items())}
    return sum(r["documents"] for r in ranks), sum(r["tokens"] for r in ranks), tokens_by


def check_ranks(
    ranks: list[dict[str, Any] | None], dataset: str, info: TokenizerInfo, work: str
) -> list[dict[str, Any]]:
    """The ranks' markers, once all are there and tokenized, together, what the merge is asked for."""
    missing = [str(rank) for rank, marker in enumerate(ranks) if marker is None]
    if missing:
        raise TrainingError(
            f"{work}: rank(s) {', '.join(missing)} of {len(ranks)} have not finished `--step tokenize`"
        )
    finished = [marker for marker in ranks if marker is not None]
    end = 0
    for marker in finished:
        used = marker["tokenizer"]
        if marker["dataset"] != dataset:
            raise TrainingError(f"{work}: rank {marker['rank']} tokenized {marker['dataset']}, not {dataset}")
        if (used["vocab_size"], used["eos_token"]) != (info.vocab_size, info.eos_token):
            raise TrainingError(
                f"{work}: rank {marker['rank']} used another tokenizer ({used['name_or_path']}, "
                f"{used['vocab_size']} tokens, end of text {used['eos_token']!r})"
            )
        # Shares are cut from the row count: ranks that do not tile the rows saw different data.
        start, stop = marker["rows"]
        if start != end:
            raise TrainingError(
                f"{work}: rank {marker['rank']} tokenized rows {start}..{stop}, not from row {end}: "
                "the dataset changed while the ranks ran; run them all again"
            )
        end = stop
    return finished


def _read_marker(fs: Any, path: str) -> dict[str, Any] | None:
    return json.loads(fs.cat_file(path)) if fs.isfile(path) else None


def _publish(fs: Any, staging: str, merged: list[str], output: str, local: bool) -> list[str]:
    """Move the merged token files from `staging` into `output` under their final names."""
    out_path = url_to_fs(output)[1].rstrip("/")
    # An earlier output goes, metrics first, so that no mix of old and new is ever accepted.
    for stale in sorted(existing_token_files(output), key=lambda p: not p.endswith(METRICS_FILE)):
        fs.rm_file(stale)
    files = [merged_name(index) for index in range(len(merged))]
    for name, final in zip(merged, files, strict=True):
        for suffix in ("", ".index", ".metadata"):
            source_file, target = os.path.join(staging, name + suffix), f"{out_path}/{final}{suffix}"
            if local:
                os.replace(source_file, target)
            else:
                fs.put_file(source_file, target)
    return files


def merge_ranks(
    dataset: str,
    output: str,
    tokenizer: str,
    world_size: int,
    eos_token: str | None = None,
    seed: int = 42,
) -> TokenizeResult:
    """Merge the token files of `world_size` finished ranks into `output`, as one process writes it.

    The output is accepted by `cosmo train` only once `metrics.json` exists, and that file is
    written last, whole; the work folder goes after it. A merge run again after that finds no
    work folder and reports the merged result.
    """
    from datatrove.pipeline.tokens import DocumentTokenizerMerger

    output, dataset = absolute(output), absolute(dataset)
    info, loaded = tokenizer_info(tokenizer, eos_token)
    work = work_uri(output, world_size)
    fs, work_path = url_to_fs(work)
    out_path = url_to_fs(output)[1].rstrip("/")
    if not fs.isdir(work_path):
        if fs.isfile(f"{out_path}/{METRICS_FILE}"):
            return TokenizeResult.from_json(read_metrics(output))
        raise TrainingError(f"{work} does not exist: run `--step tokenize` on all {world_size} rank(s) first")
    markers = [_read_marker(fs, f"{work_path}/{rank_marker(rank)}") for rank in range(world_size)]
    ranks = check_ranks(markers, dataset, info, work)
    documents, tokens, tokens_by = sum_ranks(ranks)
    if documents == 0:
        raise TrainingError(f"dataset {dataset} has no row with text to tokenize")

    started = time.perf_counter()
    local = is_local(fs)
    with tempfile.TemporaryDirectory(prefix="cosmo-tokenize-merge-") as scratch:
        # The merge reads every rank file in shuffled order, one document at a time: from object
        # storage that is one request per document, so remote rank files are copied here first.
        source = f"{work}/tokens"
        if not local:
            source = os.path.join(scratch, "ranks")
            fs.get(f"{work_path}/tokens/", source + "/", recursive=True)
        # Staged beside the output when local, so that publishing is a rename.
        staging = f"{work_path}/merged" if local else os.path.join(scratch, "merged")
        if local and fs.exists(staging):
            fs.rm(staging, recursive=True)
        merger = DocumentTokenizerMerger(
            input_folder=source, output_folder=staging, save_filename=SAVE_FILENAME, seed=seed, progress=False
        )
        merger.run(None, 0, 1)
        merged = sorted(name for name in os.listdir(staging) if name.endswith(".ds"))
        sizes = sum(os.path.getsize(os.path.join(staging, name)) for name in merged)
        if sizes // info.token_size != tokens:
            raise TrainingError(
                f"{work}: the rank files hold {sizes // info.token_size} tokens, their markers {tokens}"
            )
        files = _publish(fs, staging, merged, output, local)
        fs.put_file(tokenizer_file(info, loaded, scratch), f"{out_path}/{TOKENIZER_FILE}")
    result = TokenizeResult(
        output=output,
        dataset=dataset,
        tokenizer=info,
        documents=documents,
        tokens=tokens,
        files=files,
        tokens_by=tokens_by,
        # Ranks run side by side: the slowest one and the merge are the wall time of the whole.
        seconds=max(marker["seconds"] for marker in ranks) + time.perf_counter() - started,
    )
    _write_whole(fs, f"{out_path}/{METRICS_FILE}", json.dumps(result.to_json(), indent=2).encode())
    fs.rm(url_to_fs(f"{output.rstrip('/')}/{WORK_FOLDER}")[1], recursive=True)
    return result
