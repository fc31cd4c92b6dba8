from __future__ import annotations

import hashlib
import json
import logging
import pickle

import pytest
import torch

from peer.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)


def peer_state(round_index: int) -> tuple[dict, torch.nn.Module, torch.optim.Optimizer]:
    """The state a peer saves: outer state, a real AdamW's state after two steps, config, data position."""
    torch.manual_seed(round_index)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(
        [
            {"params": [model[0].weight], "weight_decay": 0.1},
            {"params": [model[0].bias, *model[1].parameters()]},
        ],
        betas=(0.9, 0.95),
    )
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        "round": round_index,
        "outer_state": [*params, *[torch.full_like(p, 0.5) for p in params]],
        "param_names": [name for name, _ in model.named_parameters()],
        "inner_optimizer": optimizer.state_dict(),
        "config": {"model": {"name": "tiny"}, "seed": 0, "shard": None, "lr": 4e-4},
        "fingerprint": "abc123",
        "params_sha256": "00" * 32,
        "data_position": {"kind": "documents", "position": {"epoch": 1, "state": None}, "offset": 7},
    }
    return state, model, optimizer


def assert_same(a, b) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_a_checkpoint_is_named_tensors_plus_json_and_gives_back_the_same_state(tmp_path):
    state, model, optimizer = peer_state(3)
    path = save_checkpoint(str(tmp_path), state, round_index=3, keep=2)
    assert path.name == "round-000003.safetensors"
    loaded = load_checkpoint(path)
    assert_same(state, loaded)  # tuples (betas), int keys (per-parameter state) and dtypes survive

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        names = set(file.keys())  # noqa: SIM118
        header = json.loads(file.metadata()["diloco_swarm"])
    assert {"global.0.weight", "outer_momentum.1.bias", "inner_optimizer.state.0.exp_avg"} <= names
    assert header["state"]["config"]["model"] == {"name": "tiny"} and header["state"]["round"] == 3

    # the restored inner optimizer continues exactly like the original
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(
        [{"params": [twin[0].weight], "weight_decay": 0.1}, {"params": [twin[0].bias, *twin[1].parameters()]}]
    )
    twin_opt.load_state_dict(loaded["inner_optimizer"])
    batch = torch.randn(5, 4)
    for m, opt in ((model, optimizer), (twin, twin_opt)):
        opt.zero_grad()
        m(batch).square().sum().backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))


def test_save_keeps_the_newest_atomically(tmp_path):
    for round_index in range(1, 6):
        save_checkpoint(
            str(tmp_path),
            {"round": round_index, "x": torch.ones(3) * round_index},
            round_index=round_index,
            keep=2,
        )
    names = [p.name for p in list_checkpoints(str(tmp_path))]
    assert names == ["round-000004.safetensors", "round-000005.safetensors"]
    assert not list(tmp_path.glob(".*.tmp"))
    latest = load_latest_checkpoint(str(tmp_path))
    assert latest["round"] == 5 and torch.equal(latest["x"], torch.full((3,), 5.0))
    assert load_latest_checkpoint(str(tmp_path / "empty")) is None


def test_corrupt_or_unverifiable_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(str(tmp_path), {"round": 1, "x": torch.zeros(100)}, round_index=1, keep=3)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)
    path.with_suffix(".sha256").unlink()
    with pytest.raises(CheckpointError, match="no checksum"):
        load_checkpoint(path)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path, caplog):
    for round_index in (1, 2, 3):
        save_checkpoint(
            str(tmp_path), {"round": round_index, "x": torch.ones(8)}, round_index=round_index, keep=3
        )
    newest = checkpoint_path(str(tmp_path), 3)
    newest.write_bytes(newest.read_bytes()[:-10])  # a torn write
    with caplog.at_level(logging.WARNING, logger="peer.checkpoint"):
        path, state = latest_valid_checkpoint(str(tmp_path))
    assert path.name == "round-000002.safetensors" and state["round"] == 2
    assert "round-000003.safetensors is corrupted" in caplog.text
    assert "using round-000002.safetensors" in caplog.text
    for round_index in (1, 2):
        checkpoint_path(str(tmp_path), round_index).with_suffix(".sha256").write_text("0" * 64)
    with pytest.raises(
        CheckpointError, match="no usable checkpoint in .*round-000001.safetensors is corrupted"
    ):
        load_latest_checkpoint(str(tmp_path))


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_unpickles(tmp_path):
    marker = tmp_path / "code-ran"
    path = checkpoint_path(str(tmp_path), 1)
    path.write_bytes(pickle.dumps({"round": 1, "x": _Payload(str(marker))}))
    path.with_suffix(".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
    assert not marker.exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "round-000001.pt").write_bytes(pickle.dumps({"round": 1, "x": _Payload(str(marker))}))
    with pytest.raises(CheckpointError, match="only old pickle checkpoints"):
        load_latest_checkpoint(str(old))
    assert not marker.exists()
