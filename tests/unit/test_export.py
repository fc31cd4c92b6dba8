"""A checkpoint exported with `python -m peer.export` loads in plain transformers and generates text."""

from __future__ import annotations

import json

import pytest
import torch

from peer import export
from peer.checkpoint import save_checkpoint
from peer.config import DataConfig, RunConfig
from peer.data import Tokenizer
from peer.model import build_model, load_model_config
from peer.outer import tensors_sha256


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint directory of a tiny run whose global parameters are not the initial ones, and that model."""
    config = RunConfig(data=DataConfig(seq_len=64))
    model = build_model(load_model_config("tiny", vocab_size=8192, max_seq_len=64), seed=0)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        "round": 7,
        "outer_state": [*params, *[torch.zeros_like(p) for p in params]],
        "param_names": [name for name, _ in model.named_parameters()],
        "config": config.to_dict(),
        "fingerprint": "f" * 16,
        "params_sha256": tensors_sha256(params),
    }
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(str(folder), {**state, "round": 6, "params_sha256": "0" * 64}, round_index=6, keep=5)
    save_checkpoint(str(folder), state, round_index=7, keep=5)
    # a run of a model that is not a preset: the checkpoint carries its exact transformers config
    custom = {**model.config.to_dict(), "hidden_act": "gelu", "rms_norm_eps": 1e-5}
    save_checkpoint(str(folder / "custom"), {**state, "model_config": custom}, round_index=7, keep=5)
    return folder, model


def test_an_exported_checkpoint_loads_in_transformers_and_generates(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    folder, ours = trained
    out = tmp_path / "model"
    assert export.main(["--checkpoint", str(folder), "--out", str(out)]) == 0

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, len(tokenizer)) == ("<|endoftext|>", 0, 8192)
    text = "ROMEO. What light through yonder window breaks?"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == Tokenizer("embedded").encode([text])[0]  # the ids the swarm trained on

    # the global parameters of round 7 (the newest checkpoint), exactly
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ours.parameters(), strict=True))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours.eval()(ids).logits)
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 8) or generated[0, -1] == 0  # 8 new tokens or stopped at eos
    assert tokenizer.decode(generated[0]).startswith(text)
    assert model.generation_config.eos_token_id == 0
    assert json.loads((out / "diloco_swarm.json").read_text())["round"] == 7


def test_bad_exports_are_refused_with_one_line(trained, tmp_path, capsys):
    folder, _ = trained
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert export.main(["--checkpoint", str(folder), "--out", str(tmp_path / "full")]) == 2
    assert "already exists" in capsys.readouterr().err
    # round 6's recorded hash is not its parameters' hash: refused, and nothing is written
    code = export.main(
        ["--checkpoint", str(folder / "round-000006.safetensors"), "--out", str(tmp_path / "m")]
    )
    assert code == 1 and "do not match their recorded hash" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))


def test_a_checkpoint_with_its_model_config_exports_that_exact_config(trained, tmp_path):
    from transformers import AutoConfig

    folder, ours = trained
    assert export.main(["--checkpoint", str(folder / "custom"), "--out", str(tmp_path / "m")]) == 0
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert (config.hidden_act, config.rms_norm_eps) == ("gelu", 1e-5)  # not the preset's silu and 1e-6
    assert config.hidden_size == ours.config.hidden_size
