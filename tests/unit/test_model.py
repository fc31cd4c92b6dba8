from __future__ import annotations

import pytest
import torch

from peer.model import PRESETS, architecture, build_model, count_parameters, load_model_config
from peer.outer import tensors_sha256


def test_tiny_preset_builds_offline_and_deterministically():
    config = load_model_config("tiny", vocab_size=8192, max_seq_len=64)
    a, b = build_model(config, seed=3), build_model(config, seed=3)
    assert tensors_sha256(list(a.parameters())) == tensors_sha256(list(b.parameters()))
    assert tensors_sha256(list(a.parameters())) != tensors_sha256(
        list(build_model(config, seed=4).parameters())
    )
    tokens = torch.randint(0, 8192, (2, 16))
    logits = a(input_ids=tokens).logits  # (batch, seq, vocab)
    assert logits.shape == (2, 16, 8192)
    assert 1e6 < count_parameters(a) < 3e6


def test_paper_presets_have_the_papers_shapes():
    assert (PRESETS["60m"]["num_hidden_layers"], PRESETS["60m"]["hidden_size"]) == (3, 896)
    assert (PRESETS["150m"]["num_hidden_layers"], PRESETS["150m"]["hidden_size"]) == (12, 896)
    assert (PRESETS["400m"]["num_hidden_layers"], PRESETS["400m"]["hidden_size"]) == (12, 1536)


def test_hugging_face_config_file(tmp_path):
    config = load_model_config("tiny", vocab_size=100, max_seq_len=32)
    config.save_pretrained(tmp_path)
    loaded = load_model_config(str(tmp_path / "config.json"), vocab_size=100, max_seq_len=32)
    assert architecture(loaded) == architecture(config)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a preset"):
        load_model_config("giant", vocab_size=10, max_seq_len=8)
