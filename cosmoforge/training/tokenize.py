"""Tokenize a generated dataset into the binary token files nanotron and the CPU trainer read.

The work is datatrove's `DocumentTokenizer`, the step the Cosmopedia authors used: documents are
encoded in batches, an end-of-text token closes every document, documents are shuffled inside
each output file, and each `.ds` file gets an `.index` (document ends) and a `.metadata` file
(tokenizer and token count). cosmoforge adds three things around it:

- checks that fail before any work: the tokenizer loads, the dataset has rows and the text
  column, the tokenizer has an end-of-text token;
- a reader that only decodes the columns it needs (generated shards also carry the prompt,
  which is as long as the text and would otherwise be converted to Python for nothing);
- token counts per source, style and audience, through datatrove's own stats, written to
  `metrics.json` beside the token files.

datatrove's LocalPipelineExecutor starts a process pool when workers > 1, which re-imports the
caller's `__main__`; a multi-worker run is therefore launched as `python -m` of this module, whose
entry point is guarded, so it works the same from the CLI, a test or a notebook.

On a cluster the same work runs as two steps of Indexed Jobs (`tokenize_ranks`):
each of N ranks tokenizes its contiguous share of the dataset's rows, found from the parquet
footers, into a work folder under the output, and records its counts; one merge then shuffles all
rank files into the layout a one-process run writes, publishing `metrics.json` last. Each rank
runs datatrove with one worker, in its own process, so no pool and no main guard are involved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cosmoforge.training import TrainingError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Columns whose values split the token count, first present name wins: cosmoforge's own
# generations use the first names, the published Cosmopedia dataset the second.
COUNT_COLUMNS: dict[str, tuple[str, ...]] = {
    "source": ("seed_source", "seed_data"),
    "style": ("style", "format"),
    "audience": ("audience",),
}
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
STAT_PREFIX = "tokens_by/"
SAVE_FILENAME = "cosmo"
METRICS_FILE = "metrics.json"
TOKENIZER_FILE = "tokenizer.json"
# Documents encoded in one call. The tokenizers library keeps every token's string, offsets and
# masks beside its id until the batch is written: ~3 KB documents cost ~0.35 GB per 1,000 of them
# (3.2 GB at datatrove's default of 10,000, the peak of a whole `cosmo tokenize`), and batches
# of a few hundred encode as fast (bench_scale.py; measured on two cores).
BATCH_DOCUMENTS = 500


@dataclass(frozen=True)
class DatasetFiles:
    """Parquet files of a dataset, relative to `folder`, checked before tokenizing."""

    folder: str
    files: list[str]
    rows: int
    columns: list[str]
    file_rows: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TokenizerInfo:
    name_or_path: str
    vocab_size: int
    eos_token: str
    eos_token_id: int
    token_size: int


@dataclass
class TokenizeResult:
    output: str
    dataset: str
    tokenizer: TokenizerInfo
    documents: int
    tokens: int
    files: list[str]
    tokens_by: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens_per_second"] = round(self.tokens_per_second, 1)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TokenizeResult:
        fields = {key: value for key, value in data.items() if key != "tokens_per_second"}
        return cls(**{**fields, "tokenizer": TokenizerInfo(**data["tokenizer"])})


def fetched_tokenizer(uri: str) -> Path:
    """A tokenizer.json in object storage (or any fsspec URI: a file, or a folder holding one),
    copied to a local file named by its content, the same path in every pod, so that datatrove and
    the ranks' markers name one file."""
    import hashlib

    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(uri)
        if fs.isdir(path):
            path = f"{path.rstrip('/')}/tokenizer.json"
        data = fs.cat_file(path)
    except (OSError, ValueError) as error:
        raise TrainingError(f"tokenizer {uri!r} not readable: {_first_line(error)}") from None
    target = Path(tempfile.gettempdir()) / "cosmoforge-tokenizers" / hashlib.sha256(data).hexdigest()[:16]
    target.mkdir(parents=True, exist_ok=True)
    local = target / "tokenizer.json"
    if not local.is_file():
        partial = target / f".tokenizer.json.{os.getpid()}"
        partial.write_bytes(data)
        os.replace(partial, local)
    return local


