"""Peers crash, lag, fork and stop; the swarm keeps agreeing bit for bit and nothing hangs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from peer.checkpoint import list_checkpoints, load_checkpoint
from tests.integration.harness import FAST_PEER_ARGS, child_env, hashes_by_round, wait_for


def assert_agree(peers, rounds):
    table = hashes_by_round(peers)
    for round_index in rounds:
        assert len(set(table[round_index].values())) == 1, f"round {round_index}: {table[round_index]}"


@pytest.mark.timeout(300)
def test_peer_killed_during_allreduce_does_not_stop_the_others(local_swarm):
    local_swarm.start_bootstrap()
    survivors = [
        local_swarm.start_peer(
            f"peer{i}", "--max-rounds", "4", "--wait-for-peers", "3", "--chunk-timeout-s", "3"
        )
        for i in range(2)
    ]
    victim = local_swarm.start_peer("victim", "--wait-for-peers", "3", "--test-fault", "kill-in-allreduce:2")
    local_swarm.wait_rounds(survivors, 4, timeout_s=240)
    assert victim.popen.poll() == -signal.SIGKILL
    assert len(victim.records()) == 1  # it died inside round 2's all-reduce
    assert_agree(survivors, range(1, 5))
    for peer in survivors:
        assert [r["group_size"] for r in peer.records()][2:] == [2, 2]
        assert peer.wait(timeout_s=30) == 0


@pytest.mark.timeout(240)
def test_peer_still_finishing_the_previous_round_is_waited_for_not_left_behind(local_swarm):
    """One peer stalls after round 2 while the other already finishes round 3's inner steps: the fast one must
    wait for it (no lonely outer step, which would fork the swarm), and every round is averaged by both."""
    local_swarm.start_bootstrap()
    common = ["--max-rounds", "4", "--wait-for-peers", "2"]
    peers = [
        local_swarm.start_peer("fast", *common),
        local_swarm.start_peer("stalled", *common, "--test-fault", "pause-after-round:2"),
    ]
    local_swarm.wait_rounds(peers, 4, timeout_s=180)
    for peer in peers:
        records = peer.records()
        assert [r["group_size"] for r in records] == [2, 2, 2, 2], peer.log()[-3000:]
        assert all(r["resyncs"] == 0 for r in records)
    assert_agree(peers, range(1, 5))
    for peer in peers:
        assert peer.wait(timeout_s=30) == 0


@pytest.mark.timeout(300)
def test_swarm_survives_bootstrap_loss_and_admits_newcomers_through_a_peer(local_swarm):
    local_swarm.start_bootstrap()
    peers = [local_swarm.start_peer(f"peer{i}", "--wait-for-peers", "2") for i in range(2)]
    local_swarm.wait_rounds(peers, 1, timeout_s=120)
    local_swarm.bootstrap.kill_group()
    done_before = min(len(p.records()) for p in peers)
    local_swarm.wait_rounds(peers, done_before + 2, timeout_s=120)
    newcomer = local_swarm.start_peer("newcomer", "--max-rounds", "1", initial_peers=peers[0].maddrs())
    local_swarm.wait_rounds([newcomer], 1, timeout_s=120)
    first = newcomer.records()[0]
    wait_for(
        lambda: all(len(p.records()) >= first["round"] for p in peers),
        timeout_s=60,
        what="the old peers to reach the newcomer's round",
    )
    assert_agree([*peers, newcomer], [first["round"]])
    assert first["round"] > done_before
    for peer in peers:
        peer.signal(signal.SIGTERM)
        assert peer.wait(timeout_s=30) == 0


@pytest.mark.timeout(300)
def test_forked_replica_resyncs_to_the_majority(local_swarm):
    local_swarm.start_bootstrap()
    peers = [
        local_swarm.start_peer(f"peer{i}", "--max-rounds", "3", "--wait-for-peers", "3") for i in range(2)
    ]
    forked = local_swarm.start_peer(
        "forked", "--max-rounds", "3", "--wait-for-peers", "3", "--test-fault", "corrupt:2"
    )
    local_swarm.wait_rounds([*peers, forked], 3, timeout_s=240)
    records = forked.records()
    # round 2's record holds the corrupted state (nothing waits for the group's hashes after the outer step);
    # round 3's inner phase compares them and adopts the majority's state before contributing again
    table = hashes_by_round([*peers, forked])
    assert table[2]["forked"] != table[2]["peer0"] == table[2]["peer1"], table[2]
    assert not records[1]["resynced"], forked.log()[-3000:]
    assert records[2]["resynced"] and records[2]["resyncs"] == 1, forked.log()[-3000:]
    assert_agree([*peers, forked], [1, 3])
    assert [r["group_size"] for r in records] == [3, 3, 3]


@pytest.mark.timeout(300)
def test_slow_peer_never_holds_a_minority_hash(local_swarm):
    local_swarm.start_bootstrap()
    fast = [
        local_swarm.start_peer(
            f"fast{i}", "--max-rounds", "6", "--wait-for-peers", "3", "--straggler-wait-s", "1"
        )
        for i in range(2)
    ]
    slow = local_swarm.start_peer("slow", "--wait-for-peers", "3", "--test-fault", "slow:4")
    local_swarm.wait_rounds(fast, 6, timeout_s=240)
    slow.signal(signal.SIGTERM)
    assert slow.wait(timeout_s=30) == 0
    table = hashes_by_round([*fast, slow])
    # every round the slow peer finished while the fast ones ran (measured: all 6, as it is waited for or
    # resyncs) ends on the fast peers' hash
    compared = [r["round"] for r in slow.records() if set(table[r["round"]]) >= {"fast0", "fast1"}]
    assert len(compared) >= 2, slow.log()[-3000:]
    for round_index in compared:
        assert len(set(table[round_index].values())) == 1, f"round {round_index}: {table[round_index]}"


def processes_with_marker(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["SIGINT to the peer", "SIGTERM to its process group"])
def test_stop_signal_leaves_within_10s_with_a_checkpoint_and_no_processes(tmp_path, how):
    """Ctrl+C, or a stop that signals every process of the peer at once (systemd, `timeout`): the peer still
    finishes its step, writes its checkpoint and shuts its hivemind processes down itself, quickly."""
    marker = f"DILOCO_TEST_MARKER={uuid.uuid4().hex}"
    env = dict(child_env(), DILOCO_TEST_MARKER=marker.split("=", 1)[1])
    metrics = tmp_path / "m.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peer",
            *FAST_PEER_ARGS,
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--checkpoint-every",
            "100",
            "--metrics-file",
            str(metrics),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
            timeout_s=120,
            what="two rounds",
        )
        sent = time.monotonic()
        if how.startswith("SIGINT"):
            proc.send_signal(signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - sent < 10
        output = proc.stdout.read().decode()
        # a group-wide SIGTERM also stops hivemind's p2p daemon, which then complains
        if how.startswith("SIGINT"):
            assert "[ERROR]" not in output and "Traceback" not in output, output[-3000:]
        saved = list_checkpoints(str(tmp_path / "ckpt"))
        assert saved, output[-3000:]
        assert load_checkpoint(saved[-1])["round"] >= 2
        wait_for(lambda: not processes_with_marker(marker), timeout_s=5, what="no processes left")
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_with_marker(marker):
            os.kill(pid, signal.SIGKILL)


def run_solo(tmp_path: Path, name: str, *extra: str, ok: bool = True) -> tuple[list[dict], str]:
    """Run one peer alone to its end; (its metrics records, its stderr)."""
    metrics = tmp_path / f"{name}.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "peer",
            *FAST_PEER_ARGS,
            "--data-shard",
            "0/1",
            "--total-steps",  # the same schedule however many rounds each run does
            "20",
            "--metrics-file",
            str(metrics),
            *extra,
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    records = (
        [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    )
    return records, result.stderr


@pytest.mark.timeout(400)
def test_resume_reproduces_the_uninterrupted_run_and_skips_corrupt_checkpoints(tmp_path):
    straight = [r["global_params_sha256"] for r in run_solo(tmp_path, "straight", "--max-rounds", "4")[0]]
    ckpt = str(tmp_path / "ckpt")
    run_solo(tmp_path, "first", "--max-rounds", "2", "--checkpoint-dir", ckpt, "--checkpoint-every", "1")
    resumed, _ = run_solo(tmp_path, "resumed", "--max-rounds", "2", "--checkpoint-dir", ckpt, "--resume")
    assert [r["round"] for r in resumed] == [3, 4]
    assert [r["global_params_sha256"] for r in resumed] == straight[2:]

    # a corrupt newest checkpoint (round 4) is skipped: the peer resumes from round 2's, and says so
    assert [p.name for p in list_checkpoints(ckpt)] == [f"round-00000{r}.safetensors" for r in (1, 2, 4)]
    newest = list_checkpoints(ckpt)[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    again, stderr = run_solo(tmp_path, "fallback", "--max-rounds", "1", "--checkpoint-dir", ckpt, "--resume")
    assert "round-000004.safetensors is corrupted" in stderr and "using round-000002.safetensors" in stderr
    assert [(r["round"], r["global_params_sha256"]) for r in again] == [(3, straight[2])]

    # with no usable checkpoint left the peer refuses to start instead of silently starting over
    for path in list_checkpoints(ckpt):
        path.write_bytes(path.read_bytes()[:-1])
    _, stderr = run_solo(
        tmp_path, "refused", "--max-rounds", "1", "--checkpoint-dir", ckpt, "--resume", ok=False
    )
    assert "no usable checkpoint" in stderr and "Traceback" not in stderr


@pytest.mark.timeout(180)
def test_sigkilled_peer_leaves_no_hivemind_processes(tmp_path):
    """A peer killed with SIGKILL (only its own pid, as the OOM killer would) takes its DHT and averager along."""
    marker = f"DILOCO_TEST_MARKER={uuid.uuid4().hex}"
    env = dict(child_env(), DILOCO_TEST_MARKER=marker.split("=", 1)[1])
    metrics = tmp_path / "m.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "peer", *FAST_PEER_ARGS, "--metrics-file", str(metrics)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: metrics.exists() and metrics.read_text().strip(), timeout_s=120, what="one round")
        assert len(processes_with_marker(marker)) >= 3  # the peer, its DHT and its averager (and p2pd)
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: not processes_with_marker(marker), timeout_s=10, what="hivemind processes to exit")
    finally:
        for pid in processes_with_marker(marker):
            os.kill(pid, signal.SIGKILL)
