"""Render the nanotron training config from a preset and the spec's `training` overrides.

The target is nanotron 0.2, the release that installs from PyPI and imports (0.4 on PyPI fails
with a circular import). nanotron conflicts with lighteval, so it never enters cosmoforge's own
environment: this module builds plain dicts, and a test loads the YAML with nanotron's own
loader in a separate environment (`scripts/nanotron-venv.sh`). `check_config` repeats the
schema and the arithmetic nanotron relies on, so a broken config is caught where nanotron is
absent too.

nanotron 0.2 reads training data only from Hugging Face datasets, tokenizing on the fly; the
datatrove token files are read by nanotron's later Nanoset, which no PyPI release has. The
config therefore leaves `data.dataset` empty and names the token folder in a `cosmoforge`
section, which nanotron's loader skips (`skip_unused_config_keys`) and cosmoforge's launcher
(`cosmoforge.training.nanotron_launch`) reads to feed nanotron's trainer with datatrove windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from cosmoforge.spec.model import Parallelism, TrainingSpec
from cosmoforge.training import TrainingError
from cosmoforge.training.presets import ModelPreset, check_sequence_length, get_preset

CONFIG_FILE = "nanotron.yaml"
# Padding the vocabulary keeps the embedding matmuls on fast GPU tile sizes and divisible by tp.
VOCAB_MULTIPLE = 128


@dataclass(frozen=True)
class Schedule:
    """Optimizer and learning-rate schedule beyond what the spec names (lr, warmup, steps)."""

    decay_style: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    zero_stage: int = 0


@dataclass(frozen=True)
class DataPaths:
    """Where the trainer reads and writes; URIs are fsspec (s3://, gs://, file://)."""

    tokens: str
    checkpoints: str
    metrics: str
    # Local folder inside the pod where nanotron writes before the launcher uploads.
    local_checkpoints: str = "/checkpoints"


def padded_vocab(vocab_size: int, tp: int) -> int:
    multiple = VOCAB_MULTIPLE * tp
    return math.ceil(vocab_size / multiple) * multiple


def micro_batching(batch_size: int, dp: int, max_micro_batch: int) -> tuple[int, int]:
    """Split a global batch (sequences) into (micro batch, accumulation steps) per replica."""
    if batch_size % dp:
        raise TrainingError(f"batch size {batch_size} is not divisible by data parallelism dp={dp}")
    per_replica = batch_size // dp
    micro = max(d for d in range(1, min(per_replica, max_micro_batch) + 1) if per_replica % d == 0)
    return micro, per_replica // micro


def check_parallelism(preset: ModelPreset, dp: int, tp: int, pp: int) -> None:
    if preset.num_heads % tp or preset.num_kv_heads % tp:
        raise TrainingError(
            f"tp={tp} must divide the {preset.num_heads} attention heads of preset {preset.name!r}"
        )
    if preset.intermediate_size % tp:
        raise TrainingError(f"tp={tp} must divide the intermediate size {preset.intermediate_size}")
    if pp > preset.num_layers:
        raise TrainingError(f"pp={pp} exceeds the {preset.num_layers} layers of preset {preset.name!r}")
    if min(dp, tp, pp) < 1:
        raise TrainingError("dp, tp and pp must be at least 1")


def render_config(
    training: TrainingSpec,
    run_name: str,
    paths: DataPaths,
    vocab_size: int | None = None,
    eos_token_id: int = 0,
    token_size: int | None = None,
    schedule: Schedule | None = None,
    checkpoint_interval: int | None = None,
    seed: int = 42,
) -> dict[str, Any]:
    """The nanotron 0.2 config for this run, as a dict ready for YAML."""
    schedule = schedule or Schedule()
    preset = get_preset(training.preset)
    check_sequence_length(preset, training.sequence_length)
    par = training.parallelism
    check_parallelism(preset, par.dp, par.tp, par.pp)
    if training.warmup_steps >= training.steps:
        raise TrainingError(
            f"warmup ({training.warmup_steps} steps) must be shorter than training ({training.steps})"
        )
    micro, accumulation = micro_batching(training.batch_size, par.dp, preset.max_micro_batch)
    vocab = padded_vocab(vocab_size or preset.vocab_size, par.tp)
    interval = checkpoint_interval or max(1, math.ceil(training.steps / 10))
    return {
        "general": _general_section(run_name, seed),
        "parallelism": _parallelism_section(par),
        "model": _model_section(preset, vocab, eos_token_id),
        "tokenizer": {
            "tokenizer_name_or_path": training.tokenizer,
            "tokenizer_revision": None,
            "tokenizer_max_length": None,
        },
        "checkpoints": _checkpoints_section(paths, interval),
        "logging": {"log_level": "info", "log_level_replica": "info", "iteration_step_info_interval": 1},
        "tokens": _tokens_section(training, micro, accumulation),
        "optimizer": _optimizer_section(training, schedule),
        # nanotron 0.2 can only tokenize HF datasets itself; the token files come through the
        # launcher instead (see the module docstring), so its own dataset entry stays empty.
        "data": {"dataset": None, "seed": seed, "num_loading_workers": 1},
        "profiler": None,
        "lighteval": None,
        "cosmoforge": {
            "tokens": paths.tokens,
            "token_size": token_size or (2 if vocab <= 65536 else 4),
            "checkpoints": paths.checkpoints,
            "metrics": paths.metrics,
            "preset": preset.name,
        },
    }


def _general_section(run_name: str, seed: int) -> dict[str, Any]:
    return {
        "project": "cosmoforge",
        "run": run_name,
        "seed": seed,
        "step": None,
        "consumed_train_samples": None,
        "benchmark_csv_path": None,
        "ignore_sanity_checks": True,
    }


def _parallelism_section(par: Parallelism) -> dict[str, Any]:
    return {
        "dp": par.dp,
        "tp": par.tp,
        "pp": par.pp,
        "pp_engine": "1f1b",
        "tp_mode": "ALL_REDUCE",
        "tp_linear_async_communication": False,
        "recompute_granularity": None,
        "expert_parallel_size": 1,
    }


def _checkpoints_section(paths: DataPaths, interval: int) -> dict[str, Any]:
    return {
        "checkpoints_path": paths.local_checkpoints,
        "checkpoint_interval": interval,
        "save_initial_state": False,
        "resume_checkpoint_path": None,
        "checkpoints_path_is_shared_file_system": False,
    }


def _tokens_section(training: TrainingSpec, micro: int, accumulation: int) -> dict[str, Any]:
    return {
        "sequence_length": training.sequence_length,
        "train_steps": training.steps,
        "micro_batch_size": micro,
        "batch_accumulation_per_replica": accumulation,
        "val_check_interval": -1,
        "limit_val_batches": 0,
        "limit_test_batches": 0,
    }


def _model_section(preset: ModelPreset, vocab: int, eos_token_id: int) -> dict[str, Any]:
    return {
        "model_config": {
            "bos_token_id": eos_token_id,
            "eos_token_id": eos_token_id,
            "hidden_act": "silu",
            "hidden_size": preset.hidden_size,
            "initializer_range": preset.init_std,
            "intermediate_size": preset.intermediate_size,
            "is_llama_config": True,
            "max_position_embeddings": preset.max_position_embeddings,
            "num_attention_heads": preset.num_heads,
            "num_hidden_layers": preset.num_layers,
            "num_key_value_heads": preset.num_kv_heads,
            "pad_token_id": None,
            "pretraining_tp": 1,
            "rms_norm_eps": preset.rms_norm_eps,
            "rope_scaling": None,
            "tie_word_embeddings": preset.tie_word_embeddings,
            "use_cache": True,
            "vocab_size": vocab,
        },
        "init_method": {"std": preset.init_std},
        "dtype": preset.dtype,
        "make_vocab_size_divisible_by": 1,
        "ddp_bucket_cap_mb": 25,
    }


def _optimizer_section(training: TrainingSpec, schedule: Schedule) -> dict[str, Any]:
    lr = training.learning_rate
    return {
        "zero_stage": schedule.zero_stage,
        "weight_decay": schedule.weight_decay,
        "clip_grad": schedule.clip_grad,
        "accumulate_grad_in_fp32": True,
        "adam_eps": schedule.adam_eps,
        "adam_beta1": schedule.adam_beta1,
        "adam_beta2": schedule.adam_beta2,
        "torch_adam_is_fused": True,
        "learning_rate_scheduler": {
            "learning_rate": lr,
            "lr_warmup_steps": training.warmup_steps,
            "lr_warmup_style": "linear",
            "lr_decay_style": schedule.decay_style,
            "lr_decay_steps": training.steps - training.warmup_steps,
            "lr_decay_starting_step": None,
            "min_decay_lr": lr * schedule.min_lr_ratio,
        },
    }


def to_yaml(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


# The nanotron 0.2 schema, section by section: key -> accepted Python types. A key missing here
# is unknown to nanotron 0.2 and its strict loader would reject it.
_NUM = (int, float)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "general": {
        "project": (str,),
        "run": _OPT_STR,
        "seed": _OPT_INT,
        "step": _OPT_INT,
        "consumed_train_samples": _OPT_INT,
        "benchmark_csv_path": _OPT_STR,
        "ignore_sanity_checks": (bool,),
    },
    "parallelism": {
        "dp": (int,),
        "tp": (int,),
        "pp": (int,),
        "pp_engine": _OPT_STR,
        "tp_mode": _OPT_STR,
        "tp_linear_async_communication": (bool, type(None)),
        "recompute_granularity": _OPT_STR,
        "expert_parallel_size": (int,),
    },
    "model": {
        "model_config": (dict,),
        "init_method": (dict,),
        "dtype": _OPT_STR,
        "make_vocab_size_divisible_by": (int,),
        "ddp_bucket_cap_mb": (int,),
    },
    "model.model_config": {
        "bos_token_id": (int,),
        "eos_token_id": (int,),
        "hidden_act": (str,),
        "hidden_size": (int,),
        "initializer_range": _NUM,
        "intermediate_size": (int,),
        "is_llama_config": (bool,),
        "max_position_embeddings": (int,),
        "num_attention_heads": (int,),
        "num_hidden_layers": (int,),
        "num_key_value_heads": _OPT_INT,
        "pad_token_id": _OPT_INT,
        "pretraining_tp": (int,),
        "rms_norm_eps": _NUM,
        "rope_scaling": (dict, type(None)),
        "tie_word_embeddings": (bool,),
        "use_cache": (bool,),
        "vocab_size": (int,),
    },
    "tokenizer": {
        "tokenizer_name_or_path": _OPT_STR,
        "tokenizer_revision": _OPT_STR,
        "tokenizer_max_length": _OPT_INT,
    },
    "checkpoints": {
        "checkpoints_path": (str,),
        "checkpoint_interval": (int,),
        "save_initial_state": (bool, type(None)),
        "resume_checkpoint_path": _OPT_STR,
        "checkpoints_path_is_shared_file_system": (bool, type(None)),
    },
    "logging": {
        "log_level": _OPT_STR,
        "log_level_replica": _OPT_STR,
        "iteration_step_info_interval": _OPT_INT,
    },
    "tokens": {
        "sequence_length": (int,),
        "train_steps": (int,),
        "micro_batch_size": (int,),
        "batch_accumulation_per_replica": (int,),
        "val_check_interval": _OPT_INT,
        "limit_val_batches": _OPT_INT,
        "limit_test_batches": _OPT_INT,
    },
    "optimizer": {
        "zero_stage": (int,),
        "weight_decay": _NUM,
        "clip_grad": (*_NUM, type(None)),
        "accumulate_grad_in_fp32": (bool,),
        "adam_eps": _NUM,
        "adam_beta1": _NUM,
        "adam_beta2": _NUM,
        "torch_adam_is_fused": (bool,),
        "learning_rate_scheduler": (dict,),
    },
    "optimizer.learning_rate_scheduler": {
        "learning_rate": _NUM,
        "lr_warmup_steps": (int,),
        "lr_warmup_style": (str,),
        "lr_decay_style": (str,),
        "lr_decay_steps": _OPT_INT,
        "lr_decay_starting_step": _OPT_INT,
        "min_decay_lr": _NUM,
    },
    "data": {"dataset": (dict, type(None)), "seed": _OPT_INT, "num_loading_workers": _OPT_INT},
}
REQUIRED_SECTIONS = ("general", "parallelism", "model", "tokenizer")
OPTIONAL_SECTIONS = ("checkpoints", "logging", "tokens", "optimizer", "data", "profiler", "lighteval")
# Sections nanotron's loader drops with skip_unused_config_keys; only cosmoforge's launcher reads them.
EXTRA_SECTIONS = ("cosmoforge",)


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_config(config: dict[str, Any]) -> list[str]:
    """Problems nanotron 0.2 would raise (schema) or hit at start-up (shapes); empty when fine."""
    problems = []
    for section in REQUIRED_SECTIONS:
        if section not in config:
            problems.append(f"missing section {section}")
    for key in config:
        if key not in REQUIRED_SECTIONS + OPTIONAL_SECTIONS + EXTRA_SECTIONS:
            problems.append(f"unknown section {key}")
    for dotted, fields in SCHEMA.items():
        node = _lookup(config, dotted)
        if node is None:
            continue
        for key, value in node.items():
            if key not in fields:
                problems.append(f"{dotted}.{key}: unknown key")
            elif not isinstance(value, fields[key]) or (isinstance(value, bool) and bool not in fields[key]):
                problems.append(f"{dotted}.{key}: {type(value).__name__} is not allowed")
    if problems:
        return problems

    model = config["model"]["model_config"]
    par = config["parallelism"]
    tokens = config.get("tokens") or {}
    schedule = (config.get("optimizer") or {}).get("learning_rate_scheduler") or {}
    if model["hidden_size"] % model["num_attention_heads"]:
        problems.append("model: hidden_size is not a multiple of num_attention_heads")
    if model["num_attention_heads"] % par["tp"]:
        problems.append("parallelism.tp does not divide the attention heads")
    if model["vocab_size"] % par["tp"]:
        problems.append("parallelism.tp does not divide the vocabulary")
    if par["pp"] > model["num_hidden_layers"]:
        problems.append("parallelism.pp exceeds the number of layers")
    if tokens and tokens["sequence_length"] > model["max_position_embeddings"]:
        problems.append("tokens.sequence_length exceeds model max_position_embeddings")
    if schedule.get("lr_warmup_style") not in ("linear", "constant"):
        problems.append("learning_rate_scheduler.lr_warmup_style must be linear or constant")
    if schedule.get("lr_decay_style") not in ("linear", "cosine"):
        problems.append("learning_rate_scheduler.lr_decay_style must be linear or cosine")
    if config["model"].get("dtype") not in ("bfloat16", "float16", "float32"):
        problems.append("model.dtype must be bfloat16, float16 or float32")
    if par.get("pp_engine") not in (None, "1f1b", "afab"):
        problems.append("parallelism.pp_engine must be 1f1b or afab")
    return problems


def world_size(config: dict[str, Any]) -> int:
    par = config["parallelism"]
    return int(par["dp"] * par["tp"] * par["pp"])