def resolve_tokenizer(name_or_path: str) -> tuple[str, Tokenizer]:
    """Load a tokenizer from a tokenizer.json (local or any fsspec URI), a folder holding one, or
    a Hub id.

    Returns the string datatrove should be given (a file path or the Hub id) and the tokenizer.
    """
    from tokenizers import Tokenizer

    path = fetched_tokenizer(name_or_path) if "://" in name_or_path else Path(name_or_path).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            return str(path.resolve()), Tokenizer.from_file(str(path))
        except Exception as error:
            raise TrainingError(
                f"tokenizer {name_or_path!r} is not a valid tokenizer.json: {error}"
            ) from None
    if path.is_absolute() or name_or_path.startswith(".") or name_or_path.endswith(".json") or path.is_dir():
        raise TrainingError(f"tokenizer {name_or_path!r} not found: no tokenizer.json at that path")
    try:
        return name_or_path, Tokenizer.from_pretrained(name_or_path)
    except Exception as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise TrainingError(
            f"tokenizer {name_or_path!r} not found: not a local tokenizer.json and not loadable from the Hub "
            f"({reason})"
        ) from None


def pick_eos(tokenizer: Tokenizer, requested: str | None = None) -> tuple[str, int]:
    """The token that closes every document; nanotron relies on it to tell documents apart."""
    candidates = (requested,) if requested else EOS_CANDIDATES
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token, token_id
    if requested:
        raise TrainingError(f"end-of-text token {requested!r} is not in the tokenizer's vocabulary")
    raise TrainingError(
        f"the tokenizer has none of the usual end-of-text tokens ({', '.join(EOS_CANDIDATES)}): pass one"
    )


def tokenizer_info(name_or_path: str, eos_token: str | None = None) -> tuple[TokenizerInfo, Tokenizer]:
    resolved, tokenizer = resolve_tokenizer(name_or_path)
    eos, eos_id = pick_eos(tokenizer, eos_token)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    # datatrove stores uint16 tokens while the vocabulary fits, uint32 above.
    token_size = 2 if vocab <= 65536 else 4
    return TokenizerInfo(resolved, vocab, eos, eos_id, token_size), tokenizer


def inspect_dataset(uri: str, text_field: str = "text") -> DatasetFiles:
    """List a dataset's parquet files and count rows from their footers, without reading data."""
    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(uri)
    path = path.rstrip("/")
    if fs.isfile(path):
        folder, files = path.rsplit("/", 1)[0] if "/" in path else ".", [path.rsplit("/", 1)[-1]]
    elif fs.isdir(path):
        folder = path
        found = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
        files = [p[len(path) + 1 :] for p in found]
    else:
        raise TrainingError(f"dataset {uri} does not exist")
    if not files:
        raise TrainingError(f"dataset {uri} has no .parquet files")
    file_rows: list[int] = []
    columns: list[str] = []
    single = fs.isfile(path)
    for name in files:
        # Messages name the file as the user would find it: the input itself, or a file inside it.
        shown = uri if single else f"{uri.rstrip('/')}/{name}"
        try:
            with fs.open(f"{folder}/{name}", "rb") as handle:
                meta = pq.ParquetFile(handle)
                names, count = meta.schema_arrow.names, meta.metadata.num_rows
        except Exception as error:
            raise TrainingError(
                f"dataset file {shown} is not readable parquet: {_first_line(error)}"
            ) from None
        if text_field not in names:
            raise TrainingError(
                f"dataset file {shown} has no {text_field!r} column (columns: {', '.join(names)})"
            )
        file_rows.append(count)
        columns = columns or names
    rows = sum(file_rows)
    if rows == 0:
        raise TrainingError(f"dataset {uri} has no rows")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    folder_uri = folder if protocol in ("file", "local") else f"{protocol}://{folder}"
    return DatasetFiles(folder_uri, files, rows, columns, file_rows)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def count_columns(columns: list[str]) -> dict[str, str]:
    """Group name -> the dataset column that holds it, for the groups this dataset has."""
    chosen = {}
    for group, names in COUNT_COLUMNS.items():
        for name in names:
            if name in columns:
                chosen[group] = name
                break
    return chosen


