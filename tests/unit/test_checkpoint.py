from __future__ import annotations

import pytest
import torch

from peer.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)


def test_save_keeps_the_newest_and_loads_with_checksum(tmp_path):
    for round_index in range(1, 6):
        save_checkpoint(
            str(tmp_path),
            {"round": round_index, "x": torch.ones(3) * round_index},
            round_index=round_index,
            keep=2,
        )
    names = [p.name for p in list_checkpoints(str(tmp_path))]
    assert names == ["round-000004.pt", "round-000005.pt"]
    assert not list(tmp_path.glob(".*.tmp"))
    latest = load_latest_checkpoint(str(tmp_path))
    assert latest["round"] == 5 and torch.equal(latest["x"], torch.full((3,), 5.0))


def test_corrupt_or_unverifiable_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(str(tmp_path), {"round": 1}, round_index=1, keep=3)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)
    path.with_suffix(".sha256").unlink()
    with pytest.raises(CheckpointError, match="no checksum"):
        load_checkpoint(path)
