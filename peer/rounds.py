"""The round's decisions as pure functions of settings, the peers' records and the time.

Whom a peer waits for, when it schedules matchmaking and for what time, when a --round-tokens round ends, which
group time it adopts, which hash is the majority and who may donate state. Nothing here touches the network or
a clock: callers pass `now` (DHT time) and the records they read, so unit tests feed hand-made cases.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from peer.config import RunConfig
from peer.config import fingerprint as settings_fingerprint
from peer.records import HashRecord, ProgressRecord, SettingsRecord

# a peer joins a scheduled group only if it can start matchmaking this long before the group forms
JOIN_MARGIN_S = 1.0
# a peer whose last progress publication is older than this many periods (and at least STALE_MIN_S) counts as
# gone: a killed peer stops blocking the others' waits within seconds, not after its record's whole lifetime
STALE_AFTER_PERIODS, STALE_MIN_S = 4, 6.0
# a peer's token claim counts up to this many times the median claim of its round (see robust_token_sum)
TOKEN_CLAIM_FACTOR = 4
# the adaptive straggler wait: one median inner phase of ours, at least this long; before any is measured, the default
MIN_STRAGGLER_WAIT_S, FIRST_STRAGGLER_WAIT_S = 10.0, 60.0


@dataclass(frozen=True, kw_only=True)
class Timing:
    """The settings the round's timing decisions depend on."""

    matchmaking_s: float
    progress_period_s: float
    chunk_timeout_s: float
    round_tokens: int = 0
    """--round-tokens (0: every peer does H steps)."""
    overlap: bool = False

    @classmethod
    def of(cls, config: RunConfig) -> Timing:
        swarm = config.swarm
        return cls(
            matchmaking_s=swarm.matchmaking_s,
            progress_period_s=swarm.progress_period_s,
            chunk_timeout_s=swarm.chunk_timeout_s,
            round_tokens=config.inner.round_tokens,
            overlap=config.outer.overlap,
        )


# ---- who is live --------------------------------------------------------------------------------------------
def stale_after_s(progress_period_s: float) -> float:
    """A progress record published longer ago than this belongs to a peer that is gone."""
    return max(STALE_AFTER_PERIODS * progress_period_s, STALE_MIN_S)


def remembered_peers(
    last_seen: Mapping[bytes, ProgressRecord], *, age_s: float, record_ttl_s: float
) -> dict[bytes, ProgressRecord]:
    """What to believe when a lookup of the live peers timed out: the last view, for one record lifetime. A slow
    lookup under load must not make a peer think it is alone (it would take a lonely outer step and fork)."""
    return dict(last_seen) if age_s < record_ttl_s else {}


# ---- the end of a round -------------------------------------------------------------------------------------
def group_time(
    records: Iterable[ProgressRecord], round_index: int, *, after: float, before: float = math.inf
) -> float:
    """The earliest group time in (after, before] that peers of this round published for its all-reduce (0: none).
    `before` bounds how far ahead a published time may be: one far in the future would stall everyone who adopted
    it (I8), so such a time is ignored."""
    times = [
        r.scheduled_time for r in records if r.averaging == round_index and after < r.scheduled_time <= before
    ]
    return min(times, default=0.0)


def max_group_lead_s(timing: Timing, straggler_wait_s: float) -> float:
    """The furthest ahead an honest peer can schedule a group: its matchmaking slack with the slowest step it
    waits for (at most the straggler wait), plus one progress check."""
    return timing.matchmaking_s + timing.progress_period_s + straggler_wait_s + 2 * JOIN_MARGIN_S + 1.0


