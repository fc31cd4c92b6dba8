"""A leader's verdict lost on the way (its stream to one follower ends right after the group is assembled, as seen
under load in a soak): the follower asks again, gets the group, and every member ends bit-identical to the
in-memory average instead of the whole round failing (peer/rejoin.py). The next step under the same group key (as
when a round is averaged again) forms a new group: the leader does not take a member's new request for asking
again."""

from __future__ import annotations

import os
from pathlib import Path

import hivemind
import pytest
import torch
from hivemind.p2p.p2p_daemon import P2P
from hivemind.proto import averaging_pb2

from peer.allreduce import ExactAverager
from peer.compression import COMPRESSION
from peer.direct_transport import DirectSettings
from peer.outer import average_contributions, contribution_key, tensors_sha256
from tests.integration.harness import forked_peers, peer_reports

NUM_PEERS = 3
NUM_VALUES = 100_000
STEP_TIMEOUT_S = 30.0
PEERS_TIMEOUT_S = 120.0


def _inputs(peer_index: int) -> torch.Tensor:
    return torch.randn(NUM_VALUES, generator=torch.Generator().manual_seed(peer_index))


def _cut_the_first_verdict(marks: Path) -> None:
    """In this process and those it forks: the first BEGIN_ALLREDUCE any peer sends as a leader never leaves; its
    stream to that follower ends without a word, as when p2p resets it. A file in `marks` says it happened."""
    send = P2P.send_protobuf

    async def send_or_cut(protobuf, writer):
        if (
            isinstance(protobuf, averaging_pb2.MessageFromLeader)
            and protobuf.code == averaging_pb2.BEGIN_ALLREDUCE
            and not any(marks.glob("cut-*"))  # only the first verdict any peer sends
        ):
            (marks / f"cut-{os.getpid()}").touch()
            raise ConnectionResetError("test: the verdict is lost")
        return await send(protobuf, writer)

    P2P.send_protobuf = staticmethod(send_or_cut)


def _peer(peer_index: int, initial_peers: list[str], barrier, results, marks: Path) -> None:
    torch.set_num_threads(1)
    _cut_the_first_verdict(marks)
    dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    values = _inputs(peer_index)
    averager = ExactAverager(
        [torch.zeros(NUM_VALUES)],
        dht,
        prefix="rejoin",
        start=True,
        target_group_size=None,
        min_group_size=NUM_PEERS,
        min_matchmaking_time=3.0,
        request_timeout=1.0,
        next_chunk_timeout=10.0,
        compression=COMPRESSION["none"],
        state_provider=lambda: ({}, []),
        shutdown_timeout=3,
        direct=DirectSettings(enabled=True, connect_timeout_s=2.0),
    )
    try:
        with averager.get_tensors() as tensors:
            tensors[0].copy_(values)
        outcomes = []
        for _ in range(2):  # the second step: the same group key, and no verdict lost
            barrier.wait(timeout=PEERS_TIMEOUT_S)
            try:
                group = averager.step(
                    gather={"order_key": contribution_key([values]).hex()},
                    weight=1.0,
                    timeout=STEP_TIMEOUT_S,
                    allow_retries=False,
                )
                outcome = len(group)
            except Exception as e:  # the round failed for this peer
                outcome = f"{type(e).__name__}: {e}"
            with averager.get_tensors() as tensors:
                outcomes.append((outcome, tensors_sha256(tensors)))
                tensors[0].copy_(values)  # the next step averages the same inputs again
            barrier.wait(timeout=PEERS_TIMEOUT_S)  # a reducer may still be serving the others
        results.put((peer_index, outcomes))
    finally:
        averager.shutdown()
        dht.shutdown()


@pytest.mark.timeout(240)
def test_a_follower_whose_verdict_was_lost_still_averages_with_its_group(tmp_path) -> None:
    def peer(peer_index, initial_peers, barrier, results):
        _peer(peer_index, initial_peers, barrier, results, tmp_path)

    with forked_peers(peer, NUM_PEERS) as (results, procs):
        reports = dict(peer_reports(results, NUM_PEERS, timeout_s=PEERS_TIMEOUT_S))
        for proc in procs:
            proc.join(timeout=15)
    assert len(list(tmp_path.glob("cut-*"))) == 1  # the leader's first verdict was lost (followers send none)
    inputs = [_inputs(i) for i in range(NUM_PEERS)]
    exact = tensors_sha256(
        [average_contributions(inputs, [1.0] * NUM_PEERS, [contribution_key([x]) for x in inputs])]
    )
    assert reports == {index: [(NUM_PEERS, exact)] * 2 for index in range(NUM_PEERS)}
