"""The round's decisions (peer/rounds.py), driven by hand-made records and times: no network, no clock.

A lonely outer step forks the swarm, a group scheduled too late splits it, and a wrong majority makes honest peers
adopt a forked model; each branch here is one of those cases."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from peer.records import HashRecord, ProgressRecord
from peer.rounds import (
    JOIN_MARGIN_S,
    RoundProgress,
    Timing,
    after_inner_group_time,
    check_period_s,
    group_time,
    joining_round,
    majority_view,
    max_group_lead_s,
    remembered_peers,
    round_closing,
    round_company,
    round_hashes,
    round_progress,
    schedule_slack_s,
    scheduled_group_time,
    should_resync,
    should_schedule,
    stale_after_s,
    straggler_wait_s,
)

TIMING = Timing(matchmaking_s=2.0, progress_period_s=1.0, chunk_timeout_s=10.0)
NOW = 1000.0


def record(peer: bytes, round_index: int, **fields) -> ProgressRecord:
    values = dict(
        peer_id=peer,
        round=round_index,
        inner_step=0,
        tokens=0,
        done=False,
        averaging=-1,
        scheduled_time=0.0,
        tokens_per_s=0.0,
        eta=0.0,
        client_mode=False,
    )
    values.update(fields)
    return ProgressRecord(**values)


def live(*records: ProgressRecord) -> dict[bytes, ProgressRecord]:
    return {r.peer_id: r for r in records}


# ---- whom a peer waits for at the end of a round -----------------------------------------------------------
def company(*others: ProgressRecord, round_index: int = 3, now: float = NOW):
    return round_company(
        live(record(b"me", 3, done=True), *others), me=b"me", round_index=round_index, now=now
    )


def test_peer_still_in_the_previous_round_is_company_to_wait_for():
    behind = record(b"b", 2, done=True)  # finished round 2's inner steps, still in its outer step
    found = company(behind)
    assert found.peers == [behind] and not found.ready and not found.moved_on


def test_ready_once_every_peer_of_the_round_is_done():
    assert not company(record(b"b", 3)).ready
    done = record(b"b", 3, done=True)
    assert company(done).ready and company(done).peers == [done]


def test_a_joinable_group_scheduled_by_others_means_go_now():
    scheduled = record(b"b", 3, averaging=3, scheduled_time=NOW + JOIN_MARGIN_S + 1)
    assert company(scheduled).ready
    too_late = record(b"b", 3, averaging=3, scheduled_time=NOW + JOIN_MARGIN_S / 2)
    assert not company(too_late).ready  # it forms before we could join: keep waiting for the peer to finish


def test_alone_only_when_nobody_is_at_or_just_behind_the_round():
    assert company().peers == [] and company().ready
    far_behind_and_joining = company(record(b"far", 1, done=True), record(b"new", -1))
    assert far_behind_and_joining.peers == [] and not far_behind_and_joining.moved_on


def test_swarm_past_this_round_means_resync_not_a_lonely_step():
    assert company(record(b"a", 4), record(b"far", 0)).moved_on
    overlapping = record(
        b"o", 4, averaging=3
    )  # trains round 4 while averaging round 3 (--overlap): still ours
    found = company(overlapping)
    assert found.peers == [overlapping] and not found.moved_on


def test_after_inner_group_time_joins_a_forming_group_or_starts_one():
    forming = record(b"b", 3, averaging=3, scheduled_time=NOW + 5)
    assert after_inner_group_time([forming], round_index=3, now=NOW, matchmaking_s=2) == NOW + 5
    gone = record(b"b", 3, averaging=3, scheduled_time=NOW + 0.5)
    assert after_inner_group_time([gone], round_index=3, now=NOW, matchmaking_s=2) == NOW + 2


# ---- liveness ------------------------------------------------------------------------------------------------
def test_stale_after_is_some_periods_but_never_below_the_floor():
    assert stale_after_s(1.0) == 6.0 and stale_after_s(2.0) == 8.0


@pytest.mark.parametrize("age_s, expect_other", [(1.0, True), (16.0, False)])
def test_failed_lookup_keeps_the_last_view_for_a_record_lifetime(age_s, expect_other):
    last = live(record(b"b", 3))
    assert (b"b" in remembered_peers(last, age_s=age_s, record_ttl_s=15.0)) is expect_other


# ---- when a round ends and when matchmaking starts -------------------------------------------------------------
def progress(
    *others: ProgressRecord, mine: ProgressRecord | None = None, round_tokens: int = 0
) -> RoundProgress:
    mine = mine or record(b"me", 3, eta=NOW + 10, tokens_per_s=100.0, tokens=200)
    return round_progress(
        live(mine, *others),
        me=b"me",
        round_index=3,
        now=NOW,
        timing=Timing(
            matchmaking_s=2.0, progress_period_s=1.0, chunk_timeout_s=10.0, round_tokens=round_tokens
        ),
        straggler_wait_s=30.0,
        tokens_per_step=100,
    )


def test_round_ends_when_the_slowest_live_peer_expects_to_finish_but_no_later_than_the_straggler_wait():
    assert progress(record(b"b", 3, eta=NOW + 20)).end_eta == NOW + 20
    assert (
        progress(record(b"b", 3, eta=NOW + 100)).end_eta == NOW + 10 + 30
    )  # a straggler is not waited for forever
    assert (
        progress(record(b"b", 3, eta=NOW + 100, done=True)).end_eta == NOW + 10
    )  # done peers do not hold it up


def test_round_progress_counts_only_peers_of_the_round():
    found = progress(record(b"b", 3, tokens=300, tokens_per_s=50.0), record(b"old", 2, tokens=999))
    assert found.tokens == 500 and found.peers == 2 and not found.all_in_round
    assert found.slowest_step_s == 2.0  # 100 tokens per step at 50 tokens/s


def test_round_tokens_close_the_round_at_the_budget_and_extrapolate_its_end():
    open_round = progress(record(b"b", 3, tokens=300, tokens_per_s=100.0), round_tokens=1000)
    assert not open_round.closed and open_round.end_eta == NOW + 500 / 200.0
    assert progress(record(b"b", 3, tokens=800), round_tokens=1000).closed
    # the majority of the round's peers ending it ends it for all; one peer alone does not (it may be lying)
    assert not progress(record(b"b", 3, done=True), round_tokens=10**9).closed
    mine_done = record(b"me", 3, eta=NOW, done=True)
    assert progress(record(b"b", 3, done=True), mine=mine_done, round_tokens=10**9).closed


def test_the_first_peer_schedules_once_the_end_is_within_the_slack():
    slack = schedule_slack_s(progress(record(b"b", 3, eta=NOW + 10)), TIMING)
    near = progress(record(b"b", 3, eta=NOW + slack), mine=record(b"me", 3, eta=NOW + slack - 1))
    far = progress(record(b"b", 3, eta=NOW + 100), mine=record(b"me", 3, eta=NOW + 100))
    assert near.end_eta == NOW + slack  # the slowest peer's end
    assert should_schedule(near, now=NOW, my_eta=NOW + slack - 1, timing=TIMING, check_period_s=0.5)
    assert not should_schedule(far, now=NOW, my_eta=NOW + 100, timing=TIMING, check_period_s=0.5)
    time_chosen, how = scheduled_group_time(near, now=NOW, timing=TIMING)
    assert how == "own" and time_chosen >= NOW + slack  # others get a progress period and a step to see it


def test_later_peers_adopt_the_scheduled_time_if_they_can_make_it():
    chosen = NOW + 8
    others = record(b"b", 3, eta=NOW + 5, averaging=3, scheduled_time=chosen)
    found = progress(others, mine=record(b"me", 3, eta=NOW + 6))
    assert should_schedule(found, now=NOW, my_eta=NOW + 6, timing=TIMING, check_period_s=0.5)
    assert scheduled_group_time(found, now=NOW, timing=TIMING) == (chosen, "adopted")
    # too slow to make it (done more than half a chunk timeout after the group forms): wait and match after
    assert not should_schedule(found, now=NOW, my_eta=chosen + 6, timing=TIMING, check_period_s=0.5)
    # the group forms before we could join it
    assert not should_schedule(
        found, now=chosen - JOIN_MARGIN_S / 2, my_eta=NOW, timing=TIMING, check_period_s=0.5
    )


def test_progress_is_read_less_often_while_the_round_end_is_far_and_every_half_second_near_it():
    slow_timing = Timing(matchmaking_s=2.0, progress_period_s=2.0, chunk_timeout_s=10.0)
    far = progress(record(b"b", 3, eta=NOW + 100), mine=record(b"me", 3, eta=NOW + 100))
    assert check_period_s(far, now=NOW, timing=slow_timing, base_s=0.5) == 2.0  # one progress period
    assert check_period_s(far, now=NOW, timing=TIMING, base_s=0.5) == 1.0  # never more than one
    assert check_period_s(far, now=NOW, timing=TIMING, base_s=0.1) == 0.4  # nor 4 x the base
    near = progress(record(b"b", 3, eta=NOW + 3), mine=record(b"me", 3, eta=NOW + 3))
    assert check_period_s(near, now=NOW, timing=slow_timing, base_s=0.5) == 0.5
    # the base period, wherever should_schedule could say yes at the next check after a longer wait
    for eta in range(0, 100):
        found = progress(record(b"b", 3, eta=NOW + eta), mine=record(b"me", 3, eta=NOW + eta))
        wait_s = check_period_s(found, now=NOW, timing=slow_timing, base_s=0.5)
        if wait_s > 0.5:
            assert not should_schedule(
                found, now=NOW + wait_s, my_eta=NOW + eta, timing=slow_timing, check_period_s=0.5
            )
    # once another peer scheduled the group, or the round closed, back to the base period
    scheduled = progress(
        record(b"b", 3, eta=NOW + 100, averaging=3, scheduled_time=NOW + 5),
        mine=record(b"me", 3, eta=NOW + 100),
    )
    assert check_period_s(scheduled, now=NOW, timing=slow_timing, base_s=0.5) == 0.5


def test_never_scheduled_ahead_with_overlap_alone_or_while_a_peer_is_behind():
    near = progress(record(b"b", 3, eta=NOW + 1), mine=record(b"me", 3, eta=NOW + 1))
    overlap = Timing(matchmaking_s=2.0, progress_period_s=1.0, chunk_timeout_s=10.0, overlap=True)
    assert not should_schedule(near, now=NOW, my_eta=NOW + 1, timing=overlap, check_period_s=0.5)
    alone = progress(mine=record(b"me", 3, eta=NOW + 1))
    assert not should_schedule(alone, now=NOW, my_eta=NOW + 1, timing=TIMING, check_period_s=0.5)
    behind = progress(record(b"b", 3, eta=NOW + 1), record(b"c", 2), mine=record(b"me", 3, eta=NOW + 1))
    assert not should_schedule(behind, now=NOW, my_eta=NOW + 1, timing=TIMING, check_period_s=0.5)


def test_round_tokens_peers_join_any_scheduled_group_they_can_still_reach():
    tokens_timing = Timing(matchmaking_s=2.0, progress_period_s=1.0, chunk_timeout_s=10.0, round_tokens=1000)
    found = progress(record(b"b", 3, averaging=3, scheduled_time=NOW + 3), round_tokens=1000)
    assert should_schedule(found, now=NOW, my_eta=NOW + 100, timing=tokens_timing, check_period_s=0.5)


def test_group_time_is_the_earliest_future_one_of_the_round():
    records = [
        record(b"a", 3, averaging=3, scheduled_time=NOW + 5),
        record(b"b", 3, averaging=3, scheduled_time=NOW + 4),
        record(b"c", 4, averaging=4, scheduled_time=NOW + 1),
    ]
    assert group_time(records, 3, after=NOW) == NOW + 4
    assert group_time(records, 3, after=NOW + 4.5) == NOW + 5
    assert group_time(records, 5, after=0) == 0.0


def test_straggler_wait_is_the_flag_or_a_median_inner_phase_with_a_floor():
    assert straggler_wait_s(7.0, [100.0]) == 7.0
    assert straggler_wait_s(0.0, []) == 60.0
    assert straggler_wait_s(0.0, [30.0, 12.0, 50.0]) == 30.0
    assert straggler_wait_s(0.0, [1.0, 2.0]) == 10.0


# ---- agreement -------------------------------------------------------------------------------------------------
def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def hashes(peer: bytes, **by_round: str) -> HashRecord:
    by_round = {k.lstrip("r"): sha(v) for k, v in by_round.items()}
    return HashRecord(peer_id=peer, hashes=by_round, state_hashes=by_round)


def test_majority_counts_live_peers_only_and_never_us_as_donor():
    records = {
        b"me": hashes(b"me", r5="x"),
        b"a": hashes(b"a", r5="y"),
        b"b": hashes(b"b", r5="y"),
        b"dead": hashes(b"dead", r5="x"),
    }
    found = round_hashes(records, live=[b"me", b"a", b"b"], round_index=5)
    view = majority_view(found, round_index=5, me=b"me")
    assert view.majority_hash == sha("y") and sorted(view.donors) == [b"a", b"b"] and view.num_records == 3
    assert should_resync(view, sha("x")) and not should_resync(view, sha("y"))


def test_ties_break_by_hash_value_so_every_peer_picks_the_same_winner():
    view = majority_view({b"a": "aaa", b"b": "bbb"}, round_index=1, me=b"a")
    assert view.majority_hash == "bbb" and view.donors == [b"b"]
    assert majority_view({b"b": "bbb", b"a": "aaa"}, round_index=1, me=b"b").majority_hash == "bbb"


def test_no_donor_means_no_resync():
    view = majority_view({b"me": "x"}, round_index=1, me=b"me")
    assert not should_resync(view, "y")  # the majority is only us: nobody to download from
    assert not should_resync(majority_view({}, round_index=1, me=b"me"), "y")


def test_newcomer_joins_at_the_round_most_live_peers_reached_not_the_newest_claim():
    records = {
        b"a": hashes(b"a", r3="x", r4="y"),
        b"b": hashes(b"b", r4="y"),
        b"liar": hashes(b"liar", r999999="z"),  # one record claiming a far-future round
        b"gone": hashes(b"gone", r9="z"),
        b"me": hashes(b"me", r7="w"),
    }
    assert joining_round(records, live=[b"a", b"b", b"liar", b"me"], me=b"me") == 4
    assert joining_round(records, live=[b"me"], me=b"me") is None


def test_a_newcomer_waits_for_a_round_most_peers_have_finished_training():
    def closing(*others: ProgressRecord) -> bool:
        return round_closing(live(record(b"me", -1), *others), me=b"me", round_index=4)

    assert closing(record(b"a", 4, done=True), record(b"b", 4, done=True), record(b"c", 4))
    assert closing(record(b"a", 5), record(b"b", 4, done=True))  # one already past it, one done
    assert not closing(
        record(b"a", 4, done=True), record(b"b", 4), record(b"c", 4)
    )  # one record is not a majority
    assert not closing(record(b"a", 4, done=True), record(b"b", 4))  # half is not a majority
    assert not closing(record(b"a", 4), record(b"b", 4))  # still training: the newcomer can make the group
    assert not closing(record(b"a", -1), record(b"b", -1))  # others still joining do not count
    assert not closing()


def test_only_the_rounds_group_members_vote_when_the_group_is_known():
    sybils = {k: hashes(k, r5="forged") for k in (b"s1", b"s2", b"s3")}
    records = {b"me": hashes(b"me", r5="ours"), b"a": hashes(b"a", r5="ours"), **sybils}
    live = [b"me", b"a", b"s1", b"s2", b"s3"]
    everyone = majority_view(round_hashes(records, live=live, round_index=5), round_index=5, me=b"me")
    assert everyone.majority_hash == sha("forged")  # without group knowledge three made-up keys outvote two
    group = frozenset({b"me", b"a"})
    members = majority_view(
        round_hashes(records, live=live, round_index=5, voters=group), round_index=5, me=b"me"
    )
    assert members.majority_hash == sha("ours") and members.num_records == 2


def test_votes_are_on_the_state_hash_that_covers_momentum():
    same_params = HashRecord(
        peer_id=b"a", hashes={"5": sha("p")}, state_hashes={"5": sha("momentum differs")}
    )
    found = round_hashes({b"a": same_params}, live=[b"a"], round_index=5)
    assert found == {b"a": sha("momentum differs")}


# ---- bounded influence of a lying record (I8) ------------------------------------------------------------------
def test_a_claim_of_the_whole_budget_counts_only_up_to_a_few_times_the_median():
    liar = record(b"liar", 3, tokens=10**12)
    found = progress(record(b"b", 3, tokens=200), liar, round_tokens=10_000)
    assert found.tokens == 200 + 200 + 4 * 200 and not found.closed
    honest_fast = progress(record(b"b", 3, tokens=800), round_tokens=10**9)  # 4x the median: counted in full
    assert honest_fast.tokens == 1000


def test_a_group_time_far_in_the_future_is_not_adopted():
    stall = record(b"liar", 3, averaging=3, scheduled_time=NOW + 10_000, eta=NOW + 1)
    found = progress(stall, mine=record(b"me", 3, eta=NOW + 1))
    assert found.scheduled_time == 0.0  # we choose our own time instead of waiting for the liar's
    assert scheduled_group_time(found, now=NOW, timing=TIMING)[1] == "own"
    # a group the liar says is forming would make us stop waiting for the round's peers; not this one
    assert round_company(live(record(b"me", 3), stall), me=b"me", round_index=3, now=NOW).ready
    assert not round_company(
        live(record(b"me", 3), stall), me=b"me", round_index=3, now=NOW, max_lead_s=30
    ).ready
    lead = max_group_lead_s(TIMING, 30.0)
    assert (
        after_inner_group_time([stall], round_index=3, now=NOW, matchmaking_s=2, max_lead_s=lead) == NOW + 2
    )


def test_a_claimed_crawl_does_not_stretch_the_schedule_beyond_the_straggler_wait():
    crawler = record(b"liar", 3, tokens_per_s=1e-9, eta=NOW + 1)
    assert progress(crawler).slowest_step_s == 30.0


def test_a_tie_with_our_own_hash_waits_for_the_missing_voters():
    """Us and one liar, with the third member's record still missing: the hash order must not pick the liar."""
    hashes = {b"me": "a" * 64, b"liar": "f" * 64}
    view = majority_view(hashes, round_index=3, me=b"me")
    assert view.majority_hash == "f" * 64  # the tie-break alone would pick the liar
    assert not should_resync(dataclasses.replace(view, complete=False), "a" * 64)
    assert should_resync(view, "a" * 64)  # every voter voted: the tie is settled the same way on every peer
    outvoted = majority_view({**hashes, b"other": "f" * 64}, round_index=3, me=b"me")
    assert should_resync(dataclasses.replace(outvoted, complete=False), "a" * 64)
