"""--wandb-project without the wandb package is one clear error, not an ImportError traceback."""

from __future__ import annotations

import sys

import pytest

from peer.wandb_sink import SwarmWandb, WandbError, WandbMetrics


def test_missing_wandb_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(WandbError, match=r"pip install 'diloco-swarm\[wandb\]'"):
        WandbMetrics("proj", run_id="r", peer_id="QmAbc", config={})
    with pytest.raises(WandbError, match="needs the wandb package"):
        SwarmWandb("proj", run_id="r")
