"""One spec, the whole chain on this machine: generate -> dataset -> tokens -> tiny model -> eval table."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import yaml
from tokenizers import Tokenizer

from conftest import COSMO, EXAMPLES, write_spec
from cosmoforge.generation.compact import read_dataset
from cosmoforge.spec.model import KNOWN_BENCHMARKS
from cosmoforge.spec.validation import resolve_uri
from cosmoforge.storage import RunStore


def test_quickstart_train_runs_the_whole_chain(tmp_path: Path) -> None:
    document = yaml.safe_load((EXAMPLES / "quickstart-train.yaml").read_text())
    document["spec"]["seeds"] = document["spec"]["seeds"][1:]  # math only: 8 prompts keep it short
    document["spec"]["generation"]["maxNewTokens"] = 64
    spec = write_spec(tmp_path / "run.yaml", document)
    result = subprocess.run(
        [*COSMO, "run", str(spec), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "out" / "quickstart-train"
    dataset = read_dataset(RunStore.open(str(tmp_path / "out"), "quickstart-train"))
    assert dataset is not None and dataset.num_rows == 8

    # Token counts match the dataset: every document encoded, plus one EOS between documents.
    tokenizer = Tokenizer.from_file(resolve_uri("cosmoforge://tokenizers/bpe-600.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    expected = sum(len(tokenizer.encode(text).ids) + 1 for text in dataset.column("text").to_pylist())
    training = json.loads((run / "metrics" / "training.json").read_text())
    assert training["documents"] == 8
    assert training["tokens"] == expected
    token_files = list((run / "tokens").glob("*.ds"))
    assert sum(np.fromfile(f, dtype=np.uint16).size for f in token_files) == expected

    # The loss curve goes down on the run's own data.
    losses = [
        json.loads(line)["loss"] for line in (run / "checkpoints" / "loss.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert (run / "checkpoints" / "loss.png").exists()

    # One row per benchmark task in the evaluation table.
    results = json.loads((run / "eval" / "results.json").read_text())
    assert sorted(task["task"] for task in results["tasks"]) == sorted(KNOWN_BENCHMARKS)
    assert all(0.0 <= task["acc"] <= 1.0 and task["samples"] > 0 for task in results["tasks"])
    table = (run / "eval" / "results.md").read_text()
    assert all(f"| {name} " in table for name in KNOWN_BENCHMARKS)
