"""The all-reduce over the direct data path with real peers on 127.0.0.1: parts go over direct TCP connections
where both ends have the path, fall back to the p2p daemon per reducer where not (a peer with the path off, a
listener nobody can reach), and every peer ends bit-identical to the in-memory average either way. Large tensors go
in the group's larger parts (allreduce_part_bytes), through the p2p daemon's streams too."""

from __future__ import annotations

import socket

import hivemind
import pytest
import torch

from peer.allreduce import MAX_PART_BYTES, PARTS_PER_REDUCER, ExactAverager
from peer.compression import COMPRESSION
from peer.direct_transport import DirectSettings
from peer.outer import average_contributions, contribution_key, tensors_sha256
from tests.integration.harness import forked_peers, peer_reports

NUM_PEERS = 3
NUM_VALUES = 400_000  # several parts per shard
LARGE_NUM_VALUES = NUM_PEERS * PARTS_PER_REDUCER * MAX_PART_BYTES // 4  # the largest parts
STEP_TIMEOUT_S = 60.0
PEERS_TIMEOUT_S = 120.0
# (name, per peer: "on", "off" (no direct path at all) or "unreachable" (advertises a port nobody listens on))
SCENARIOS = (
    ("all direct", ("on", "on", "on")),
    ("mixed", ("on", "off", "unreachable")),
    ("p2p, large parts", ("off", "off", "off")),
)


def _num_values(scenario: str) -> int:
    return LARGE_NUM_VALUES if "large" in scenario else NUM_VALUES


def _inputs(peer_index: int, num_values: int = NUM_VALUES) -> torch.Tensor:
    return torch.randn(num_values, generator=torch.Generator().manual_seed(peer_index))


def _weight(peer_index: int) -> float:
    return float(100 * (peer_index + 1))


def _closed_port() -> int:
    with socket.socket() as probe:  # bound, never listening, then closed: connecting to it is refused
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _peer(peer_index: int, initial_peers: list[str], barrier, results) -> None:
    torch.set_num_threads(1)
    dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    for name, modes in SCENARIOS:
        mode, values = modes[peer_index], _inputs(peer_index, _num_values(name))
        averager = ExactAverager(
            [torch.zeros_like(values)],
            dht,
            prefix=f"direct_{name.replace(' ', '_')}",
            start=True,
            target_group_size=None,
            min_group_size=NUM_PEERS,
            min_matchmaking_time=2.0,
            request_timeout=1.0,
            next_chunk_timeout=20.0,
            compression=COMPRESSION["none"],
            state_provider=lambda: ({}, []),
            shutdown_timeout=3,
            direct=DirectSettings(enabled=mode != "off", connect_timeout_s=2.0),
        )
        try:
            direct = averager.direct_metadata()
            if mode == "unreachable":  # as behind a firewall: the advertised port refuses connections
                direct = {**direct, "port": _closed_port()}
            with averager.get_tensors() as tensors:
                tensors[0].copy_(values)
            barrier.wait(timeout=PEERS_TIMEOUT_S)
            group = averager.step(
                gather={"order_key": contribution_key([values]).hex(), "direct": direct},
                weight=_weight(peer_index),
                timeout=STEP_TIMEOUT_S,
                allow_retries=False,
            )
            with averager.get_tensors() as tensors:
                digest = tensors_sha256(tensors)
            barrier.wait(timeout=PEERS_TIMEOUT_S)  # a reducer may still be serving the others
            results.put((peer_index, name, len(group), digest, averager.last_transport_stats()))
        finally:
            averager.shutdown()
    dht.shutdown()


@pytest.fixture(scope="module")
def reports() -> dict[str, dict[int, tuple]]:
    """{scenario: {peer: (group size, sha256, transport stats)}} from one run of NUM_PEERS forked peers."""
    with forked_peers(_peer, NUM_PEERS) as (results, procs):
        collected: dict[str, dict[int, tuple]] = {name: {} for name, _ in SCENARIOS}
        for item in peer_reports(results, NUM_PEERS * len(SCENARIOS), timeout_s=PEERS_TIMEOUT_S):
            peer_index, name, *report = item
            collected[name][peer_index] = tuple(report)
        for proc in procs:
            proc.join(timeout=15)
        return collected


def _exact_sha256(num_values: int) -> str:
    inputs = [_inputs(i, num_values) for i in range(NUM_PEERS)]
    weights = [_weight(i) for i in range(NUM_PEERS)]
    return tensors_sha256([average_contributions(inputs, weights, [contribution_key([x]) for x in inputs])])


@pytest.mark.timeout(200)
@pytest.mark.parametrize("scenario", [name for name, _ in SCENARIOS])
def test_every_peer_ends_bit_identical_to_the_in_memory_average(reports, scenario: str) -> None:
    by_peer = reports[scenario]
    assert sorted(by_peer) == list(range(NUM_PEERS))
    assert all(group_size == NUM_PEERS for group_size, _, _ in by_peer.values())
    assert {digest for _, digest, _ in by_peer.values()} == {_exact_sha256(_num_values(scenario))}


@pytest.mark.timeout(200)
def test_parts_go_direct_where_both_ends_can(reports) -> None:
    for peer, (_, _, stats) in reports["all direct"].items():
        assert (stats["reducers_direct"], stats["reducers_p2p"]) == (2, 0), (peer, stats)
        assert stats["senders_direct"] == 2, (peer, stats)
        # the averager's own CPU time during the transfer (bench_scale.py's CPU floor): spent, and within the wall
        # time its threads had (the averager runs one event loop and a few helper threads)
        assert 0 < stats["transfer_cpu_s"] < 8 * stats["transfer_s"], (peer, stats)


@pytest.mark.timeout(200)
def test_a_peer_without_a_reachable_direct_path_is_reached_through_p2p(reports) -> None:
    stats = {peer: report[2] for peer, report in reports["mixed"].items()}
    paths = {peer: (s["reducers_direct"], s["reducers_p2p"]) for peer, s in stats.items()}
    # peer 0 cannot reach 1 (path off) nor 2 (port refused) directly; peer 1 sends nothing directly; peer 2 still
    # reaches peer 0's listener with its own key
    assert paths == {0: (0, 2), 1: (0, 2), 2: (1, 1)}, paths
    assert [stats[peer]["senders_direct"] for peer in range(NUM_PEERS)] == [1, 0, 0]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("scenario", [name for name, _ in SCENARIOS])
def test_bytes_stay_at_the_bound_on_either_path(reports, scenario: str) -> None:
    mean_sent = sum(report[2]["bytes_sent"] for report in reports[scenario].values()) / NUM_PEERS
    bound = 2 * (NUM_PEERS - 1) / NUM_PEERS * _num_values(scenario) * 4
    assert 1.0 <= mean_sent / bound < 1.02, (mean_sent, bound)  # the same messages, counted the same way


@pytest.mark.timeout(200)
def test_every_member_cuts_the_parts_its_group_size_calls_for(reports) -> None:
    part_bytes = {
        name: {report[2]["part_bytes"] for report in reports[name].values()} for name, _ in SCENARIOS
    }
    assert part_bytes == {
        "all direct": {2**17},  # 400K values, 3 peers: a 133 KB target
        "mixed": {2**17},
        "p2p, large parts": {MAX_PART_BYTES},
    }
