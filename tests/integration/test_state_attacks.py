"""A donor that lies about the state it serves (tests/attacker.py: malformed metadata and tensors, or the true state
trickled one small chunk every few seconds) costs a downloader a bounded time: it moves on to an honest donor, gets
the state the honest peers hold, and joins, without crashing."""

from __future__ import annotations

import contextlib

import hivemind
import pytest
import torch
from hivemind.p2p import PeerID

from peer.config import OuterConfig, RunConfig, SwarmConfig
from peer.model import build_model, load_model_config
from peer.outer import tensors_sha256
from peer.state import ReplicatedState
from peer.swarm_averaging import RoundAveraging
from peer.swarm_key import OpenAccess
from tests.attacker import MALFORMED
from tests.integration.harness import wait_for

STATE_TIMEOUT_S = (
    120.0  # the downloader's whole budget: a trickler allowed to use it all leaves none for the next
)


def peer_id_of(peer) -> bytes:
    maddrs = wait_for(peer.maddrs, timeout_s=120, what=f"{peer.name}'s multiaddrs")
    return PeerID.from_base58(maddrs[0].split("/p2p/")[-1]).to_bytes()


@contextlib.contextmanager
def downloader(initial_peers: list[str], fingerprint: str):
    """This test process as a client-mode peer of the run that only downloads states (RoundAveraging, the real path)."""
    config = RunConfig(
        swarm=SwarmConfig(
            initial_peers=tuple(initial_peers),
            host_maddrs=("/ip4/127.0.0.1/tcp/0",),
            client_mode=True,
            state_timeout_s=STATE_TIMEOUT_S,
        )
    )
    params = [p.detach() for p in tiny_model().parameters()]
    dht = hivemind.DHT(
        initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=True, start=True
    )
    try:
        averaging = RoundAveraging(
            config,
            fingerprint,
            dht,
            [torch.zeros_like(p) for p in params],
            state_provider=None,
            short_id="tester",
            voter_key=b"tester",
            access=OpenAccess(),
        )
        try:
            yield averaging, ReplicatedState(params, OuterConfig(), fingerprint=fingerprint)
        finally:
            averaging.shutdown()
    finally:
        dht.shutdown()


def tiny_model():
    return build_model(load_model_config("tiny", vocab_size=8192, max_seq_len=64), seed=0)


def well_formed(state: ReplicatedState):
    """The structural part of the peer's own check (types, bounds, tensor count, shapes, dtypes); the test compares
    the hash with the honest peer's records itself."""

    def check(metadata: object, tensors: object) -> str | None:
        return state.check_donation(
            metadata, tensors, min_round=0, expected_state_hash=lambda _: tensors_sha256(tensors)
        )

    return check


def assert_is_the_honest_state(downloaded, honest, state: ReplicatedState) -> None:
    assert downloaded is not None, "no donor gave a state"
    metadata, tensors = downloaded
    num = len(state.outer.global_params)
    round_index, params_hash = metadata["round"], tensors_sha256(tensors[:num])
    wait_for(
        lambda: any(r["round"] == round_index for r in honest.records()),
        timeout_s=60,
        what=f"the honest peer's record of round {round_index}",
    )
    theirs = {r["round"]: r["global_params_sha256"] for r in honest.records()}
    assert theirs[round_index] == params_hash, "the downloaded state is not the one the honest peer holds"


def start_pair(local_swarm, attack: str):
    """An attacking donor (it trains honestly, so its hashes are the majority's and newcomers ask it for state) and an
    honest peer, after their first round together."""
    local_swarm.start_bootstrap()
    attacker = local_swarm.start_peer(
        "attacker", "--attack", attack, "--wait-for-peers", "2", module="tests.attacker"
    )
    honest = local_swarm.start_peer("honest", "--wait-for-peers", "2")
    local_swarm.wait_rounds([honest], 1, timeout_s=240)
    return attacker, honest


@pytest.mark.timeout(420)
def test_malformed_states_are_refused_and_the_next_donor_is_asked(local_swarm):
    attacker, honest = start_pair(local_swarm, "metadata")
    fingerprint = honest.records()[0]["fingerprint"]
    donors = [peer_id_of(attacker), peer_id_of(honest)]
    with downloader(local_swarm.bootstrap_maddrs, fingerprint) as (averaging, state):
        for _ in MALFORMED:  # the attacker serves each malformation in turn, whatever it served others before
            assert_is_the_honest_state(
                averaging.download_state(donors, check=well_formed(state)), honest, state
            )
    served = attacker.log()
    assert all(f"serving a malformed state: {kind}" in served for kind in MALFORMED), served[-3000:]
    assert honest.alive() and attacker.alive()


@pytest.mark.timeout(420)
def test_a_donor_that_trickles_its_state_is_dropped_in_time_for_the_next(local_swarm):
    attacker, honest = start_pair(local_swarm, "trickle")
    fingerprint = honest.records()[0]["fingerprint"]
    donors = [peer_id_of(attacker), peer_id_of(honest)]
    with downloader(local_swarm.bootstrap_maddrs, fingerprint) as (averaging, state):
        # at 1 KiB per 2 s the 12 MB state would take days: without the rate bound it would use up the whole budget
        assert_is_the_honest_state(averaging.download_state(donors, check=well_formed(state)), honest, state)
    assert "serving a trickle" in attacker.log()


@pytest.mark.timeout(420)
def test_a_newcomer_joins_the_swarm_while_a_donor_trickles(local_swarm):
    attacker, honest = start_pair(local_swarm, "trickle")
    local_swarm.wait_rounds([honest], 2, timeout_s=120)
    newcomer = local_swarm.start_peer(
        "newcomer", "--max-rounds", "2", "--state-timeout-s", str(STATE_TIMEOUT_S)
    )
    local_swarm.wait_rounds([newcomer], 1, timeout_s=300)
    log = newcomer.log()
    assert "joined the swarm at round" in log and "could not download" not in log, log[-3000:]
    first = newcomer.records()[0]
    wait_for(
        lambda: any(r["round"] == first["round"] for r in honest.records()),
        timeout_s=60,
        what="the honest peer's record of the newcomer's first round",
    )
    theirs = {r["round"]: r["global_params_sha256"] for r in honest.records()}
    assert first["round"] >= 3 and theirs[first["round"]] == first["global_params_sha256"], log[-3000:]
