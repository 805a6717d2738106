"""nanotron -> transformers conversion: the converted model computes what nanotron's model computes.

nanotron itself needs CUDA and flash-attention, so its forward pass is written out here from
its modelling code (fused qkv and gate_up, interleaved rotary, RMSNorm, grouped-query
attention) and run on the CPU over random weights. The weights are stored the way nanotron
stores them, tensor-parallel shards and slice metadata included; the converted folder must load
with `AutoModelForCausalLM.from_pretrained` and give the same logits on a fixed input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cosmoforge.training import TrainingError, convert
from cosmoforge.training.convert import LlamaShape, convert_checkpoint, nanotron_to_llama

CONFIG = {
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 48,
    "is_llama_config": True,
    "max_position_embeddings": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pad_token_id": None,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-5,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 96,
}


def random_nanotron_state(config: dict[str, object], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])  # type: ignore[call-overload]
    heads, kv = int(config["num_attention_heads"]), int(config["num_key_value_heads"])  # type: ignore[call-overload]
    head_dim, vocab = hidden // heads, int(config["vocab_size"])  # type: ignore[call-overload]

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    state = {
        "model.token_position_embeddings.pp_block.token_embedding.weight": rand(vocab, hidden, scale=1.0),
        "model.final_layer_norm.pp_block.weight": 1 + rand(hidden, scale=0.1),
    }
    if not config["tie_word_embeddings"]:
        state["model.lm_head.pp_block.weight"] = rand(vocab, hidden)
    for layer in range(int(config["num_hidden_layers"])):  # type: ignore[call-overload]
        block = f"model.decoder.{layer}.pp_block"
        state |= {
            f"{block}.input_layernorm.weight": 1 + rand(hidden, scale=0.1),
            f"{block}.attn.qkv_proj.weight": rand((heads + 2 * kv) * head_dim, hidden),
            f"{block}.attn.o_proj.weight": rand(hidden, heads * head_dim),
            f"{block}.post_attention_layernorm.weight": 1 + rand(hidden, scale=0.1),
            f"{block}.mlp.gate_up_proj.weight": rand(2 * inter, hidden),
            f"{block}.mlp.down_proj.weight": rand(hidden, inter),
        }
    return state


# --- nanotron's forward pass, from its modelling code ---------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def interleaved_rotary(x: torch.Tensor) -> torch.Tensor:
    """flash-attention's rotary with interleaved=True: pairs (0,1), (2,3), ... of each head."""
    _, length, _, dim = x.shape
    freqs = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)  # [length, dim/2]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    pairs = x.reshape(*x.shape[:-1], dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).reshape(x.shape)


