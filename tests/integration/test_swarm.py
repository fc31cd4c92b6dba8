"""A bootstrap node and real peer processes on 127.0.0.1 train together and agree bit for bit."""

from __future__ import annotations

import signal

import pytest

from peer.cli import config_from_args
from peer.simulate import simulate
from tests.integration.harness import FAST_PEER_ARGS, hashes_by_round, wait_for


@pytest.mark.timeout(240)
def test_three_peers_agree_every_round_and_learn(local_swarm):
    local_swarm.start_bootstrap()
    peers = [
        local_swarm.start_peer(f"peer{i}", "--max-rounds", "3", "--wait-for-peers", "3") for i in range(3)
    ]
    local_swarm.wait_rounds(peers, 3, timeout_s=180)
    for peer in peers:
        records = peer.records()
        assert [r["round"] for r in records] == [1, 2, 3]
        assert [r["group_size"] for r in records] == [3, 3, 3], peer.log()[-2000:]
        assert records[-1]["loss"] < records[0]["loss"]
        assert all(r["resyncs"] == 0 and not r["failed"] for r in records)
        assert all(0 <= r["sync_wait_s"] <= r["allreduce_s"] and r["bytes_sent"] > 0 for r in records)
        # the data went over the direct path (peer/direct_transport.py) to both other reducers, every round
        assert [(r["reducers_direct"], r["reducers_p2p"]) for r in records] == [(2, 0)] * 3
    for round_index, by_peer in hashes_by_round(peers).items():
        assert len(set(by_peer.values())) == 1, f"round {round_index}: peers disagree: {by_peer}"
    for peer in peers:
        assert peer.wait(timeout_s=30) == 0


@pytest.mark.timeout(300)
def test_peers_of_different_speeds_average_every_round_with_short_timeouts(local_swarm):
    """A group closes as soon as every expected peer joined, which is while the slower peer still trains; the fast
    peer's all-reduce then starts first and must wait for the slow one until the group time (not ban it after the
    2 s chunk timeout, as it did before the timeouts counted from the group time)."""
    local_swarm.start_bootstrap()
    args = ["--max-rounds", "4", "--wait-for-peers", "2", "--chunk-timeout-s", "2"]
    fast = local_swarm.start_peer("fast", *args)
    slow = local_swarm.start_peer("slow", *args, "--test-fault", "slow:3")
    local_swarm.wait_rounds([fast, slow], 4, timeout_s=240)
    for peer in (fast, slow):
        records = peer.records()
        assert [r["group_size"] for r in records] == [2, 2, 2, 2], peer.log()[-3000:]
        assert not any(r["failed"] or r["resyncs"] for r in records), peer.log()[-3000:]
    for round_index, by_peer in hashes_by_round([fast, slow]).items():
        assert len(set(by_peer.values())) == 1, f"round {round_index}: peers disagree: {by_peer}"


