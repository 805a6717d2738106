"""`cosmo tokenize`, `cosmo train` and `cosmo evaluate` on a real S3-compatible server (moto).

The tiny preset trains for a few steps straight into a bucket, a crash after a resume state was
uploaded continues where it stopped (and ends with the same weights as an uninterrupted run),
and evaluation reads the checkpoint and the task data from the bucket and writes its table there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from cosmoforge.cli.main import main as cosmo
from cosmoforge.training.cpu_train import RESUME_STATE, TrainConfig, train
from cosmoforge.training.metrics import training_summary
from cosmoforge.training.remote import read_bytes, upload_file, upload_folder

DATA = Path(__file__).parents[1] / "data" / "training"
TRAIN = ["--preset", "tiny", "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3"]
TRAIN += ["--warmup", "2", "--checkpoint-every", "3"]


class Crash(Exception):
    """A process dying between steps, after the resume state of step 3 was uploaded."""


@pytest.fixture
def bucket_tokens(s3_bucket: str) -> str:
    uri = f"s3://{s3_bucket}/run/tokens"
    tokenizer = f"s3://{s3_bucket}/tokenizers/tokenizer.json"  # the tokenizer in the bucket too
    upload_file(DATA / "tokenizer.json", tokenizer)
    argv = ["tokenize", str(DATA / "dataset"), "--out", uri, "--tokenizer", tokenizer]
    assert cosmo(argv) == 0
    return uri


def test_train_and_evaluate_through_s3(s3_bucket: str, bucket_tokens: str, tmp_path: Path) -> None:
    out = f"s3://{s3_bucket}/run/checkpoints"
    assert cosmo(["train", bucket_tokens, "--out", out, *TRAIN]) == 0
    assert not Path(out.replace("s3://", "")).exists(), "an s3:// output became a local folder"
    summary = json.loads(read_bytes(f"{out}/train.json") or b"{}")
    assert summary["steps"] == 6 and summary["resumed_from_step"] == 0
    rows = [json.loads(line) for line in (read_bytes(f"{out}/loss.jsonl") or b"").decode().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 7))
    assert read_bytes(f"{out}/checkpoint/config.json") is not None
    assert read_bytes(f"{out}/{RESUME_STATE}") is not None
    progress = json.loads(read_bytes(f"{out}/progress.json") or b"{}")
    assert [record["step"] for record in progress["history"]] == list(range(1, 7))

    # Task data in the bucket too: every path of the stage is object storage.
    data = f"s3://{s3_bucket}/tasks"
    upload_folder(DATA / "tasks", data)
    results = f"s3://{s3_bucket}/run/eval"
    argv = ["evaluate", out, "--out", results, "--data-dir", data, "--tasks", "arc_easy,boolq"]
    assert cosmo([*argv, "--max-samples", "2"]) == 0
    table = json.loads(read_bytes(f"{results}/results.json") or b"{}")
    assert table["checkpoint"] == f"{out}/checkpoint"
    assert [(row["task"], row["samples"]) for row in table["tasks"]] == [("arc_easy", 2), ("boolq", 2)]
    assert table["tasks"][0]["source"] == f"{data}/arc_easy"
    assert (read_bytes(f"{results}/results.md") or b"").startswith(b"# Evaluation of `checkpoints`")
    # What the run's status shows, from the two files the stages left in the bucket.
    status = training_summary(progress, table)
    assert (status["step"], status["totalSteps"], status["loss"]) == (6, 6, round(rows[-1]["loss"], 4))
    assert set(status["evaluation"]) == {"arc_easy", "boolq"} and "mfu" not in status


def test_a_restarted_training_resumes_from_the_bucket(s3_bucket: str, bucket_tokens: str) -> None:
    import torch
    from safetensors.torch import load

    config = TrainConfig(
        preset="tiny", steps=6, batch_size=4, sequence_length=32, learning_rate=3e-3, warmup_steps=2
    )
    config = TrainConfig(**{**config.__dict__, "checkpoint_every": 3})
    straight = train(bucket_tokens, f"s3://{s3_bucket}/straight", config)

    interrupted = f"s3://{s3_bucket}/interrupted"

    def crash_after_step_4(row: dict[str, float]) -> None:
        if row["step"] == 4:
            raise Crash

    with pytest.raises(Crash):
        train(bucket_tokens, interrupted, config, on_step=crash_after_step_4)
    assert read_bytes(f"{interrupted}/train.json") is None
    partial = (read_bytes(f"{interrupted}/loss.jsonl") or b"").decode().splitlines()
    assert [json.loads(line)["step"] for line in partial] == [1, 2, 3]

    resumed = train(bucket_tokens, interrupted, config)
    summary = json.loads(read_bytes(f"{interrupted}/train.json") or b"{}")
    assert summary["resumed_from_step"] == 3
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    weights = [
        load(read_bytes(f"{uri}/checkpoint/model.safetensors") or b"")
        for uri in (straight.output, resumed.output)
    ]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=1e-5, atol=1e-6)

    # The same folder with other settings is someone else's training: refused, not overwritten.
    other = TrainConfig(**{**config.__dict__, "learning_rate": 1e-3})
    assert cosmo(["train", bucket_tokens, "--out", interrupted, *TRAIN, "--lr", "1e-3"]) == 2
    with pytest.raises(Exception, match="another training"):
        train(bucket_tokens, interrupted, other)
