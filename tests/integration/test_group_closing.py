"""Early group closing with real averagers on 127.0.0.1 (peer/group_closing.py): a member the others did not
count when they scheduled (a newcomer) still gets into the round's group, because it counts itself in and the
leader closes only once its own all-reduce is triggered; and the group still closes before its group time."""

from __future__ import annotations

import multiprocessing as mp
import time

import hivemind
import pytest
import torch
from hivemind.utils import get_dht_time

from peer.allreduce import ExactAverager
from peer.compression import COMPRESSION
from peer.outer import contribution_key
from tests.integration.harness import forked_peers, peer_reports

NUM_PEERS = 3
LATE_PEER = NUM_PEERS - 1  # schedules after the others, counting all three; they counted only themselves
GROUP_LEAD_S = 20.0  # from scheduling to the group time
TRIGGER_BEFORE_S = 10.0  # everyone's pseudo-gradient is "ready" this long before the group time
PEERS_TIMEOUT_S = 120.0
GROUP_TIME = mp.Value("d", 0.0)  # shared by the forked peers: peer 0 sets it


def _peer(peer_index: int, initial_peers: list[str], barrier, results) -> None:
    torch.set_num_threads(1)
    dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    values = torch.full((1000,), float(peer_index))
    averager = ExactAverager(
        [values.clone()],
        dht,
        prefix="group_closing",
        start=True,
        target_group_size=None,
        min_group_size=2,
        min_matchmaking_time=2.0,
        request_timeout=1.0,
        next_chunk_timeout=20.0,
        compression=COMPRESSION["none"],
        state_provider=lambda: ({}, []),
        shutdown_timeout=3,
    )
    try:
        barrier.wait(timeout=PEERS_TIMEOUT_S)
        if peer_index == 0:
            GROUP_TIME.value = get_dht_time() + GROUP_LEAD_S
        barrier.wait(timeout=PEERS_TIMEOUT_S)
        group_time = GROUP_TIME.value

        def schedule(expected: int):
            return averager.step(
                gather={
                    "round": 1,
                    "group_size": expected,
                    "order_key": contribution_key([values]).hex(),
                },
                weight=1.0,
                scheduled_time=group_time,
                timeout=GROUP_LEAD_S + 30.0,
                allow_retries=False,
                require_trigger=True,
                wait=False,
            )

        control = None if peer_index == LATE_PEER else schedule(NUM_PEERS - 1)
        barrier.wait(timeout=PEERS_TIMEOUT_S)  # the others are matchmaking (and would be a full group)
        if control is None:
            control = schedule(NUM_PEERS)
        while get_dht_time() < group_time - TRIGGER_BEFORE_S:  # bounded: the group time is GROUP_LEAD_S ahead
            time.sleep(0.1)
        control.allow_allreduce()
        group = control.result(timeout=PEERS_TIMEOUT_S)
        results.put((peer_index, len(group), get_dht_time() < group_time))
    finally:
        averager.shutdown()
        dht.shutdown()


@pytest.fixture(scope="module")
def reports() -> dict[int, tuple]:
    """{peer: (its group's size, whether its all-reduce finished before the group time)}"""
    with forked_peers(_peer, NUM_PEERS) as (results, procs):
        collected = {
            index: tuple(report)
            for index, *report in peer_reports(results, NUM_PEERS, timeout_s=PEERS_TIMEOUT_S)
        }
        for proc in procs:
            proc.join(timeout=15)
        return collected


@pytest.mark.timeout(200)
def test_a_member_the_others_did_not_count_still_joins_the_group(reports) -> None:
    assert {peer: size for peer, (size, _) in reports.items()} == {
        peer: NUM_PEERS for peer in range(NUM_PEERS)
    }


@pytest.mark.timeout(200)
def test_the_group_closes_before_its_group_time_once_everyone_is_ready(reports) -> None:
    assert all(before for _, before in reports.values()), reports
