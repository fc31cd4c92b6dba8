"""Build the causal language model from a named preset or a Hugging Face config file."""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

# Llama-style shapes. The paper's models (60M/150M/400M) use 3x896, 12x896 and 12x1536 with a 32k
# vocabulary; the CPU presets use the embedded tokenizer's 8k vocabulary.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=384,
        vocab_size=8192,
        tie_word_embeddings=True,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=768,
        vocab_size=8192,
        tie_word_embeddings=True,
    ),
    "10m": dict(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1024,
        vocab_size=8192,
        tie_word_embeddings=True,
    ),
    "60m": dict(
        hidden_size=896, num_hidden_layers=3, num_attention_heads=16, intermediate_size=3584, vocab_size=32000
    ),
    "150m": dict(
        hidden_size=896,
        num_hidden_layers=12,
        num_attention_heads=16,
        intermediate_size=3584,
        vocab_size=32000,
    ),
    "400m": dict(
        hidden_size=1536,
        num_hidden_layers=12,
        num_attention_heads=16,
        intermediate_size=6144,
        vocab_size=32000,
    ),
    "1.1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
    ),
}


def load_model_config(name: str, *, vocab_size: int, max_seq_len: int) -> PretrainedConfig:
    """Resolve --model to a transformers config; the vocabulary always matches the tokenizer."""
    if name in PRESETS:
        config = LlamaConfig(**PRESETS[name], max_position_embeddings=max(max_seq_len, 256))
    elif os.path.exists(name):
        config = AutoConfig.from_pretrained(name)
    else:
        raise ValueError(f"--model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
    config.vocab_size = vocab_size
    if getattr(config, "max_position_embeddings", max_seq_len) < max_seq_len:
        raise ValueError(f"--seq-len {max_seq_len} exceeds the model's max_position_embeddings")
    return config


def architecture(config: PretrainedConfig) -> dict:
    """The fields that define the parameter shapes, for the run fingerprint."""
    keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
    )
    return {key: getattr(config, key, None) for key in keys}


def build_model(config: PretrainedConfig, *, seed: int) -> torch.nn.Module:
    """A freshly initialized model in fp32 on the CPU; the same seed gives the same weights on every peer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