@pytest.mark.timeout(240)
def test_late_joiner_matches_the_swarm_after_its_first_round(local_swarm):
    local_swarm.start_bootstrap()
    early = [local_swarm.start_peer(f"early{i}", "--wait-for-peers", "2") for i in range(2)]
    local_swarm.wait_rounds(early, 1, timeout_s=120)
    late = local_swarm.start_peer("late", "--max-rounds", "2")
    local_swarm.wait_rounds([late], 1, timeout_s=120)
    first = late.records()[0]
    wait_for(
        lambda: all(len(p.records()) >= first["round"] for p in early),
        timeout_s=30,
        what="the early peers to finish the late peer's first round",
    )
    for peer in early:
        theirs = {r["round"]: r["global_params_sha256"] for r in peer.records()}
        assert theirs[first["round"]] == first["global_params_sha256"], late.log()[-3000:]
    assert first["round"] >= 2  # it joined the running swarm, not a fresh run
    for peer in early:
        peer.signal(signal.SIGTERM)
    for peer in early:
        assert peer.wait(timeout_s=30) == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "k, aggregation",
    [(2, "mean"), (3, "trimmed-mean")],
    ids=["mean", "trimmed-mean"],  # trimmed: per value, hivemind's split into parts must not change a bit
)
def test_networked_run_equals_in_process_simulation(local_swarm, k, aggregation):
    common = ["--max-rounds", "3", "--wait-for-peers", str(k), "--seed", "7", "--aggregation", aggregation]
    local_swarm.start_bootstrap()
    peers = [local_swarm.start_peer(f"shard{i}", *common, "--data-shard", f"{i}/{k}") for i in range(k)]
    config, _ = config_from_args([*FAST_PEER_ARGS, *common])
    simulated = [r["global_params_sha256"] for r in simulate(config, num_replicas=k)]
    local_swarm.wait_rounds(peers, 3, timeout_s=240)
    for peer in peers:
        assert [r["group_size"] for r in peer.records()] == [k] * 3, peer.log()[-2000:]
        assert [r["global_params_sha256"] for r in peer.records()] == simulated


@pytest.mark.timeout(240)
def test_peer_with_other_settings_for_the_same_run_exits_naming_them(local_swarm, tmp_path):
    """A flag that contradicts the run is refused before anything is built (tests/integration/test_join.py); a local
    model config passes as this machine's copy of the run's, and the fingerprint finds that its contents differ."""
    from peer.model import load_model_config

    narrower = load_model_config("tiny", vocab_size=8192, max_seq_len=64)
    narrower.intermediate_size = 256
    narrower.save_pretrained(tmp_path / "my-model")
    local_swarm.start_bootstrap()
    first = local_swarm.start_peer("first", "--run-id", "shared")
    local_swarm.wait_rounds([first], 1, timeout_s=120)
    other = local_swarm.start_peer("other", "--run-id", "shared", "--model", str(tmp_path / "my-model"))
    assert other.wait(timeout_s=120) == 1
    last_line = other.log().strip().splitlines()[-1]
    assert last_line.startswith("error: run 'shared' is already training with other settings: model (ours ")
    assert "'intermediate_size': 256" in last_line and "'intermediate_size': 384" in last_line
    assert "Traceback" not in other.log()
    # a peer that leaves deletes its settings: the run id is free for other settings at once, not after the
    # record's lifetime (a crashed peer's record still holds it for swarm.SETTINGS_TTL_S)
    first.signal(signal.SIGTERM)
    assert first.wait(timeout_s=60) == 0
    again = local_swarm.start_peer("again", "--run-id", "shared", "--model", str(tmp_path / "my-model"))
    local_swarm.wait_rounds([again], 1, timeout_s=120)


@pytest.mark.timeout(240)
def test_client_mode_peer_contributes_and_agrees(local_swarm):
    """A peer behind NAT (--client-mode: no incoming connections) still averages and holds the same model."""
    local_swarm.start_bootstrap()
    peers = [
        local_swarm.start_peer(f"peer{i}", "--max-rounds", "2", "--wait-for-peers", "3") for i in range(2)
    ]
    peers.append(
        local_swarm.start_peer("client", "--max-rounds", "2", "--wait-for-peers", "3", "--client-mode")
    )
    local_swarm.wait_rounds(peers, 2, timeout_s=180)
    for peer in peers:
        assert [r["group_size"] for r in peer.records()] == [3, 3], peer.log()[-2000:]
    # the client opens no listener and reduces nothing, but sends its parts directly to both reducers
    assert [r["reducers_direct"] for r in peers[2].records()] == [2, 2]
    assert all(r["reducers_direct"] == 1 and r["senders_direct"] == 2 for p in peers[:2] for r in p.records())
    for round_index, by_peer in hashes_by_round(peers).items():
        assert len(set(by_peer.values())) == 1, f"round {round_index}: peers disagree: {by_peer}"
