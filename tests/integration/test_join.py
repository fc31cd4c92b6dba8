"""One-command join: a newcomer given only --initial-peers and --run-id (and this machine's own flags) trains with
the settings the run's peers publish and agrees bit for bit; a flag that contradicts the run, or a local dataset this
machine lacks, is refused with one line before anything is built."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.integration.harness import child_env, hashes_by_round, wait_for
from tests.integration.test_real_data import documents

# this machine's settings only: where to listen, threads, how patiently to wait, how often to evaluate
MACHINE_ARGS = [
    "--host-maddrs",
    "/ip4/127.0.0.1/tcp/0",
    "--num-threads",
    "1",
    "--matchmaking-s",
    "2",
    "--progress-period-s",
    "1",
]


@pytest.fixture
def parquet(tmp_path):
    """The run's data in the organizer's folder, and a volunteer's copy of it at another path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "organizer").mkdir()
    (tmp_path / "volunteer").mkdir()
    path = tmp_path / "organizer" / "docs.parquet"
    pq.write_table(pa.table({"text": documents(300)}), path)
    shutil.copy(path, tmp_path / "volunteer" / "docs.parquet")
    return path, tmp_path / "volunteer" / "docs.parquet"


def ready(peer) -> bool:
    """The peer joined the DHT and published its settings (its multiaddrs are written right after)."""
    if not peer.alive():
        raise AssertionError(f"{peer.name} exited:\n{peer.log()[-3000:]}")
    return bool(peer.maddrs())


@pytest.mark.timeout(360)
def test_a_newcomer_given_only_the_run_id_adopts_the_runs_settings_and_agrees_bit_for_bit(
    local_swarm, parquet
):
    organizer_data, volunteer_copy = parquet
    local_swarm.start_bootstrap()
    # non-default run settings (the harness's: H=5, inner lr 1e-3, warmup 5, batch 4, seq_len 64) and this data
    run = [
        "--run-id",
        "joined",
        "--max-rounds",
        "2",
        "--dataset",
        str(organizer_data),
        "--eval-tokens",
        "8192",
    ]
    organizer = local_swarm.start_peer("organizer", *run, "--wait-for-peers", "3", "--eval-every", "1")
    wait_for(lambda: ready(organizer), timeout_s=120, what="the organizer to publish its settings")
    newcomer_args = ["--run-id", "joined", *MACHINE_ARGS, "--wait-for-peers", "3", "--eval-every", "1"]
    newcomer = local_swarm.start_peer("newcomer", *newcomer_args, fast=False)
    with_copy = local_swarm.start_peer("copy", *newcomer_args, "--dataset", str(volunteer_copy), fast=False)
    peers = [organizer, newcomer, with_copy]
    local_swarm.wait_rounds(peers, 2, timeout_s=300)

    for peer in peers:
        records = peer.records()
        assert [r["group_size"] for r in records] == [3, 3], peer.log()[-3000:]
        assert len({r["fingerprint"] for r in records}) == 1
    assert len({peer.records()[0]["fingerprint"] for peer in peers}) == 1
    for round_index, by_peer in hashes_by_round(peers).items():
        assert len(set(by_peer.values())) == 1, f"round {round_index}: {by_peer}"
    # the run's held-out set too: the same loss of the same parameters on every peer (the copy holds the same data)
    assert len({peer.records()[-1]["eval_loss"] for peer in peers}) == 1
    for peer in (newcomer, with_copy):  # both stop after the run's --max-rounds
        assert peer.wait(timeout_s=60) == 0

    assert "run 'joined': no peer publishes its settings yet; starting it with this peer's settings" in (
        organizer.log()
    )
    log = newcomer.log()
    assert "run 'joined': adopting the settings 1 peer(s) publish (fingerprint " in log
    adopted = next(line for line in log.splitlines() if "  adopted: " in line)
    for setting in ("inner_steps=5", "inner_lr=0.001", "warmup_steps=5", "batch_size=4", "seq_len=64"):
        assert setting in adopted, adopted
    assert f"dataset={organizer_data}" in adopted and "max_rounds=2" in adopted
    assert f"this peer's own: dataset={volunteer_copy} (the run's: {organizer_data})" in with_copy.log()


def peer_command(swarm, *args: str, metrics) -> subprocess.CompletedProcess:
    argv = ["-m", "peer", "--initial-peers", *swarm.bootstrap_maddrs, *MACHINE_ARGS, *args]
    argv += ["--metrics-file", str(metrics)]
    return subprocess.run(
        [sys.executable, *argv], env=child_env(), capture_output=True, text=True, timeout=150
    )


@pytest.mark.timeout(300)
def test_a_contradicting_flag_and_a_missing_local_dataset_are_refused_before_training(
    local_swarm, parquet, tmp_path
):
    organizer_data, _ = parquet
    local_swarm.start_bootstrap()
    run = ["--run-id", "strict", "--dataset", str(organizer_data)]
    organizer = local_swarm.start_peer("organizer", *run, "--wait-for-peers", "9")  # publishes, never trains
    wait_for(lambda: ready(organizer), timeout_s=120, what="the organizer to publish its settings")

    metrics = tmp_path / "refused.jsonl"
    result = peer_command(local_swarm, "--run-id", "strict", "--inner-steps", "7", metrics=metrics)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: run 'strict': --inner-steps 7 contradicts the run's 5. Leave it out to train with the run's "
        "settings, or start another run with another --run-id"
    )
    assert "Traceback" not in result.stderr and not metrics.exists()

    # this machine does not have the organizer's local dataset (here: moved away after the organizer opened it)
    organizer_data.parent.rename(tmp_path / "elsewhere")
    result = peer_command(local_swarm, "--run-id", "strict", metrics=metrics)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: run 'strict' trains on dataset {organizer_data}, a local path this machine does not have: put a "
        "copy at that same path, or pass your copy with --dataset PATH, or ask the organizer for a Hugging Face "
        "hub dataset"
    )
    assert "Traceback" not in result.stderr and not metrics.exists()
    assert organizer.alive()
