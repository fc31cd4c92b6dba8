"""One attacking peer (tests/attacker.py, the project's own code with a lying network) among honest peers on
127.0.0.1: the honest peers keep training, keep agreeing bit for bit, and never adopt a poisoned or non-finite state."""

from __future__ import annotations

import math

import pytest
import torch

from peer.model import build_model, load_model_config
from peer.outer import tensors_sha256
from tests.integration.harness import hashes_by_round, wait_for

ROUNDS = 4


def start(
    local_swarm,
    attack: str,
    *extra: str,
    live: int = 3,
    rounds: int = ROUNDS,
    wait: bool = True,
    attacker_args: tuple[str, ...] = (),
):
    """Two honest peers and the attacker; the honest peers start training once `live` peers look live to them
    (an attacker whose records they ignore does not count) and stop after `rounds` (waited for if `wait`)."""
    local_swarm.start_bootstrap()
    attacker = local_swarm.start_peer(
        "attacker", *extra, *attacker_args, "--attack", attack, module="tests.attacker"
    )
    args = ["--wait-for-peers", str(live), *extra]
    honest = [local_swarm.start_peer(f"honest{i}", "--max-rounds", str(rounds), *args) for i in range(2)]
    if wait:
        local_swarm.wait_rounds(honest, rounds, timeout_s=300)
        assert "ATTACKING" in attacker.log(), attacker.log()[-2000:]
    return honest, attacker


def assert_honest_agree_and_finite(honest) -> None:
    for round_index, by_peer in hashes_by_round(honest).items():
        assert len(set(by_peer.values())) == 1, f"round {round_index}: honest peers disagree: {by_peer}"
    for peer in honest:
        assert all(math.isfinite(r["loss"]) and r["loss"] < 10.0 for r in peer.records()), peer.log()[-2000:]


def zero_model_hash() -> str:
    model = build_model(load_model_config("tiny", vocab_size=8192, max_seq_len=64), seed=0)
    return tensors_sha256([torch.zeros_like(p) for p in model.parameters()])


@pytest.mark.timeout(420)
def test_made_up_voters_cannot_make_honest_peers_adopt_their_state(local_swarm):
    honest, attacker = start(local_swarm, "votes")
    assert_honest_agree_and_finite(honest)
    poisoned = zero_model_hash()
    for peer in honest:
        assert all(r["global_params_sha256"] != poisoned for r in peer.records()), peer.log()[-3000:]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("attack", ["weight", "values"])
def test_an_inflated_weight_or_huge_values_move_the_model_only_within_the_bound(local_swarm, attack):
    honest, _ = start(local_swarm, attack)
    assert_honest_agree_and_finite(honest)
    for peer in honest:
        assert sum(r["group_size"] == 3 for r in peer.records()) >= 2, peer.log()[
            -2000:
        ]  # it was averaged in


@pytest.mark.timeout(420)
def test_a_lying_reducer_is_banned_and_kept_out_of_the_round_and_later_groups(local_swarm):
    # the honest peers train until the test ends; the attacker gives up on its own failed all-reduce soon, to come back
    honest, attacker = start(
        local_swarm, "reducer", rounds=1000, wait=False, attacker_args=("--allreduce-timeout-s", "20")
    )

    def kept_out(peer) -> bool:
        # the round it lied in was averaged again without it, and once it was back trying to join groups (a round
        # over after the one its own check refused), the honest peers applied two more rounds without it
        theirs = attacker.records()
        lied = next((i for i, r in enumerate(theirs) if r["failed"]), None)
        back = theirs[lied + 1 : lied + 2] if lied is not None else []
        return (
            "averaging again without the liar" in peer.log()
            and bool(back)
            and (sum(not r["failed"] and r["time"] > back[0]["time"] for r in peer.records()) >= 2)
        )

    try:
        wait_for(lambda: all(kept_out(p) for p in honest), timeout_s=300, what="the liar to be kept out")
    except AssertionError:
        raise AssertionError("".join(p.log()[-3000:] for p in [*honest, attacker])) from None
    assert_honest_agree_and_finite(honest)
    logs = "".join(peer.log() for peer in honest)
    assert "beyond the bound" in logs and "banning" in logs  # its parts were seen, refused, and it was banned
    for peer in (
        honest
    ):  # every average they applied was the two honest peers' own: it never reduced a shard of theirs
        applied = [r["group_size"] for r in peer.records() if not r["failed"]]
        assert set(applied) == {2}, [(r["group_size"], r["failed"]) for r in peer.records()]


@pytest.mark.timeout(420)
def test_lying_records_neither_stall_the_swarm_nor_cut_its_rounds_short(local_swarm):
    budget = 24 * 4 * 64  # 24 steps of FAST_PEER_ARGS' batch 4 x seq 64, shared by the swarm
    honest, _ = start(local_swarm, "records", "--round-tokens", str(budget))
    assert_honest_agree_and_finite(honest)
    # a false 'done' with the whole budget would end every round after one step of each peer; how the budget splits
    # between the honest peers depends on their speeds (a loaded machine), what they process together does not
    steps_by_round: dict[int, int] = {}
    for peer in honest:
        records = peer.records()
        for r in records[1:]:
            steps_by_round[r["round"]] = steps_by_round.get(r["round"], 0) + r["inner_steps"]
        assert all(r["group_size"] >= 2 for r in records[1:]), peer.log()[-2000:]
    assert steps_by_round and all(steps > 6 for steps in steps_by_round.values()), steps_by_round