@dataclass(frozen=True)
class TokenizeOptions:
    """Everything a tokenization run needs; JSON-serialisable so a subprocess can receive it."""

    dataset: str
    output: str
    tokenizer: str
    text_field: str
    eos_token: str
    files: list[str]
    counted: dict[str, str]
    workers: int = 1
    seed: int = 42
    batch_size: int = BATCH_DOCUMENTS
    logging_dir: str = ""
    # Empty: tokens are shuffled in `output` itself. Set when that is remote, and for ranks, so a
    # killed run leaves no unshuffled file where the merge would take it for tokens.
    local_working_dir: str = ""
    # Set for a rank: rows per file, to cut the dataset into shares by rows rather than by files.
    file_rows: list[int] = field(default_factory=list)


def build_pipeline(options: TokenizeOptions) -> list[Any]:
    """The reader and the counting tokenizer, as datatrove steps (datatrove is imported here, late)."""
    from cosmoforge.training.datatrove_steps import ColumnsReader, CountingTokenizer, ShareReader

    glob = options.files[0] if len(options.files) == 1 and "/" not in options.files[0] else "**/*.parquet"
    wanted = list(dict.fromkeys([options.text_field, "id", *options.counted.values()]))
    reader: ColumnsReader | ShareReader
    if options.file_rows:
        reader = ShareReader(options.dataset, options.files, options.file_rows, wanted, options.text_field)
    else:
        reader = ColumnsReader(
            wanted=wanted, data_folder=options.dataset, glob_pattern=glob, text_key=options.text_field
        )
    tokenizer = CountingTokenizer(
        counted=options.counted,
        output_folder=options.output,
        tokenizer_name_or_path=options.tokenizer,
        local_working_dir=options.local_working_dir or None,
        save_filename=SAVE_FILENAME,
        eos_token=options.eos_token,
        batch_size=options.batch_size,
        seed=options.seed,
        shuffle_documents=True,
        save_final_metadata=True,
    )
    return [reader, tokenizer]


def run_pipeline(options: TokenizeOptions) -> None:
    """Run datatrove in this process (one worker) or a guarded pool (several)."""
    from datatrove.executor import LocalPipelineExecutor

    tasks = max(1, min(options.workers, len(options.files)))
    executor = LocalPipelineExecutor(
        pipeline=build_pipeline(options),
        tasks=tasks,
        workers=min(options.workers, tasks),
        logging_dir=options.logging_dir,
        skip_completed=False,
    )
    executor.run()


def _run_in_subprocess(options: TokenizeOptions) -> None:
    command = [sys.executable, "-m", "cosmoforge.training.tokenize", json.dumps(asdict(options))]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
        raise RuntimeError("tokenization worker pool failed:\n" + "\n".join(tail))


def tokens_by_group(stats: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Turn datatrove's merged stats.json into {group: {value: tokens}}."""
    counts: dict[str, dict[str, int]] = {}
    for step in stats:
        for label, metric in step.get("stats", {}).items():
            if not label.startswith(STAT_PREFIX):
                continue
            group, _, value = label[len(STAT_PREFIX) :].partition("/")
            total = metric["total"] if isinstance(metric, dict) else metric
            counts.setdefault(group, {})[value] = int(total)
    return {group: dict(sorted(values.items())) for group, values in sorted(counts.items())}


def existing_token_files(output: str) -> list[str]:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(output)
    if not fs.isdir(path):
        return []
    names = (METRICS_FILE, TOKENIZER_FILE)
    # Only the top level: the ranks' work folder below holds token files that are not output yet.
    found = fs.find(path, maxdepth=1)
    return sorted(p for p in found if ".ds" in p.rsplit("/", 1)[-1] or p.rsplit("/", 1)[-1] in names)


def prepare(
    dataset: str,
    output: str,
    tokenizer: str,
    text_field: str = "text",
    eos_token: str | None = None,
    overwrite: bool = False,
) -> tuple[DatasetFiles, TokenizerInfo, Tokenizer]:
    """Every check that can fail, done before datatrove starts."""
    info, loaded = tokenizer_info(tokenizer, eos_token)
    files = inspect_dataset(dataset, text_field)
    existing = existing_token_files(output)
    if existing and not overwrite:
        raise TrainingError(f"{output} already holds token files: choose another folder or overwrite it")
    return files, info, loaded


def absolute(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def is_local(fs: Any) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"file", "local"} & set(protocols))


