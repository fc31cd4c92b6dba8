"""Fuzzing the round decisions (peer/rounds.py) with hypothesis: fed any schema-valid records, from honest peers or
liars, they never raise and their answers stay within what an honest swarm could produce: a group time is 0 or in
(now, now + the longest lead an honest peer schedules], a token count gives no peer more than 4x the median claim,
the majority hash does not depend on the order records arrived in, a joining round is a round records may name."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic.v1 import ValidationError

from peer import rounds
from peer.config import fingerprint as config_fingerprint
from peer.inner_phase import CHECK_PERIOD_S
from peer.records import HashRecord, ProgressRecord, SettingsRecord
from peer.rounds import Timing

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NOW = 1.8e9  # DHT time is Unix time
ME = b"me"


def declared_range(schema, name: str) -> tuple[float, float]:
    kind = schema.__fields__[name].type_
    return getattr(kind, "ge", None), getattr(kind, "le", None)


MAX_ROUND = declared_range(ProgressRecord, "round")[1] or 10**9
MAX_TIME = declared_range(ProgressRecord, "scheduled_time")[1] or 1e11
MAX_TOKENS = declared_range(ProgressRecord, "tokens")[1] or 10**15
MAX_RATE = declared_range(ProgressRecord, "tokens_per_s")[1] or 1e9


def near(value: float, spread: float) -> st.SearchStrategy[float]:
    return st.floats(max(0.0, value - spread), min(MAX_TIME, value + spread))


times = (
    st.sampled_from([0.0, 5e-324, 1.0, MAX_TIME])
    | near(NOW, 5.0)
    | near(NOW, 3600.0)
    | st.floats(0.0, MAX_TIME)
)
counts = st.sampled_from([0, 1, MAX_TOKENS]) | st.integers(0, 10**6) | st.integers(0, MAX_TOKENS)
rates = st.sampled_from([0.0, 5e-324, 1e-300, MAX_RATE]) | st.floats(0.0, 1e5) | st.floats(0.0, MAX_RATE)


def round_numbers(round_index: int) -> st.SearchStrategy[int]:
    """Mostly the round itself (so that whole swarms are in one round), else near it, else anything."""
    close = st.integers(max(-1, round_index - 2), min(MAX_ROUND, round_index + 2))
    anywhere = st.sampled_from([-1, 0, MAX_ROUND]) | st.integers(-1, MAX_ROUND)
    return st.sampled_from(["same"] * 6 + ["close", "anywhere"]).flatmap(
        lambda kind: st.just(round_index) if kind == "same" else close if kind == "close" else anywhere
    )


def soon(now: float) -> st.SearchStrategy[float]:
    """A time a peer would publish (0: none, or within a minute of now), or anything the schema allows."""
    return st.sampled_from(["zero", "soon", "soon", "soon", "any"]).flatmap(
        lambda kind: st.just(0.0) if kind == "zero" else near(now, 60.0) if kind == "soon" else times
    )


@st.composite
def progress_records(draw, round_index: int, peer_id: bytes) -> ProgressRecord:
    """A record that passes the schema: an honest peer's, or a liar's with any value the schema lets through."""
    fields = dict(
        peer_id=peer_id,
        round=draw(round_numbers(round_index)),
        inner_step=draw(counts),
        tokens=draw(counts),
        done=draw(st.booleans()),
        averaging=draw(st.sampled_from([-1, round_index]) | round_numbers(round_index)),
        scheduled_time=draw(soon(NOW)),
        tokens_per_s=draw(rates),
        eta=draw(soon(NOW)),
        client_mode=draw(st.booleans()),
    )
    try:
        return ProgressRecord(**fields)
    except ValidationError:
        assume(False)  # outside this schema's bounds: such a record never reaches the decisions


@st.composite
def live_views(draw) -> tuple[int, dict[bytes, ProgressRecord]]:
    """(round index, the live peers' records with our own under ME): 1 to 7 peers."""
    round_index = draw(st.integers(0, 50) | st.sampled_from([MAX_ROUND - 1]))
    keys = [ME] + [bytes([i]) * 8 for i in range(draw(st.integers(0, 6)))]
    return round_index, {key: draw(progress_records(round_index, key)) for key in keys}


timings = st.builds(
    Timing,
    matchmaking_s=st.floats(0.1, 60.0),
    progress_period_s=st.floats(0.1, 30.0),
    chunk_timeout_s=st.floats(0.1, 60.0),
    round_tokens=st.sampled_from([0, 0]) | st.integers(1, 10**9),
    overlap=st.booleans(),
)
straggler_waits = st.floats(0.1, 600.0)
tokens_per_step = st.integers(1, 10**7)
now_times = near(NOW, 10.0)


@FUZZ
@given(view=live_views(), timing=timings, wait_s=straggler_waits, step_tokens=tokens_per_step, now=now_times)
def test_a_scheduled_group_time_is_never_in_the_past_or_further_than_an_honest_lead(
    view, timing, wait_s, step_tokens, now
):
    round_index, live = view
    progress = rounds.round_progress(
        live,
        me=ME,
        round_index=round_index,
        now=now,
        timing=timing,
        straggler_wait_s=wait_s,
        tokens_per_step=step_tokens,
    )
    max_lead = rounds.max_group_lead_s(timing, wait_s)
    assert progress.scheduled_time == 0 or progress.scheduled_time <= now + max_lead
    assert 0 <= progress.slowest_step_s <= wait_s
    assert progress.peers == sum(r.round == round_index for r in live.values())
    schedule = rounds.should_schedule(
        progress, now=now, my_eta=live[ME].eta, timing=timing, check_period_s=CHECK_PERIOD_S
    )
    if schedule:
        group_time, how = rounds.scheduled_group_time(progress, now=now, timing=timing)
        assert how in ("own", "adopted")
        assert now < group_time <= now + max_lead, (group_time - now, max_lead, how)


@FUZZ
@given(view=live_views(), timing=timings, wait_s=straggler_waits, step_tokens=tokens_per_step, now=now_times)
def test_the_tokens_of_a_round_count_no_peer_for_more_than_four_times_the_median(
    view, timing, wait_s, step_tokens, now
):
    round_index, live = view
    progress = rounds.round_progress(
        live,
        me=ME,
        round_index=round_index,
        now=now,
        timing=timing,
        straggler_wait_s=wait_s,
        tokens_per_step=step_tokens,
    )
    claims = sorted(r.tokens for r in live.values() if r.round == round_index)
    assert progress.tokens == rounds.robust_token_sum(claims)
    if claims:
        median = claims[(len(claims) - 1) // 2]
        assert 0 <= progress.tokens <= min(sum(claims), len(claims) * 4 * median)
    else:
        assert progress.tokens == 0


@FUZZ
@given(claims=st.lists(counts, max_size=12), liar=counts)
def test_one_liar_adds_at_most_four_medians_to_the_honest_claims(claims, liar):
    with_liar = rounds.robust_token_sum([*claims, liar])
    everyone = sorted([*claims, liar])
    assert with_liar <= sum(claims) + 4 * everyone[(len(everyone) - 1) // 2]
    if len(set(claims)) == 1 and liar == claims[0]:
        assert with_liar == sum(claims) + liar  # agreeing honest peers are counted in full


@FUZZ
@given(view=live_views(), timing=timings, wait_s=straggler_waits, now=now_times)
def test_the_group_a_peer_joins_after_its_inner_phase_is_soon(view, timing, wait_s, now):
    round_index, live = view
    max_lead = rounds.max_group_lead_s(timing, wait_s)
    company = rounds.round_company(live, me=ME, round_index=round_index, now=now, max_lead_s=max_lead)
    assert all(r in live.values() and r is not live[ME] for r in company.peers)
    if company.moved_on:
        assert not company.peers
    group_time = rounds.after_inner_group_time(
        company.peers,
        round_index=round_index,
        now=now,
        matchmaking_s=timing.matchmaking_s,
        max_lead_s=max_lead,
    )
    assert now < group_time <= now + max_lead


@FUZZ
@given(
    records=st.lists(near(NOW, 3600.0) | times, max_size=8),
    after=now_times,
    lead=st.floats(0.0, 1000.0),
    round_index=st.integers(0, 50),
)
def test_group_time_is_zero_or_inside_the_window(records, after, lead, round_index):
    published = [
        ProgressRecord(
            peer_id=bytes([i]),
            round=round_index,
            inner_step=0,
            tokens=0,
            done=False,
            averaging=round_index,
            scheduled_time=t,
            tokens_per_s=0.0,
            eta=t,
            client_mode=False,
        )
        for i, t in enumerate(records)
    ]
    found = rounds.group_time(published, round_index, after=after, before=after + lead)
    assert found == 0 or after < found <= after + lead


# ---- agreement ------------------------------------------------------------------------------------------------
sha256s = st.sampled_from(["0" * 64, "1" * 64, "a" * 64]) | st.binary(min_size=32, max_size=32).map(bytes.hex)
# every round a record may name (one past MAX_ROUND fails the schema: test_a_hash_record_cannot_name_a_round_past_...)
round_keys = (
    st.integers(0, 60).map(str) | st.sampled_from(["0", str(MAX_ROUND)]) | st.integers(0, MAX_ROUND).map(str)
)


@st.composite
def hash_records(draw) -> dict[bytes, HashRecord]:
    records = {}
    for i in range(draw(st.integers(0, 7))):
        key = ME if i == 0 else bytes([i]) * 8
        state_hashes = draw(st.dictionaries(round_keys, sha256s, max_size=6))
        try:
            records[key] = HashRecord(
                peer_id=key,
                hashes=draw(st.dictionaries(round_keys, sha256s, max_size=20)),
                state_hashes=state_hashes,
            )
        except ValidationError:
            assume(False)
    return records


@FUZZ
@given(records=hash_records(), round_index=st.integers(0, 60), data=st.data())
def test_the_majority_hash_is_the_same_whatever_order_the_records_arrived_in(records, round_index, data):
    live = data.draw(st.sets(st.sampled_from(sorted(records) + [b"gone"])))
    voters = data.draw(st.none() | st.sets(st.sampled_from(sorted(records) + [b"stranger"])))
    hashes = rounds.round_hashes(records, live=live, round_index=round_index, voters=voters)
    assert set(hashes) <= set(live) & set(records) & (set(voters) if voters is not None else set(records))
    view = rounds.majority_view(hashes, round_index=round_index, me=ME)
    shuffled = dict(data.draw(st.permutations(list(hashes.items()))))
    again = rounds.majority_view(shuffled, round_index=round_index, me=ME)
    assert (view.majority_hash, sorted(view.donors)) == (again.majority_hash, sorted(again.donors))
    assert view.num_records == len(hashes) and ME not in view.donors
    if hashes:
        assert view.majority_hash in hashes.values()
        assert all(hashes[donor] == view.majority_hash for donor in view.donors)
    else:
        assert view.majority_hash is None and not view.donors


@FUZZ
@given(records=hash_records(), data=st.data())
def test_a_newcomer_joins_at_the_lower_median_of_the_others_newest_rounds(records, data):
    live = data.draw(st.sets(st.sampled_from(sorted(records) + [b"gone"])))
    joined = rounds.joining_round(records, live=live, me=ME)
    newest = sorted(
        max(map(int, r.state_hashes))
        for key, r in records.items()
        if key in live and key != ME and r.state_hashes
    )
    if not newest:
        assert joined is None
    else:  # at most as far ahead as the honest half: a minority of liars cannot pull it up
        assert joined in newest and joined <= newest[(len(newest) - 1) // 2]


def test_a_hash_record_cannot_name_a_round_past_the_last_one():
    """A newcomer whose only other live peer names round 9999999999 would join there and publish progress records
    no schema accepts (ProgressRecord.round <= MAX_ROUND)."""
    with pytest.raises(ValidationError):
        HashRecord(peer_id=b"liar", hashes={}, state_hashes={str(MAX_ROUND + 1): "0" * 64})


SETTINGS = [{"inner_steps": h} for h in (5, 6, 7)]  # three runs' settings; fingerprints are their hashes


def settings_record(i: int, settings: dict, *, forged: bool = False) -> SettingsRecord:
    fingerprint = "0" * 16 if forged else config_fingerprint(settings)
    return SettingsRecord(peer_id=bytes([i]) * 8, fingerprint=fingerprint, settings_json=json.dumps(settings))


@FUZZ
@given(
    published=st.lists(st.tuples(st.sampled_from(range(3)), st.booleans()), max_size=6),
    ours=st.sampled_from(range(2)),
)
def test_one_stranger_settings_record_never_makes_an_agreeing_peer_exit(published, ours):
    records = {
        bytes([i]) * 8: settings_record(i, SETTINGS[s], forged=forged)
        for i, (s, forged) in enumerate(published)
    }
    mine = config_fingerprint(SETTINGS[ours])
    conflict = rounds.conflicting_settings(records, me=ME, fingerprint=mine)
    # a conflict only when no other peer agrees with us, counting only records that hash to their fingerprint
    # (a forged one proves nothing)
    honest = {s for s, forged in published if not forged}
    assert (conflict is not None) == (bool(honest) and ours not in honest)
    if conflict is not None:
        assert conflict.fingerprint != mine and conflict in records.values()


@FUZZ
@given(configured=st.floats(0.0, 1e4), recent=st.lists(st.floats(0.0, 1e6), max_size=6))
def test_the_straggler_wait_is_positive_and_finite(configured, recent):
    wait = rounds.straggler_wait_s(configured, recent)
    assert 0 < wait < math.inf
