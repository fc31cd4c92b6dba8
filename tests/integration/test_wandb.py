"""wandb logging in offline mode (WANDB_MODE=offline): a peer's rounds and a monitor's swarm aggregate."""

from __future__ import annotations

import pytest

wandb = pytest.importorskip("wandb", reason="wandb is an optional extra (pip install 'diloco-swarm[wandb]')")

from peer.wandb_sink import SwarmWandb, WandbMetrics  # noqa: E402


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_peer_and_swarm_metrics_are_logged_offline(offline):
    peer = WandbMetrics("diloco-test", run_id="run", peer_id="12D3KooWAbcdef", config={"inner_steps": 5})
    try:
        for round_index in (1, 2, 3):
            peer.log_round(
                {
                    "round": round_index,
                    "peer_id": "12D3KooWAbcdef",
                    "loss": 5.0 - round_index,
                    "tokens": 100 * round_index,
                    "bytes_sent": 10,
                    "sync_wait_s": None,  # not a number this round: left out, not logged as garbage
                    "global_params_sha256": "ab" * 32,
                }
            )
        assert peer.run.name == "run-Abcdef" and peer.run.group == "run"
        assert peer.run.summary["loss"] == 2.0 and peer.run.summary["round"] == 3
        logged = set(peer.run.summary.keys())
        assert {"loss", "tokens", "bytes_sent"} <= logged
        assert "sync_wait_s" not in logged and "global_params_sha256" not in logged
    finally:
        peer.finish()
    swarm = SwarmWandb("diloco-test", run_id="run")
    try:
        swarm(
            {"round": 4, "loss": 3.5, "eval_loss": None, "tokens": 3072, "hash_agreeing": 2, "live_peers": 2}
        )
        assert swarm.run.summary["swarm/loss"] == 3.5 and swarm.run.summary["swarm/tokens"] == 3072
    finally:
        swarm.finish()
        wandb.teardown()  # stop wandb's service process now rather than at interpreter exit
    assert len(list((offline / "wandb").glob("offline-run-*"))) == 2
