"""The one setup shared by the peer, the simulation and the experiments."""

from __future__ import annotations

import torch

from peer.cli import config_from_args
from peer.config import fingerprint, fingerprint_settings
from peer.model import architecture
from peer.outer import tensors_sha256
from peer.workload import build_workload

TINY = [  # the tiny preset: the default
    "--seq-len",
    "16",
    "--batch-size",
    "2",
    "--num-threads",
    "1",
    "--eval-batches",
    "3",
    "--seed",
    "3",
]


def test_workload_is_the_runs_model_data_and_fingerprint():
    config, _ = config_from_args(TINY)
    workload = build_workload(config)
    assert workload.fingerprint == fingerprint(
        fingerprint_settings(
            config, model_arch=architecture(workload.model_config), tokenizer_id=workload.tokenizer.id
        )
    )
    assert workload.settings["seed"] == 3 and workload.settings["model"]["vocab_size"] == 8192
    assert [tuple(b.shape) for b in workload.held_out] == [
        (2, 16)
    ] * 3  # like a peer: --batch-size x --eval-batches
    assert workload.tokens_per_step == 32
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in workload.model.parameters())
    again = build_workload(config, eval_batch_size=4, num_eval_batches=1)
    assert tensors_sha256(list(again.model.parameters())) == tensors_sha256(list(workload.model.parameters()))
    assert [tuple(b.shape) for b in again.held_out] == [(4, 16)]
    assert torch.equal(again.held_out[0][:2], workload.held_out[0])  # the same windows, batched differently
    other, _ = config_from_args([*TINY, "--seed", "4", "--inner-steps", "7"])
    other_workload = build_workload(other)
    assert other_workload.fingerprint != workload.fingerprint
    assert tensors_sha256(list(other_workload.model.parameters())) != tensors_sha256(
        list(workload.model.parameters())
    )


def test_init_from_starts_from_the_saved_weights_and_is_part_of_the_fingerprint(tmp_path):
    config, _ = config_from_args(TINY)
    fresh = build_workload(config)
    with torch.no_grad():  # "pretrained": the fresh model, moved
        for p in fresh.model.parameters():
            p.add_(0.01)
    fresh.model.save_pretrained(tmp_path / "a")
    started, _ = config_from_args([*TINY, "--init-from", str(tmp_path / "a")])
    workload = build_workload(started)
    assert tensors_sha256(list(workload.model.parameters())) == tensors_sha256(list(fresh.model.parameters()))
    assert workload.settings["init_params_sha256"] == tensors_sha256(list(fresh.model.parameters()))
    assert workload.settings["model"] == fresh.settings["model"]  # same architecture, other weights
    assert workload.fingerprint != fresh.fingerprint
    assert "init_params_sha256" not in fresh.settings  # runs from the seed keep their fingerprint
    with torch.no_grad():
        next(fresh.model.parameters()).add_(1.0)
    fresh.model.save_pretrained(tmp_path / "b")
    other = build_workload(config_from_args([*TINY, "--init-from", str(tmp_path / "b")])[0])
    assert other.fingerprint != workload.fingerprint
