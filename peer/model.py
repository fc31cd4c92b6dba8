"""The causal language model: from a preset, a Hugging Face config file, model directory or cached model id,
freshly initialized from the run's seed or loaded from pretrained weights."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

logger = logging.getLogger(__name__)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

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


def load_model_config(
    name: str, *, vocab_size: int, max_seq_len: int, pretrained: bool = False
) -> PretrainedConfig:
    """Resolve --model to a transformers config. A freshly initialized model's embedding is sized to the
    tokenizer (`vocab_size`); a pretrained one (--init-from) keeps its own, and the tokenizer must fit in it."""
    if name in PRESETS:
        config = LlamaConfig(**PRESETS[name], max_position_embeddings=max(max_seq_len, 256))
    else:
        config = _hugging_face_config(name, flag="--init-from" if pretrained else "--model")
        if (
            not pretrained
            and os.path.isdir(name)
            and any(os.path.exists(os.path.join(name, f)) for f in WEIGHT_FILES)
        ):
            logger.warning(
                f"--model {name} holds weights, but only its architecture is used (a fresh model from the "
                f"seed); to start from its weights, use --init-from {name}"
            )
    if not pretrained:
        config.vocab_size = vocab_size
    elif vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but the model {name!r} embeds only {config.vocab_size}: "
            f"use the model's own tokenizer (--tokenizer {name}); a pretrained model is never resized"
        )
    if getattr(config, "max_position_embeddings", max_seq_len) < max_seq_len:
        raise ValueError(f"--seq-len {max_seq_len} exceeds the model's max_position_embeddings")
    return config


def _hugging_face_config(name: str, *, flag: str) -> PretrainedConfig:
    """A config.json, a model directory, or a model id in the local Hugging Face cache (never downloaded)."""
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        if os.path.exists(name):
            reason = str(e).strip().splitlines()[0]
            raise ValueError(f"{flag} {name} is not a readable Hugging Face config: {reason}") from None
        if os.path.isabs(name) or name.startswith((".", "~")):
            raise ValueError(f"{flag} {name}: no such file or directory") from None
        presets = f"a preset ({', '.join(PRESETS)}), " if flag == "--model" else ""
        raise ValueError(
            f"{flag} {name!r} is neither {presets}a config file or model directory, nor a model in the local "
            f"Hugging Face cache (download it first: hf download {name})"
        ) from None


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


def load_pretrained(path: str, config: PretrainedConfig) -> torch.nn.Module:
    """Pretrained weights (a save_pretrained directory, e.g. a model exported from a run, or a model id in the
    local Hugging Face cache) as an fp32 model on the CPU; `config` is its load_model_config(pretrained=True)."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch.float32, local_files_only=True
        )
    except OSError as e:
        reason = str(e).strip().splitlines()[0]
        raise ValueError(f"--init-from {path}: cannot load model weights from it ({reason})") from None


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
