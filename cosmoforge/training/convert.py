"""Turn a nanotron Llama checkpoint into a transformers one, so lighteval can evaluate it.

nanotron and transformers describe the same Llama with different parameter names and three
differences of layout, all handled by `nanotron_to_llama`, a pure function of the state dict:

- the query, key and value projections are one fused `qkv_proj` matrix (rows q, then k, then v)
  and the MLP's gate and up projections one `gate_up_proj` (rows gate, then up);
- nanotron trains with flash-attention's *interleaved* rotary embedding, which rotates the
  dimension pairs (0, 1), (2, 3), ... of every head, while transformers' Llama rotates the pairs
  (i, i + head_dim / 2); reordering the query and key rows of each head (even dimensions first,
  then odd) makes transformers rotate exactly what nanotron rotated, and the attention scores,
  dot products over the same pairs, stay the same;
- a tied language-model head is stored once, as the embedding.

On disk (nanotron 0.2) a checkpoint is a folder per step (`<step>/`, named by `latest.txt`
beside them) holding `model_config.json` and one safetensors file per parameter under
`model/`, the path spelling the parameter's name. A tensor-parallel parameter is one file per
shard, and each file's metadata says which slice of the whole tensor it holds
(`local_global_slices_pairs`); `read_nanotron_checkpoint` puts the pieces back together, so the
conversion itself never sees shards.

torch, safetensors and transformers load inside the functions; the checkpoint and the output
may be local folders or fsspec URIs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cosmoforge.training import TrainingError, remote

if TYPE_CHECKING:
    import torch

MODEL_CONFIG = "model_config.json"
LATEST = "latest.txt"
_SHARD = re.compile(r"^model_(?P<name>[a-z_]+?)(?:_pp-rank-\d+-of-\d+_tp-rank-\d+-of-\d+)?\.safetensors$")


@dataclass(frozen=True)
class LlamaShape:
    """What the key mapping needs to know about the model."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> LlamaShape:
        heads = int(config["num_attention_heads"])
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config["hidden_size"]) // heads,
            intermediate_size=int(config["intermediate_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


def interleaved_to_half(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved rotary pairs to transformers' half-split pairs."""
    import torch

    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return weight.reshape(heads, head_dim, -1)[:, order, :].reshape(heads * head_dim, -1)


def nanotron_to_llama(state: Mapping[str, torch.Tensor], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """nanotron parameter names and layouts -> transformers `LlamaForCausalLM` ones.

    Every nanotron parameter must be used: a name the mapping does not know is an error rather
    than a weight silently left at its initial value."""
    remaining = dict(state)

    def take(name: str) -> torch.Tensor:
        try:
            return remaining.pop(name)
        except KeyError:
            raise TrainingError(f"the nanotron checkpoint has no parameter {name}") from None

    q_rows = shape.num_heads * shape.head_dim
    kv_rows = shape.num_kv_heads * shape.head_dim
    result: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": take("model.token_position_embeddings.pp_block.token_embedding.weight"),
        "model.norm.weight": take("model.final_layer_norm.pp_block.weight"),
    }
    for layer in range(shape.num_layers):
        source, target = f"model.decoder.{layer}.pp_block", f"model.layers.{layer}"
        qkv = take(f"{source}.attn.qkv_proj.weight")
        if qkv.shape[0] != q_rows + 2 * kv_rows:
            raise TrainingError(
                f"{source}.attn.qkv_proj has {qkv.shape[0]} rows, expected {q_rows + 2 * kv_rows}"
            )
        q, k, v = qkv.split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = take(f"{source}.mlp.gate_up_proj.weight").split(shape.intermediate_size, dim=0)
        result |= {
            f"{target}.input_layernorm.weight": take(f"{source}.input_layernorm.weight"),
            f"{target}.self_attn.q_proj.weight": interleaved_to_half(q, shape.num_heads, shape.head_dim),
            f"{target}.self_attn.k_proj.weight": interleaved_to_half(k, shape.num_kv_heads, shape.head_dim),
            f"{target}.self_attn.v_proj.weight": v,
            f"{target}.self_attn.o_proj.weight": take(f"{source}.attn.o_proj.weight"),
            f"{target}.post_attention_layernorm.weight": take(f"{source}.post_attention_layernorm.weight"),
            f"{target}.mlp.gate_proj.weight": gate,
            f"{target}.mlp.up_proj.weight": up,
            f"{target}.mlp.down_proj.weight": take(f"{source}.mlp.down_proj.weight"),
        }
    head = remaining.pop("model.lm_head.pp_block.weight", None)
    if not shape.tie_word_embeddings:
        if head is None:
            raise TrainingError("the nanotron checkpoint has no lm_head and its embeddings are not tied")
        result["lm_head.weight"] = head
    if remaining:
        raise TrainingError(
            f"nanotron parameters the conversion does not know: {', '.join(sorted(remaining))}"
        )
    return {name: tensor.contiguous() for name, tensor in result.items()}


def llama_config(model_config: Mapping[str, Any]) -> Any:
    """The transformers `LlamaConfig` of a nanotron `model_config.json`."""
    from transformers import LlamaConfig

    heads = int(model_config["num_attention_heads"])
    return LlamaConfig(
        vocab_size=int(model_config["vocab_size"]),
        hidden_size=int(model_config["hidden_size"]),
        intermediate_size=int(model_config["intermediate_size"]),
        num_hidden_layers=int(model_config["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(model_config.get("num_key_value_heads") or heads),
        max_position_embeddings=int(model_config["max_position_embeddings"]),
        rms_norm_eps=float(model_config["rms_norm_eps"]),
        # nanotron 0.2's attention builds its rotary tables with the default base whatever the
        # config says; an explicit value is kept for later releases that honour it.
        rope_theta=float(model_config.get("rope_theta") or 10000.0),
        tie_word_embeddings=bool(model_config.get("tie_word_embeddings", False)),
        hidden_act=str(model_config.get("hidden_act", "silu")),
        initializer_range=float(model_config.get("initializer_range", 0.02)),
        bos_token_id=model_config.get("bos_token_id"),
        eos_token_id=model_config.get("eos_token_id"),
        pad_token_id=model_config.get("pad_token_id"),
    )


def _parse_slices(text: str) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """nanotron's `local_global_slices_pairs` metadata: `l0|l1#g0|g1;...`, a slice as `a,b,c`."""

    def one(part: str) -> tuple[slice, ...]:
        return tuple(
            slice(*(None if item == "None" else int(item) for item in piece.split(",")))
            for piece in part.split("|")
        )

    pairs = []
    for pair in text.split(";"):
        local, global_ = pair.split("#")
        pairs.append((one(local), one(global_)))
    return pairs


def read_nanotron_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole (unsharded) state dict and the model config of one nanotron checkpoint step."""
    import torch
    from safetensors import safe_open

    config_path = folder / MODEL_CONFIG
    if not config_path.is_file():
        raise TrainingError(f"{folder} is not a nanotron checkpoint: no {MODEL_CONFIG}")
    model_config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    root = folder / "model"
    state: dict[str, torch.Tensor] = {}
    for path in sorted(root.rglob("model_*.safetensors")):
        match = _SHARD.match(path.name)
        if match is None:
            continue
        name = ".".join((*path.parent.relative_to(root).parts, match["name"]))
        with safe_open(str(path), framework="pt") as handle:
            tensor = handle.get_tensor(handle.keys()[0])
            metadata = handle.metadata() or {}
        if "unsharded_shape" not in metadata:
            state[name] = tensor
            continue
        shape = tuple(
            int(size) for size in metadata["unsharded_shape"].strip("()").split(",") if size.strip()
        )
        whole = state.setdefault(name, torch.zeros(shape, dtype=tensor.dtype))
        for local, global_ in _parse_slices(metadata["local_global_slices_pairs"]):
            whole[global_] = tensor[local]
    if not state:
        raise TrainingError(f"{folder} holds no nanotron weights under model/")
    return state, model_config


def latest_step(checkpoints: str) -> str:
    """The checkpoint step folder to read: `checkpoints` itself, or the step `latest.txt` names."""
    if remote.is_file(remote.join(checkpoints, MODEL_CONFIG)):
        return checkpoints
    latest = remote.read_bytes(remote.join(checkpoints, LATEST))
    if latest is None:
        raise TrainingError(f"{checkpoints} holds no nanotron checkpoint ({LATEST} or {MODEL_CONFIG})")
    return remote.join(checkpoints, latest.decode().strip())


def convert_checkpoint(source: str, output: str, tokens: str | None = None) -> str:
    """Write the transformers form of the nanotron checkpoint `source` (a step folder, or the
    checkpoints folder whose `latest.txt` names one) to `output/checkpoint`, with the tokenizer
    kept beside the tokens; returns the checkpoint's location."""
    import torch
    from transformers import LlamaForCausalLM

    from cosmoforge.training.cpu_train import CHECKPOINT_DIR, store_tokenizer
    from cosmoforge.training.tokenize import read_metrics

    step = latest_step(source)
    with (
        remote.local_copy(step, prefix="cosmo-convert-src-") as local,
        remote.staging(output, prefix="cosmo-convert-") as out,
    ):
        state, model_config = read_nanotron_checkpoint(local)
        config = llama_config(model_config)
        weights = nanotron_to_llama(state, LlamaShape.from_model_config(model_config))
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # A tied head is the embedding itself: transformers lists it, nanotron stores it once.
        if set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()) or unexpected:
            raise TrainingError(f"converted weights do not fit: missing {missing}, unexpected {unexpected}")
        # Kept in the dtype nanotron trained in (bfloat16 for the GPU presets), not float32.
        torch.nn.Module.to(model, dtype=next(iter(weights.values())).dtype)
        checkpoint = out / CHECKPOINT_DIR
        model.save_pretrained(str(checkpoint))
        if tokens is not None:
            store_tokenizer(tokens, read_metrics(tokens)["tokenizer"], checkpoint)
        (out / "conversion.json").write_text(
            json.dumps({"source": step, "parameters": sum(t.numel() for t in weights.values())}, indent=2),
            encoding="utf-8",
        )
        if remote.is_remote(output):
            remote.upload_folder(checkpoint, remote.join(output, CHECKPOINT_DIR))
            remote.upload_file(out / "conversion.json", remote.join(output, "conversion.json"))
    return remote.join(output, CHECKPOINT_DIR)
