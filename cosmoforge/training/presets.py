"""Model size presets: `tiny` for tests and CPUs, `small` for one GPU, `1b` for the cosmo-1b shape.

cosmo-1b (the model the Cosmopedia blog trained to judge its data) is a Llama with hidden size
2048, intermediate size 8192, 24 layers, 16 attention heads, 2048 positions, trained in bf16.
Keeping the shapes in one table lets the nanotron config, the CPU trainer and the docs agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from cosmoforge.training import TrainingError


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    # Used only when the tokenizer is unknown at render time; a real tokenizer's size wins.
    vocab_size: int
    dtype: str
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    init_std: float
    # Largest micro batch (sequences of max_position_embeddings tokens) one GPU of the target
    # class holds; bigger batches are reached by gradient accumulation.
    max_micro_batch: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def parameter_count(self, vocab_size: int | None = None) -> int:
        """Parameters of the Llama this preset describes (embeddings included)."""
        vocab = vocab_size or self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (2 * self.hidden_size + 2 * kv)
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size
        embeddings = vocab * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attention + mlp + norms) + embeddings + self.hidden_size


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        name="tiny",
        hidden_size=128,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        max_position_embeddings=512,
        vocab_size=4096,
        dtype="float32",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        init_std=0.02,
        max_micro_batch=64,
    ),
    "small": ModelPreset(
        name="small",
        hidden_size=768,
        intermediate_size=3072,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        max_position_embeddings=2048,
        vocab_size=49152,
        dtype="bfloat16",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        init_std=0.02,
        max_micro_batch=16,
    ),
    "1b": ModelPreset(
        name="1b",
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        max_position_embeddings=2048,
        vocab_size=49152,
        dtype="bfloat16",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        init_std=0.02,
        max_micro_batch=8,
    ),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise TrainingError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}") from None


def check_sequence_length(preset: ModelPreset, sequence_length: int) -> None:
    """A preset's rotary table ends at max_position_embeddings; longer windows cannot train."""
    if sequence_length > preset.max_position_embeddings:
        raise TrainingError(
            f"preset {preset.name!r} holds at most {preset.max_position_embeddings} positions, "
            f"but the sequence length is {sequence_length}: lower it or pick a larger preset"
        )
    if sequence_length < 2:
        raise TrainingError(f"sequence length must be at least 2, got {sequence_length}")