def robust_token_sum(tokens: Sequence[int]) -> int:
    """The round's tokens with each peer's claim capped at TOKEN_CLAIM_FACTOR x the median claim, so that one peer
    cannot end a --round-tokens round at once by claiming the whole budget (honest peers up to that many times
    faster than the median are counted in full)."""
    if not tokens:
        return 0
    cap = TOKEN_CLAIM_FACTOR * sorted(tokens)[(len(tokens) - 1) // 2]  # the lower median
    return sum(min(t, cap) for t in tokens)


@dataclass(frozen=True)
class RoundProgress:
    """The swarm's combined progress in one round."""

    tokens: int
    """Tokens processed in the round by all live peers in it."""
    closed: bool
    """Some peer has ended the round (or, with --round-tokens, the swarm reached the budget)."""
    end_eta: float
    """DHT time at which the round's all-reduce should start."""
    peers: int
    all_in_round: bool
    """Every live peer has reached this round (none is still finishing the previous one)."""
    scheduled_time: float
    """The group time another peer of this round already scheduled (0: none yet)."""
    slowest_step_s: float
    """The longest inner step among the round's peers: how late a peer may notice a scheduled group."""


def round_progress(
    live: Mapping[bytes, ProgressRecord],
    *,
    me: bytes,
    round_index: int,
    now: float,
    timing: Timing,
    straggler_wait_s: float,
    tokens_per_step: int,
) -> RoundProgress:
    """The swarm's progress in a round from the live peers' records (`live` includes this peer's own record).

    `end_eta` is when the round's all-reduce should start: with fixed H, when the slowest live peer of the round
    expects to finish (but no later than straggler_wait_s after this peer); with --round-tokens, when the swarm's
    combined throughput reaches the token budget."""
    mine = live[me]
    round_tokens = timing.round_tokens
    records = [r for r in live.values() if r.round == round_index]
    others = [r for pid, r in live.items() if pid != me]
    tokens = robust_token_sum([r.tokens for r in records])
    # a peer ends the round for all only with the majority: one lying `done` must not cut everyone's round short
    closed = 2 * sum(r.done for r in records) > len(records)
    if round_tokens:
        closed = closed or tokens >= round_tokens
        rate = sum(r.tokens_per_s for r in records if not r.done)
        end_eta = now + max(0, round_tokens - tokens) / rate if rate > 0 else mine.eta
    else:
        end_eta = max([r.eta for r in records if not r.done] + [mine.eta])
        end_eta = min(end_eta, mine.eta + straggler_wait_s)
    return RoundProgress(
        tokens=tokens,
        closed=closed,
        end_eta=end_eta,
        peers=len(records),
        all_in_round=all(r.round == round_index or r.averaging == round_index for r in live.values()),
        scheduled_time=group_time(
            others, round_index, after=0.0, before=now + max_group_lead_s(timing, straggler_wait_s)
        ),
        # a peer slower per step than the whole straggler wait is not waited for anyway (and cannot claim to be)
        slowest_step_s=min(
            straggler_wait_s,
            max((tokens_per_step / r.tokens_per_s for r in records if r.tokens_per_s > 0), default=0.0),
        ),
    )


def schedule_slack_s(progress: RoundProgress, timing: Timing) -> float:
    """How far ahead of its group time the first peer starts matchmaking: long enough for hivemind to match, and for
    every other peer of the round to see the chosen time (after its current inner step and the next progress
    publication) and still join."""
    return timing.matchmaking_s + timing.progress_period_s + progress.slowest_step_s + JOIN_MARGIN_S


def should_schedule(
    progress: RoundProgress, *, now: float, my_eta: float, timing: Timing, check_period_s: float
) -> bool:
    """Start this round's matchmaking now, during the inner phase? Never with --overlap (there the all-reduce runs
    behind the next round's compute anyway, and the robust way, waiting until every peer is done, costs nothing),
    only once every live peer has reached the round, and only if we will be done by the group's time."""
    if timing.overlap or progress.peers < 2 or not progress.all_in_round:
        return False
    if progress.scheduled_time and timing.round_tokens:  # the round ends for all at once
        return progress.scheduled_time > now + JOIN_MARGIN_S
    if progress.scheduled_time:  # another peer chose the group's time: join if we can make it
        return (
            progress.scheduled_time > now + JOIN_MARGIN_S
            and my_eta <= progress.scheduled_time + timing.chunk_timeout_s / 2
        )
    return progress.end_eta - now <= schedule_slack_s(progress, timing) + 2 * check_period_s


def check_period_s(progress: RoundProgress, *, now: float, timing: Timing, base_s: float) -> float:
    """How long the inner phase may train before it reads the swarm's progress again: `base_s` once the round's end
    is near (should_schedule assumes it), but up to one progress period (and 4 x base_s) while the end is further
    than the scheduling slack plus two progress periods away. The records it reads change about once per progress
    period, so reading them faster early in a round only multiplies every peer's DHT traffic by k."""
    if progress.closed or progress.scheduled_time:
        return base_s
    far_s = progress.end_eta - now - schedule_slack_s(progress, timing) - 2 * timing.progress_period_s
    return min(timing.progress_period_s, 4 * base_s, max(base_s, far_s / 2))


def scheduled_group_time(progress: RoundProgress, *, now: float, timing: Timing) -> tuple[float, str]:
    """The group time to schedule for, and how it was chosen: adopted (another peer of the round chose it) or own."""
    if progress.scheduled_time:
        return progress.scheduled_time, "adopted"
    return max(progress.end_eta, now + schedule_slack_s(progress, timing)), "own"


def inner_eta(*, now: float, steps_done: int, steps_left: int, elapsed_s: float) -> float:
    """When the inner phase will end, extrapolated from the steps done so far."""
    return now + steps_left * elapsed_s / max(1, steps_done)


def straggler_wait_s(configured_s: float, recent_inner_s: Sequence[float]) -> float:
    """How long to wait for slower peers: the flag, or one median inner phase of ours (at least 10 s)."""
    if configured_s > 0:
        return configured_s
    recent = sorted(recent_inner_s)
    return max(MIN_STRAGGLER_WAIT_S, recent[len(recent) // 2]) if recent else FIRST_STRAGGLER_WAIT_S


@dataclass(frozen=True)
class RoundCompany:
    """The other peers a peer averages with at the end of a round."""

    peers: list[ProgressRecord]
    """Live peers in the round, or one round behind and on their way to it (empty: a round of one)."""
    ready: bool
    """Nobody is still training this round (or a group of it is already scheduled): average now."""
    moved_on: bool = False
    """Every other live peer is past this round: no group will form; resync instead of a lonely outer step."""


def round_company(
    live: Mapping[bytes, ProgressRecord],
    *,
    me: bytes,
    round_index: int,
    now: float,
    max_lead_s: float = math.inf,
) -> RoundCompany:
    """Whom to wait for after our inner steps. Peers still finishing the previous round (its outer step, or a slow
    inner phase) are on their way to this one and count as company; a peer takes an outer step alone only when no
    other live peer is at or just behind its round."""
    others = [r for pid, r in live.items() if pid != me]
    in_round = [r for r in others if r.round == round_index or r.averaging == round_index]
    coming = [r for r in others if r.round == round_index - 1 and r not in in_round]
    if not in_round and not coming and any(r.round > round_index for r in others):
        return RoundCompany([], ready=True, moved_on=True)
    pending = coming + [r for r in in_round if r.round == round_index and not r.done]
    # a group already scheduled by others of this round: join it now instead of waiting it out
    joinable = group_time(in_round, round_index, after=now + JOIN_MARGIN_S, before=now + max_lead_s) > 0
    return RoundCompany(in_round + coming, ready=not pending or joinable)


def round_closing(live: Mapping[bytes, ProgressRecord], *, me: bytes, round_index: int) -> bool:
    """Whether most live peers have finished a round's inner steps (or moved past it): its group is forming or
    formed, counted without a newcomer that only now adopts the round's state. Such a newcomer would train the
    round's last steps, find no group and resync; it waits for the round's result instead. A majority, so that one
    record cannot hold newcomers back; peers still joining (round -1) do not count."""
    others = [r for pid, r in live.items() if pid != me and r.round >= 0]
    finished = sum(r.round > round_index or (r.round == round_index and r.done) for r in others)
    return 2 * finished > len(others) > 0


def after_inner_group_time(
    company: Sequence[ProgressRecord],
    *,
    round_index: int,
    now: float,
    matchmaking_s: float,
    max_lead_s: float = math.inf,
) -> float:
    """The group time of a round whose matchmaking starts after the inner phase: a group the others already
    scheduled if it is still joinable, else one matchmaking period from now."""
    joinable = group_time(company, round_index, after=now + JOIN_MARGIN_S, before=now + max_lead_s)
    return joinable or now + matchmaking_s


# ---- agreement (I1/I3) --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SwarmView:
    """What the live peers agree on for a round, from their published hash records."""

    round_index: int
    majority_hash: str | None
    donors: list[bytes]
    """Peers other than us that hold the majority hash: whom to download state from (their record keys; the
    caller maps them to network addresses)."""
    num_records: int
    votes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """How many voters hold each hash."""
    complete: bool = True
    """Every voter expected for the round had published (False: the view was taken when the wait ran out)."""


def round_hashes(
    hash_records: Mapping[bytes, HashRecord],
    *,
    live: Iterable[bytes],
    round_index: int,
    voters: Iterable[bytes] | None = None,
) -> dict[bytes, str]:
    """The state hash each voter published for a round: one vote per record-signing key, from live peers only (a peer
    that left or was killed neither votes nor donates), and, when the round's group is known, only from its members
    (a stranger's records, however many keys it makes up, do not vote on a round it did not average)."""
    allowed = set(live) if voters is None else set(live) & set(voters)
    key = str(round_index)
    return {
        pid: r.state_hashes[key]
        for pid, r in hash_records.items()
        if key in r.state_hashes and pid in allowed
    }


def majority_view(hashes: Mapping[bytes, str], *, round_index: int, me: bytes) -> SwarmView:
    """The majority hash of a round; ties are broken by the hash value so that every peer picks the same winner."""
    counts = Counter(hashes.values())
    if not counts:
        return SwarmView(round_index, None, [], 0)
    majority = max(counts, key=lambda h: (counts[h], h))
    donors = [pid for pid, h in hashes.items() if h == majority and pid != me]
    return SwarmView(round_index, majority, donors, len(hashes), votes=dict(counts))


def joining_round(
    hash_records: Mapping[bytes, HashRecord], *, live: Iterable[bytes], me: bytes
) -> int | None:
    """The round a newcomer joins at: the lower median of the newest round each live peer (other than us) published a
    state hash for, so that one record claiming a far-future round does not capture newcomers."""
    others = set(live) - {me}
    newest = sorted(
        max(int(rnd) for rnd in r.state_hashes)
        for pid, r in hash_records.items()
        if pid in others and r.state_hashes
    )
    return newest[(len(newest) - 1) // 2] if newest else None


def should_resync(view: SwarmView, my_hash: str) -> bool:
    """Our global state differs from the majority's and someone can give us theirs. A tie with our own hash settles
    the round only once every expected voter has voted: while one is still missing, the hash order must not hand
    the round to whoever published first (one liar and us, with the third voter's record late, is such a tie)."""
    if view.majority_hash in (None, my_hash) or not view.donors:
        return False
    return view.complete or view.votes.get(view.majority_hash, 0) > view.votes.get(my_hash, 0)


# ---- run identity (I5) --------------------------------------------------------------------------------------
def conflicting_settings(
    records: Mapping[bytes, SettingsRecord], *, me: bytes, fingerprint: str
) -> SettingsRecord | None:
    """The settings record that proves this run id trains with other settings than ours, or None. Only when no
    other peer of the run agrees with us: one record with another fingerprint (a typo, or a stranger's) must not make
    every newcomer of a healthy run exit; a peer whose settings differ from every live peer's must. A record whose
    settings do not hash to its fingerprint proves nothing and is ignored."""
    others = [r for key, r in records.items() if key != me and _hashes_to_fingerprint(r)]
    if not others or any(r.fingerprint == fingerprint for r in others):
        return None
    counts = Counter(r.fingerprint for r in others)
    majority = max(counts, key=lambda f: (counts[f], f))
    return next(r for r in others if r.fingerprint == majority)


def _hashes_to_fingerprint(record: SettingsRecord) -> bool:
    try:
        settings = json.loads(record.settings_json)
    except ValueError:
        return False
    return isinstance(settings, dict) and settings_fingerprint(settings) == record.fingerprint
