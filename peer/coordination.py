"""Bounded waits on the swarm's records and one round's averaging, on top of the `SwarmNetwork` interface.

Effects only: each loop reads records, asks peer/rounds.py what they mean, and stops at a deadline.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import torch

from peer.network import ScheduledAveraging, SwarmNetwork
from peer.outer import AveragingResult
from peer.rounds import (
    RoundCompany,
    SwarmView,
    Timing,
    after_inner_group_time,
    joining_round,
    majority_view,
    max_group_lead_s,
    round_company,
    round_hashes,
)

logger = logging.getLogger(__name__)

POLL_S = 0.25  # how often a wait re-reads the DHT (a lookup costs milliseconds)
HASH_POLL_S = (
    0.05  # how often the agreement check re-reads the hashes: the group publishes them within milliseconds
)


def wait_for_peers(
    network: SwarmNetwork, count: int, *, timeout_s: float, should_stop: Callable[[], bool]
) -> int:
    """Block until `count` peers (this one included) are live, the timeout passes or should_stop(); returns how
    many are live."""
    deadline = time.monotonic() + timeout_s
    while True:
        live = len(network.live_peers())
        if live >= count or time.monotonic() >= deadline or should_stop():
            return live
        time.sleep(2 * POLL_S)


def wait_for_company(
    network: SwarmNetwork,
    round_index: int,
    *,
    wait_s: float,
    should_stop: Callable[[], bool],
    max_lead_s: float = math.inf,
) -> RoundCompany:
    """Wait until every other live peer of this round has finished its inner steps (at most wait_s) or some of them
    scheduled the round's group (at most max_lead_s ahead); returns the company found then."""
    deadline = time.monotonic() + wait_s
    while True:
        company = round_company(
            network.live_peers(),
            me=network.my_key(),
            round_index=round_index,
            now=network.time(),
            max_lead_s=max_lead_s,
        )
        if company.moved_on or company.ready or time.monotonic() >= deadline or should_stop():
            return company
        time.sleep(POLL_S)


def view_of_round(
    network: SwarmNetwork,
    round_index: int,
    *,
    expected: int = 1,
    timeout_s: float = 5.0,
    voters: frozenset[bytes] | None = None,
    without_me: bool = False,
) -> SwarmView:
    """The majority state hash of a round among its voters (live peers; with `voters`, only those; `without_me`:
    not us) once `expected` of them published theirs (or the timeout passed). Donors are network addresses."""
    deadline = time.monotonic() + timeout_s
    while True:
        records, live = network.hash_records(), network.live_peers()
        hashes = round_hashes(records, live=live, round_index=round_index, voters=voters)
        if without_me:
            hashes.pop(network.my_key(), None)
        if len(hashes) >= expected or time.monotonic() >= deadline:
            view = majority_view(hashes, round_index=round_index, me=network.my_key())
            # a client-mode (outgoing-only) peer cannot serve its state: it votes but never donates
            donors = [
                records[key].peer_id for key in view.donors if not (key in live and live[key].client_mode)
            ]
            return dataclasses.replace(view, donors=donors, complete=len(hashes) >= expected)
        time.sleep(HASH_POLL_S)


def joining_view(network: SwarmNetwork) -> SwarmView | None:
    """The swarm's view of the round a newcomer joins at (the lower median of live peers' newest rounds)."""
    round_index = joining_round(network.hash_records(), live=network.live_peers(), me=network.my_key())
    return None if round_index is None else view_of_round(network, round_index, timeout_s=0.0)


def wait_for_round_after(
    network: SwarmNetwork, round_index: int, *, timeout_s: float, should_stop: Callable[[], bool]
) -> SwarmView | None:
    """Block until the swarm has published the state of a round after `round_index` (or the timeout passed, or
    should_stop()); the newcomer's view of that round, or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not should_stop():
        view = joining_view(network)
        if view is not None and view.round_index > round_index:
            return view
        time.sleep(2 * POLL_S)
    return None


def average_round(
    network: SwarmNetwork,
    pseudo_grads: list[torch.Tensor],
    *,
    round_index: int,
    tokens: int,
    order_key: bytes,
    scheduled: ScheduledAveraging | None,
    timing: Timing,
    straggler_wait_s: float,
    value_bound: float,
    should_stop: Callable[[], bool],
    during_allreduce: Callable[[], None] | None = None,
) -> AveragingResult | None:
    """Average with every live peer of this round; None if the all-reduce failed for this peer.

    With `scheduled` the group is already forming; otherwise wait for the round's other live peers to finish their
    inner steps, then match with them. A peer alone in its round takes a round of one; a peer whose swarm has moved
    past the round gets None (the agreement check then resyncs it: never a lonely outer step behind the swarm)."""
    max_lead_s = max_group_lead_s(timing, straggler_wait_s)
    try:
        network.mark_averaging(round_index)
        if scheduled is None:
            company = wait_for_company(
                network, round_index, wait_s=straggler_wait_s, should_stop=should_stop, max_lead_s=max_lead_s
            )
            if company.moved_on:
                logger.warning(
                    f"[{network.short_id}] round {round_index + 1}: the swarm has moved past this round"
                )
                return None
            if not company.peers:
                return AveragingResult(averaged=pseudo_grads, group_size=1, tokens=tokens)
            group_time = after_inner_group_time(
                company.peers,
                round_index=round_index,
                now=network.time(),
                matchmaking_s=timing.matchmaking_s,
                max_lead_s=max_lead_s,
            )
            scheduled = network.schedule_averaging(
                round_index,
                scheduled_time=group_time,
                order_key=order_key,
                how="after-inner",
                value_bound=value_bound,
                expected_peers=len(company.peers) + 1,
            )
        attempt = network.run_averaging(
            scheduled, pseudo_grads, tokens=tokens, should_stop=should_stop, during_allreduce=during_allreduce
        )
        if attempt.result is None and not attempt.began_transfer and not should_stop():
            # nobody to average with (the others left before any data moved): a round of one is still a round
            company = wait_for_company(network, round_index, wait_s=0.0, should_stop=should_stop)
            if not company.moved_on and not company.peers:
                return AveragingResult(averaged=pseudo_grads, group_size=1, tokens=tokens)
        return attempt.result
    finally:
        network.mark_averaging(-1)
