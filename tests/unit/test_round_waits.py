"""Who a peer waits for at the end of a round, and when it may take an outer step alone (peer/swarm.py).

A lonely outer step forks the swarm, so it must only happen when no other live peer is at or just behind the
round; these tests drive Swarm's decisions with hand-made progress records instead of a DHT."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from peer.swarm import RECORD_TTL_S, LookupFailed, ProgressRecord, Swarm


def record(peer: bytes, round_index: int, *, done: bool = False, averaging: int = -1) -> ProgressRecord:
    return ProgressRecord(
        peer_id=peer,
        round=round_index,
        inner_step=0,
        tokens=0,
        done=done,
        averaging=averaging,
        scheduled_time=0.0,
        tokens_per_s=0.0,
        eta=0.0,
        client_mode=False,
    )


class Views:
    """live_peers() answers: one list of other peers' records per call (the last one repeats)."""

    def __init__(self, *views: list[ProgressRecord]):
        self.views, self.calls = list(views), 0

    def __call__(self) -> dict[bytes, ProgressRecord]:
        view = self.views[min(self.calls, len(self.views) - 1)]
        self.calls += 1
        return {r.peer_id: r for r in [record(b"me", 3), *view]}


def swarm_with(views: Views) -> Swarm:
    swarm = Swarm.__new__(Swarm)  # no DHT: only the decision logic is under test
    swarm.peer_id = SimpleNamespace(to_bytes=lambda: b"me")
    swarm.live_peers = views
    return swarm


def wait(swarm: Swarm, wait_s: float = 0.0):
    return swarm.wait_until_round_peers_done(3, wait_s=wait_s, should_stop=lambda: False)


def test_peer_still_in_the_previous_round_is_company_not_absence():
    behind = record(b"b", 2, done=True)  # finished round 2's inner steps, still in its outer step
    assert wait(swarm_with(Views([behind]))) == [behind]


def test_waits_until_the_peer_behind_has_finished_this_round():
    views = Views([record(b"b", 2, done=True)], [record(b"b", 3)], [record(b"b", 3, done=True)])
    assert wait(swarm_with(views), wait_s=30.0) == [record(b"b", 3, done=True)]
    assert views.calls == 3


def test_alone_only_when_nobody_is_at_or_just_behind_the_round():
    assert wait(swarm_with(Views([]))) == []
    assert wait(swarm_with(Views([record(b"far", 1, done=True), record(b"new", -1)]))) == []


def test_swarm_past_this_round_means_resync_not_a_lonely_step():
    assert wait(swarm_with(Views([record(b"a", 4), record(b"far", 0)]))) is None
    overlapping = record(b"o", 4, averaging=3)  # trains round 4 while averaging round 3: still ours
    assert wait(swarm_with(Views([overlapping]))) == [overlapping]


@pytest.mark.parametrize("seen_s_ago, expect_other", [(1.0, True), (RECORD_TTL_S + 1.0, False)])
def test_failed_lookup_keeps_the_last_view_for_a_record_lifetime(seen_s_ago, expect_other):
    swarm = Swarm.__new__(Swarm)
    swarm.peer_id = SimpleNamespace(to_bytes=lambda: b"me")
    swarm.config = SimpleNamespace(swarm=SimpleNamespace(progress_period_s=1.0))
    swarm._progress, swarm._progress_key = record(b"me", 3), "progress"
    swarm._last_live = (time.monotonic() - seen_s_ago, {b"b": record(b"b", 3)})

    def lookup_times_out(key):
        raise LookupFailed(key)

    swarm._get = lookup_times_out
    assert (b"b" in swarm.live_peers()) is expect_other
    assert b"me" in swarm.live_peers()
