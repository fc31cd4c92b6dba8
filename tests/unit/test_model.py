from __future__ import annotations

import pytest
import torch

from peer.model import (
    PRESETS,
    architecture,
    build_model,
    count_parameters,
    load_model_config,
    load_pretrained,
)
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


def _saved_model(path, *, vocab_size: int, seed: int):
    """A tiny model written with save_pretrained (safetensors), as an export or a hub download looks."""
    model = build_model(load_model_config("tiny", vocab_size=vocab_size, max_seq_len=64), seed=seed)
    model.save_pretrained(path)
    return model


def test_pretrained_weights_load_exactly_in_fp32(tmp_path):
    saved = _saved_model(tmp_path, vocab_size=8192, seed=5)
    assert (tmp_path / "model.safetensors").exists()
    config = load_model_config(str(tmp_path), vocab_size=8192, max_seq_len=64, pretrained=True)
    loaded = load_pretrained(str(tmp_path), config)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert tensors_sha256(list(loaded.parameters())) == tensors_sha256(list(saved.parameters()))
    assert architecture(loaded.config) == architecture(saved.config)


def test_a_tokenizer_that_does_not_fit_a_pretrained_model_is_a_clear_error(tmp_path):
    _saved_model(tmp_path, vocab_size=100, seed=0)
    with pytest.raises(ValueError, match="tokenizer has 8192 tokens but the model .* embeds only 100"):
        load_model_config(str(tmp_path), vocab_size=8192, max_seq_len=64, pretrained=True)
    # a smaller tokenizer fits (unused embedding rows), and the pretrained embedding keeps its size
    assert load_model_config(str(tmp_path), vocab_size=50, max_seq_len=64, pretrained=True).vocab_size == 100


def test_a_model_directory_without_init_from_gives_its_architecture_and_says_so(tmp_path, caplog):
    _saved_model(tmp_path, vocab_size=100, seed=0)
    with caplog.at_level("WARNING", logger="peer.model"):
        config = load_model_config(str(tmp_path), vocab_size=8192, max_seq_len=64)
    assert config.vocab_size == 8192  # a fresh model: sized to the tokenizer, like a preset
    assert f"--init-from {tmp_path}" in caplog.text


def test_init_from_a_directory_without_weights_is_a_clear_error(tmp_path):
    load_model_config("tiny", vocab_size=100, max_seq_len=32).save_pretrained(tmp_path)
    config = load_model_config(str(tmp_path), vocab_size=100, max_seq_len=32, pretrained=True)
    with pytest.raises(ValueError, match=f"--init-from {tmp_path}: cannot load model weights"):
        load_pretrained(str(tmp_path), config)


def test_a_model_id_comes_from_the_local_hugging_face_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(
        ValueError, match="nor a model in the local Hugging Face cache.*hf download nobody/nothing"
    ):
        load_model_config("nobody/nothing", vocab_size=100, max_seq_len=32)
    with pytest.raises(ValueError, match="^--init-from /no/such/dir: no such file or directory$"):
        load_model_config("/no/such/dir", vocab_size=100, max_seq_len=32, pretrained=True)
    # the cache's layout: models--ORG--NAME/refs/main names a snapshot holding the files
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    from transformers.utils import hub

    monkeypatch.setattr(
        hub, "TRANSFORMERS_CACHE", str(tmp_path), raising=False
    )  # transformers < 5 reads this
    snapshot = tmp_path / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    _saved_model(snapshot, vocab_size=100, seed=1)
    (tmp_path / "models--someone--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-llama" / "refs" / "main").write_text("0" * 40)
    config = load_model_config("someone/tiny-llama", vocab_size=100, max_seq_len=32, pretrained=True)
    assert (config.hidden_size, config.vocab_size) == (PRESETS["tiny"]["hidden_size"], 100)
    loaded = load_pretrained("someone/tiny-llama", config)
    assert count_parameters(loaded) == count_parameters(build_model(config, seed=0))
