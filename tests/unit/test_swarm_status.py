"""The monitor's aggregation: live peers, token-weighted losses, hash agreement, totals, bounds against liars."""

from __future__ import annotations

import pytest

from peer.records import HashRecord, ProgressRecord, RoundLoss, SummaryRecord
from peer.swarm_status import (
    Observation,
    RunHistory,
    choose_fingerprint,
    hash_agreement,
    run_progress,
    settled_rounds,
    swarm_losses,
    weighted_mean,
)

STALE_S = 10.0


def progress(round_index: int, *, client_mode: bool = False) -> ProgressRecord:
    return ProgressRecord(
        peer_id=b"\x00\x24" + bytes(34),
        round=round_index,
        inner_step=3,
        tokens=100,
        done=False,
        averaging=-1,
        scheduled_time=0.0,
        tokens_per_s=50.0,
        eta=0.0,
        client_mode=client_mode,
    )


def summary(
    peer: str, round_index: int, points: list[tuple[int, float, float | None, int]], **fields
) -> SummaryRecord:
    values = {
        "peer_id": peer,
        "round": round_index,
        "loss": points[-1][1],
        "eval_loss": None,
        "tokens": sum(p[3] for p in points),
        "tokens_per_s": 100.0,
        "bytes_sent": 1000,
        "bytes_received": 2000,
        "group_size": 2,
        "device": "cpu",
        "reachability": "direct",
        "last_hash": "a" * 64,
        "failed_rounds": 0,
        "resyncs": 0,
        "max_rounds": 0,
        "recent": [RoundLoss(round=r, loss=loss, eval_loss=ev, tokens=t) for r, loss, ev, t in points],
    }
    return SummaryRecord(**{**values, **fields})


def observation(now: float, peers: dict[bytes, dict]) -> Observation:
    obs = Observation(now=now)
    for key, parts in peers.items():
        if "progress" in parts:
            obs.progress[key] = (parts["progress"], parts.get("published_at", now))
            obs.peer_ids[key] = parts.get("peer_id", "QmFromProgress")
        if "summary" in parts:
            obs.summaries[key] = parts["summary"]
        if "hashes" in parts:
            obs.hashes[key] = HashRecord(peer_id=b"x", hashes=parts["hashes"])
    return obs


def test_weighted_mean():
    assert weighted_mean([(4.0, 100), (6.0, 300)]) == 5.5
    assert weighted_mean([(4.0, 0), (6.0, 0)]) == 5.0  # no weights: a plain mean
    assert weighted_mean([]) is None


def test_swarm_loss_is_token_weighted_per_round():
    losses = {
        1: {
            b"a": RoundLoss(round=1, loss=4.0, eval_loss=3.0, tokens=100),
            b"b": RoundLoss(round=1, loss=6.0, eval_loss=None, tokens=300),
        },
        2: {b"a": RoundLoss(round=2, loss=3.0, eval_loss=None, tokens=100)},
    }
    rows = swarm_losses(losses)
    assert rows == [
        {"round": 1, "loss": 5.5, "eval_loss": 3.0, "tokens": 400, "peers": 2},
        {"round": 2, "loss": 3.0, "eval_loss": None, "tokens": 100, "peers": 1},
    ]


def test_hash_agreement_counts_the_majority():
    rows = hash_agreement({5: {b"a": "h1", b"b": "h1", b"c": "h2"}, 6: {b"a": "h3"}})
    assert [(r["round"], r["hash_peers"], r["hash_agreeing"], r["distinct_hashes"]) for r in rows] == [
        (5, 3, 2, 2),
        (6, 1, 1, 1),
    ]
    assert rows[0]["majority_hash"] == "h1"


def test_status_lists_live_peers_with_their_summaries():
    history = RunHistory()
    now = 1000.0
    history.observe(
        observation(
            now,
            {
                b"k1": {
                    "progress": progress(2),
                    "summary": summary(
                        "QmPeerA1",
                        2,
                        [(1, 5.0, None, 100), (2, 4.0, 3.5, 100)],
                        failed_rounds=1,
                        eval_loss=3.5,
                    ),
                    "hashes": {"1": "1" * 64, "2": "2" * 64},
                },
                b"k2": {"progress": progress(0, client_mode=True), "peer_id": "QmPeerB2"},
                b"k3": {
                    "progress": progress(2),
                    "published_at": now - 30,
                    "summary": summary("QmGone", 1, [(1, 7.0, None, 300)]),
                },
            },
        ),
        stale_after_s=STALE_S,
    )
    status = history.status(now=now + 1, stale_after_s=STALE_S)
    peers = {p["peer_id"]: p for p in status["peers"]}
    assert set(peers) == {"QmPeerA1", "QmPeerB2"}  # QmGone's progress record is stale
    one = peers["QmPeerA1"]
    assert (one["round"], one["training_round"], one["failed_rounds"], one["eval_loss"]) == (2, 3, 1, 3.5)
    assert one["last_seen_s"] == 1.0 and one["reachability"] == "direct"
    two = peers["QmPeerB2"]
    assert two["round"] is None and two["reachability"] == "outgoing-only" and two["tokens_per_s"] == 50.0
    # the departed peer's work still counts in the totals and the losses
    assert status["totals"] == {
        "live_peers": 2,
        "peers_seen": 3,
        "tokens": 500,
        "bytes_sent": 2000,
        "bytes_received": 4000,
    }
    rounds = {r["round"]: r for r in status["rounds"]}
    assert rounds[1]["loss"] == pytest.approx((5.0 * 100 + 7.0 * 300) / 400)
    assert rounds[2]["hash_peers"] == 1 and rounds[2]["eval_loss"] == 3.5