def nanotron_logits(
    state: dict[str, torch.Tensor], config: dict[str, object], ids: torch.Tensor
) -> torch.Tensor:
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])  # type: ignore[call-overload]
    heads, kv = int(config["num_attention_heads"]), int(config["num_key_value_heads"])  # type: ignore[call-overload]
    head_dim, eps = hidden // heads, float(config["rms_norm_eps"])  # type: ignore[arg-type]
    embedding = state["model.token_position_embeddings.pp_block.token_embedding.weight"]
    x = embedding[ids]
    batch, length = ids.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for layer in range(int(config["num_hidden_layers"])):  # type: ignore[call-overload]
        block = f"model.decoder.{layer}.pp_block"
        h = rms_norm(x, state[f"{block}.input_layernorm.weight"], eps)
        q, k, v = (h @ state[f"{block}.attn.qkv_proj.weight"].T).split(
            [heads * head_dim, kv * head_dim, kv * head_dim], dim=-1
        )
        q = interleaved_rotary(q.reshape(batch, length, heads, head_dim))
        k = interleaved_rotary(k.reshape(batch, length, kv, head_dim))
        v = v.reshape(batch, length, kv, head_dim)
        k, v = (t.repeat_interleave(heads // kv, dim=2) for t in (k, v))  # query head h reads kv head h // n
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / head_dim**0.5
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attended = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, heads * head_dim)
        x = x + attended @ state[f"{block}.attn.o_proj.weight"].T
        h = rms_norm(x, state[f"{block}.post_attention_layernorm.weight"], eps)
        gate, up = (h @ state[f"{block}.mlp.gate_up_proj.weight"].T).split(inter, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ state[f"{block}.mlp.down_proj.weight"].T
    x = rms_norm(x, state["model.final_layer_norm.pp_block.weight"], eps)
    head = state.get("model.lm_head.pp_block.weight", embedding)
    return x @ head.T


# --- nanotron's files ----------------------------------------------------------------------


def chunks_for(name: str, config: dict[str, object]) -> list[int] | None:
    """Row chunks nanotron shards one by one (TensorParallelColumnLinear contiguous_chunks)."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])  # type: ignore[call-overload]
    head_dim, kv = hidden // heads, int(config["num_key_value_heads"])  # type: ignore[call-overload]
    if name.endswith("qkv_proj.weight"):
        return [heads * head_dim, kv * head_dim, kv * head_dim]
    if name.endswith("gate_up_proj.weight"):
        return [int(config["intermediate_size"])] * 2  # type: ignore[call-overload]
    return None


def write_nanotron_checkpoint(
    folder: Path, state: dict[str, torch.Tensor], config: dict[str, object], tp: int
) -> None:
    """One safetensors file per parameter (per shard under tensor parallelism), as nanotron saves."""
    folder.mkdir(parents=True)
    (folder / "model_config.json").write_text(json.dumps(config))
    for name, tensor in state.items():
        *parts, leaf = name.split(".")
        directory = folder.joinpath("model", *parts)
        directory.mkdir(parents=True, exist_ok=True)
        chunks = chunks_for(name, config)
        if tp == 1 or chunks is None:
            save_file({"data": tensor.contiguous()}, str(directory / f"model_{leaf}.safetensors"))
            continue
        for rank in range(tp):
            pieces, pairs, local_start, global_start = [], [], 0, 0
            for chunk in chunks:
                size = chunk // tp
                start = global_start + rank * size
                pieces.append(tensor[start : start + size])
                local = f"{local_start},{local_start + size},None|None,None,None"
                pairs.append(f"{local}#{start},{start + size},None|None,None,None")
                local_start += size
                global_start += chunk
            metadata = {
                "version": "1.4",
                "local_global_slices_pairs": ";".join(pairs),
                "unsharded_shape": str(tuple(tensor.shape)),
            }
            path = directory / f"model_{leaf}_pp-rank-0-of-1_tp-rank-{rank}-of-{tp}.safetensors"
            save_file({"data": torch.cat(pieces).contiguous()}, str(path), metadata=metadata)


@pytest.mark.parametrize(("tied", "tp"), [(False, 2), (True, 1)])
def test_converted_checkpoint_gives_nanotron_logits(tmp_path: Path, tied: bool, tp: int) -> None:
    from transformers import AutoModelForCausalLM

    config = {**CONFIG, "tie_word_embeddings": tied}
    state = random_nanotron_state(config)
    checkpoints = tmp_path / "checkpoints"
    write_nanotron_checkpoint(checkpoints / "12", state, config, tp=tp)
    (checkpoints / "latest.txt").write_text("12")

    location = convert_checkpoint(str(checkpoints), str(tmp_path / "hf"))
    assert location == f"{tmp_path / 'hf'}/checkpoint"
    assert json.loads((tmp_path / "hf" / "conversion.json").read_text())["source"].endswith("/12")
    model = AutoModelForCausalLM.from_pretrained(location).eval()
    assert model.config.tie_word_embeddings is tied

    ids = torch.tensor([[5, 17, 3, 88, 42, 0, 9, 64, 31, 2, 77, 11]])
    with torch.no_grad():
        converted = model(input_ids=ids).logits
    expected = nanotron_logits(state, config, ids)
    torch.testing.assert_close(converted, expected, rtol=1e-4, atol=1e-4)


def test_without_the_rotary_reordering_the_logits_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    # The check above is sharp: mapping the query and key rows as they are gives other logits.
    from transformers import LlamaForCausalLM

    state = random_nanotron_state(CONFIG, seed=1)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    monkeypatch.setattr(convert, "interleaved_to_half", lambda weight, heads, head_dim: weight)
    weights = nanotron_to_llama(state, LlamaShape.from_model_config(CONFIG))
    model = LlamaForCausalLM(convert.llama_config(CONFIG)).eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        naive = model(input_ids=ids).logits
    assert not torch.allclose(naive, nanotron_logits(state, CONFIG, ids), atol=1e-3)


def test_unknown_or_missing_parameters_are_errors() -> None:
    shape = LlamaShape.from_model_config(CONFIG)
    state = random_nanotron_state(CONFIG)
    with pytest.raises(TrainingError, match=r"does not know: model\.extra"):
        nanotron_to_llama({**state, "model.extra.weight": torch.zeros(1)}, shape)
    del state["model.decoder.1.pp_block.mlp.down_proj.weight"]
    with pytest.raises(TrainingError, match=r"no parameter model\.decoder\.1\.pp_block\.mlp\.down_proj"):
        nanotron_to_llama(state, shape)


def test_a_folder_without_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"no nanotron checkpoint \(latest.txt"):
        convert_checkpoint(str(tmp_path), str(tmp_path / "hf"))