def tokenizer_file(info: TokenizerInfo, loaded: Tokenizer, scratch: str) -> str:
    """A tokenizer.json on local disk, with truncation and padding off, for datatrove to load.

    Some tokenizer.json files ship with truncation or padding switched on (sentence encoders cut
    at 128 tokens); pre-training needs every token, so both are turned off in a local copy. The
    copy also spares worker processes a Hub download, and is kept beside the tokens so the folder
    says how it was made.
    """
    if loaded.truncation is None and loaded.padding is None and os.path.isfile(info.name_or_path):
        return info.name_or_path
    loaded.no_truncation()
    loaded.no_padding()
    local = os.path.join(scratch, TOKENIZER_FILE)
    loaded.save(local)
    return local


def tokenize_dataset(
    dataset: str,
    output: str,
    tokenizer: str,
    text_field: str = "text",
    eos_token: str | None = None,
    workers: int = 1,
    seed: int = 42,
    batch_size: int = BATCH_DOCUMENTS,
    overwrite: bool = False,
) -> TokenizeResult:
    """Tokenize `dataset` (parquet file or folder, local or fsspec URI) into `output`."""
    from fsspec.core import url_to_fs

    output, dataset = absolute(output), absolute(dataset)
    files, info, loaded = prepare(dataset, output, tokenizer, text_field, eos_token, overwrite)
    fs, out_path = url_to_fs(output)
    for stale in existing_token_files(output):
        fs.rm_file(stale)
    fs.makedirs(out_path, exist_ok=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cosmo-tokenize-") as scratch:
        local_tokenizer = tokenizer_file(info, loaded, scratch)
        logs = os.path.join(scratch, "logs")
        options = TokenizeOptions(
            dataset=files.folder,
            output=output,
            tokenizer=local_tokenizer,
            text_field=text_field,
            eos_token=info.eos_token,
            files=files.files,
            counted=count_columns(files.columns),
            workers=max(1, workers),
            seed=seed,
            batch_size=batch_size,
            logging_dir=logs,
            # Shuffling copies the file through random reads: do that on local disk when the
            # output lives in object storage.
            local_working_dir=os.path.join(scratch, "shuffle") if not is_local(fs) else "",
        )
        if options.workers > 1 and len(files.files) > 1:
            _run_in_subprocess(options)
        else:
            run_pipeline(options)
        stats = json.loads(Path(logs, "stats.json").read_text())
        fs.put_file(local_tokenizer, f"{out_path.rstrip('/')}/{TOKENIZER_FILE}")
    seconds = time.perf_counter() - started

    token_files = sorted(p for p in fs.find(out_path) if p.endswith(".ds"))
    tokens = sum(fs.size(p) for p in token_files) // info.token_size
    documents = sum(fs.size(p + ".index") for p in token_files) // 8
    result = TokenizeResult(
        output=output,
        dataset=dataset,
        tokenizer=info,
        documents=documents,
        tokens=tokens,
        files=[p[len(out_path.rstrip("/")) + 1 :] for p in token_files],
        tokens_by=tokens_by_group(stats),
        seconds=seconds,
    )
    fs.pipe_file(f"{out_path.rstrip('/')}/{METRICS_FILE}", json.dumps(result.to_json(), indent=2).encode())
    return result


def read_metrics(tokens: str) -> dict[str, Any]:
    """The metrics.json a tokenization wrote; the trainer takes vocabulary and EOS from it."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(tokens if "://" in tokens else os.path.abspath(tokens))
    metrics_path = f"{path.rstrip('/')}/{METRICS_FILE}"
    if not fs.isfile(metrics_path):
        raise TrainingError(
            f"{tokens} is not a tokenized folder: {METRICS_FILE} is missing (run `cosmo tokenize`)"
        )
    data: dict[str, Any] = json.loads(fs.cat_file(metrics_path))
    if data.get("tokens", 0) <= 0:
        raise TrainingError(f"{tokens} holds no tokens")
    return data


if __name__ == "__main__":
    run_pipeline(TokenizeOptions(**json.loads(sys.argv[1])))