def test_history_accumulates_rounds_across_polls_and_keeps_the_newest_summary():
    history = RunHistory()
    history.observe(
        observation(
            10.0, {b"k": {"progress": progress(1), "summary": summary("QmA", 1, [(1, 5.0, None, 10)])}}
        ),
        stale_after_s=STALE_S,
    )
    # two rounds later (the poll in between was missed): the summary's short history still covers round 2
    new = history.observe(
        observation(
            20.0,
            {
                b"k": {
                    "progress": progress(3),
                    "summary": summary(
                        "QmA", 3, [(1, 5.0, None, 10), (2, 4.0, None, 10), (3, 3.0, None, 10)]
                    ),
                }
            },
        ),
        stale_after_s=STALE_S,
    )
    assert new == [2, 3]
    # an older summary arriving late (a slow DHT replica) does not replace the newer one
    history.observe(
        observation(
            21.0, {b"k": {"progress": progress(3), "summary": summary("QmA", 1, [(1, 5.0, None, 10)])}}
        ),
        stale_after_s=STALE_S,
    )
    status = history.status(now=21.0, stale_after_s=STALE_S)
    assert [r["round"] for r in status["rounds"]] == [1, 2, 3]
    assert status["peers"][0]["round"] == 3


def test_records_far_ahead_of_the_swarm_are_ignored():
    history = RunHistory()
    history.observe(
        observation(
            5.0,
            {
                b"honest": {
                    "progress": progress(10),
                    "summary": summary("QmHonest", 10, [(10, 4.0, None, 10)]),
                },
                b"liar": {
                    "progress": progress(10),
                    "summary": summary("QmLiar", 10**8, [(10**8, 0.1, None, 10**9)]),
                    # (malformed round keys or hashes do not parse at all: tests/unit/test_records.py)
                    "hashes": {str(10**8): "b" * 64, "9": "9" * 64},
                },
            },
        ),
        stale_after_s=STALE_S,
    )
    assert set(history.losses) == {10}
    assert set(history.hashes) == {9}


def test_history_is_bounded():
    history = RunHistory(max_peers=3, max_rounds=5)
    for i in range(6):
        history.observe(
            observation(
                float(i),
                {
                    bytes([i]): {
                        "progress": progress(i),
                        "summary": summary("QmP", i, [(i, 1.0, None, 1)]),
                        "hashes": {str(i): "a" * 64},
                    }
                },
            ),
            stale_after_s=100.0,
        )
    assert len(history.peers) == 3 and set(history.peers) == {b"\x03", b"\x04", b"\x05"}
    history = RunHistory(max_rounds=5)
    for i in range(12):
        history.observe(
            observation(
                float(i), {b"k": {"progress": progress(i), "summary": summary("QmP", i, [(i, 1.0, None, 1)])}}
            ),
            stale_after_s=100.0,
        )
    assert sorted(history.losses) == [7, 8, 9, 10, 11] and len(history.first_seen_at) == 5


def test_run_progress_measures_the_pace_from_the_rounds_it_saw_complete():
    summaries = [
        summary("QmA", 30, [(30, 1.0, None, 1)], max_rounds=100),
        summary("QmB", 29, [(29, 1.0, None, 1)]),
    ]
    # the monitor started at t=0 and saw rounds 1-8 at once, then one round every 36 s
    first_seen = {r: 0.0 for r in range(1, 9)} | {8 + i: 36.0 * i for i in range(1, 23)}
    progress_row = run_progress(summaries, first_seen)
    assert progress_row["round"] == 30 and progress_row["max_rounds"] == 100
    assert progress_row["fraction"] == 0.3
    assert progress_row["rounds_per_hour"] == pytest.approx(100.0)
    assert progress_row["eta_s"] == pytest.approx(70 * 36.0)
    assert run_progress([], {})["fraction"] is None


def test_choose_fingerprint_and_settled_rounds():
    assert choose_fingerprint(["b", "a", "b"]) == ("b", {"b": 2, "a": 1})
    assert choose_fingerprint(["b", "a"])[0] == "b"  # a tie is broken the same way by every monitor
    assert choose_fingerprint([]) == (None, {})
    rows = [{"round": r, "loss": 1.0} for r in (1, 2, 3)] + [{"round": 4, "loss": None}]
    assert [r["round"] for r in settled_rounds(rows, after=0)] == [1, 2]
    assert [r["round"] for r in settled_rounds(rows, after=2)] == []
