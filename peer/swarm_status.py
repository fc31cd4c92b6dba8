"""What a monitor knows about a run: the records it has read from the DHT so far, and the status it serves (live
peers, the swarm's loss per round, hash agreement, totals, progress). Pure functions of records and time: no network.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from peer.records import HashRecord, ProgressRecord, RoundLoss, SummaryRecord

MAX_PEERS = 1024
"""Peers a monitor remembers (live or gone); beyond that the one seen longest ago is forgotten."""
MAX_ROUNDS = 4096
"""Rounds of loss and hash history a monitor keeps; beyond that the oldest are dropped."""
ROUND_SLACK = 16
"""A record about a round more than this far ahead of the live peers' median round is a lie or a clock error."""
HASH_RE = re.compile(r"[0-9a-f]{64}\Z")


@dataclass
class Observation:
    """One poll of the DHT: every valid record of the run, by the publishing peer's public key (the subkey)."""

    now: float
    """DHT time of the poll."""
    progress: dict[bytes, tuple[ProgressRecord, float]] = field(default_factory=dict)
    """Progress records and the DHT time each was published."""
    summaries: dict[bytes, SummaryRecord] = field(default_factory=dict)
    hashes: dict[bytes, HashRecord] = field(default_factory=dict)
    peer_ids: dict[bytes, str] = field(default_factory=dict)
    """The base58 peer id of each progress record's publisher (as in its metrics file)."""


@dataclass
class PeerSeen:
    peer_id: str
    progress: ProgressRecord | None = None
    last_seen: float = 0.0
    """DHT time of its latest progress record."""
    summary: SummaryRecord | None = None


class RunHistory:
    """Everything a monitor has learned about one run (one fingerprint), bounded in size."""

    def __init__(self, *, max_peers: int = MAX_PEERS, max_rounds: int = MAX_ROUNDS):
        self.max_peers, self.max_rounds = max_peers, max_rounds
        self.peers: dict[bytes, PeerSeen] = {}
        self.losses: dict[int, dict[bytes, RoundLoss]] = {}
        """round -> publisher -> that peer's loss and tokens in the round."""
        self.hashes: dict[int, dict[bytes, str]] = {}
        """round -> publisher -> its global-parameter hash after the round."""
        self.first_seen_at: dict[int, float] = {}
        """round -> DHT time at which the monitor first saw a peer complete it."""

    def observe(self, observation: Observation, *, stale_after_s: float) -> list[int]:
        """Merge one poll into the history; returns the rounds seen for the first time."""
        now = observation.now
        for key, (record, published_at) in observation.progress.items():
            peer = self._peer(key, observation.peer_ids.get(key, ""))
            if published_at >= peer.last_seen:
                peer.progress, peer.last_seen = record, published_at
        live_rounds = [
            p.progress.round for p in self.peers.values() if p.progress and now - p.last_seen <= stale_after_s
        ]
        horizon = _median(live_rounds) + ROUND_SLACK if live_rounds else None
        new_rounds = []
        for key, summary in observation.summaries.items():
            if horizon is not None and summary.round > horizon:
                continue
            peer = self._peer(key, summary.peer_id)
            peer.peer_id = summary.peer_id
            if peer.summary is None or summary.round >= peer.summary.round:
                peer.summary = summary
            for point in summary.recent:
                if point.round <= summary.round:
                    if point.round not in self.losses:
                        self.first_seen_at[point.round] = now
                        new_rounds.append(point.round)
                    self.losses.setdefault(point.round, {})[key] = point
        for key, record in observation.hashes.items():
            if key not in self.peers:
                continue  # hashes count only for peers we know from their progress or summary records
            for round_index, params_hash in _valid_hashes(record, horizon):
                self.hashes.setdefault(round_index, {})[key] = params_hash
        self._trim()
        return sorted(new_rounds)

    def _peer(self, key: bytes, peer_id: str) -> PeerSeen:
        if key not in self.peers:
            if len(self.peers) >= self.max_peers:
                oldest = min(self.peers, key=lambda k: self.peers[k].last_seen)
                del self.peers[oldest]
            self.peers[key] = PeerSeen(peer_id=peer_id)
        return self.peers[key]

    def _trim(self) -> None:
        for table in (self.losses, self.hashes):
            for round_index in sorted(table)[: max(0, len(table) - self.max_rounds)]:
                del table[round_index]
        for round_index in sorted(self.first_seen_at)[: max(0, len(self.first_seen_at) - self.max_rounds)]:
            del self.first_seen_at[round_index]

    def status(self, *, now: float, stale_after_s: float) -> dict:
        """The JSON the dashboard and /api/status serve (without the run's identity, which the monitor adds)."""
        live = {
            k: p
            for k, p in self.peers.items()
            if p.progress is not None and now - p.last_seen <= stale_after_s
        }
        summaries = [p.summary for p in self.peers.values() if p.summary is not None]
        return {
            "peers": [peer_row(p, now=now) for p in sorted(live.values(), key=lambda p: p.peer_id)],
            "rounds": merge_rounds(swarm_losses(self.losses), hash_agreement(self.hashes)),
            "totals": {
                "live_peers": len(live),
                "peers_seen": len(self.peers),
                "tokens": sum(s.tokens for s in summaries),
                "bytes_sent": sum(s.bytes_sent for s in summaries),
                "bytes_received": sum(s.bytes_received for s in summaries),
            },
            "progress": run_progress(
                [p.summary for p in live.values() if p.summary is not None] or summaries, self.first_seen_at
            ),
        }


def peer_row(peer: PeerSeen, *, now: float) -> dict:
    """One live peer as the dashboard's table shows it; round and counters are those of its metrics file."""
    summary, progress = peer.summary, peer.progress
    if summary is not None:
        reachability = summary.reachability
    else:
        reachability = "outgoing-only" if progress is not None and progress.client_mode else "unknown"
    return {
        "peer_id": peer.peer_id,
        "round": summary.round if summary else None,
        "training_round": progress.round + 1 if progress is not None and progress.round >= 0 else None,
        "inner_step": progress.inner_step if progress is not None else None,
        "tokens_per_s": summary.tokens_per_s if summary else (progress.tokens_per_s if progress else 0.0),
        "last_seen_s": max(0.0, now - peer.last_seen),
        "reachability": reachability,
        "failed_rounds": summary.failed_rounds if summary else 0,
        "resyncs": summary.resyncs if summary else 0,
        "loss": summary.loss if summary else None,
        "eval_loss": summary.eval_loss if summary else None,
        "tokens": summary.tokens if summary else 0,
        "bytes_sent": summary.bytes_sent if summary else 0,
        "bytes_received": summary.bytes_received if summary else 0,
        "group_size": summary.group_size if summary else None,
        "device": summary.device if summary else "",
        "last_hash": summary.last_hash if summary else None,
    }


def weighted_mean(pairs: list[tuple[float, int]]) -> float | None:
    """Mean of values weighted by tokens; a plain mean if no value has a weight; None without values."""
    if not pairs:
        return None
    total = sum(weight for _, weight in pairs)
    if total <= 0:
        return sum(value for value, _ in pairs) / len(pairs)
    return sum(value * weight for value, weight in pairs) / total


def swarm_losses(losses: dict[int, dict[bytes, RoundLoss]]) -> list[dict]:
    """Per round: the swarm's training and held-out loss, each peer's weighted by the tokens it processed."""
    rows = []
    for round_index in sorted(losses):
        points = losses[round_index].values()
        rows.append(
            {
                "round": round_index,
                "loss": weighted_mean([(p.loss, p.tokens) for p in points if p.loss is not None]),
                "eval_loss": weighted_mean(
                    [(p.eval_loss, p.tokens) for p in points if p.eval_loss is not None]
                ),
                "tokens": sum(p.tokens for p in points),
                "peers": len(points),
            }
        )
    return rows


def hash_agreement(hashes: dict[int, dict[bytes, str]]) -> list[dict]:
    """Per round: how many peers published a hash and how many of them hold the majority's."""
    rows = []
    for round_index in sorted(hashes):
        counts = Counter(hashes[round_index].values())
        majority = max(counts, key=lambda h: (counts[h], h))
        rows.append(
            {
                "round": round_index,
                "hash_peers": sum(counts.values()),
                "hash_agreeing": counts[majority],
                "distinct_hashes": len(counts),
                "majority_hash": majority,
            }
        )
    return rows


def merge_rounds(losses: list[dict], agreement: list[dict]) -> list[dict]:
    """One row per round with both the losses and the hash agreement (None where a side has no data)."""
    empty_loss = {"loss": None, "eval_loss": None, "tokens": 0, "peers": 0}
    empty_hash = {"hash_peers": 0, "hash_agreeing": 0, "distinct_hashes": 0, "majority_hash": None}
    by_round: dict[int, dict] = {}
    for row in losses:
        by_round[row["round"]] = {**row, **empty_hash}
    for row in agreement:
        by_round[row["round"]] = {
            "round": row["round"],
            **empty_loss,
            **by_round.get(row["round"], {}),
            **row,
        }
    return [by_round[r] for r in sorted(by_round)]


def run_progress(summaries: list[SummaryRecord], first_seen_at: dict[int, float]) -> dict:
    """How far the run is: its latest round, the target (the largest --max-rounds a peer reports; 0: none) and
    the pace the monitor measured."""
    latest = max((s.round for s in summaries), default=0)
    target = max((s.max_rounds for s in summaries), default=0)
    rounds_per_hour = None
    if first_seen_at:
        # a monitor that starts mid-run sees several rounds at once: the pace counts from the newest of those
        started = min(first_seen_at.values())
        base_round = max(r for r, t in first_seen_at.items() if t == started)
        last_round, last_seen = max(first_seen_at.items())
        if last_seen > started and last_round > base_round:
            rounds_per_hour = 3600.0 * (last_round - base_round) / (last_seen - started)
    return {
        "round": latest,
        "max_rounds": target,
        "fraction": min(1.0, latest / target) if target else None,
        "rounds_per_hour": rounds_per_hour,
        "eta_s": 3600.0 * (target - latest) / rounds_per_hour
        if target and rounds_per_hour and latest < target
        else None,
    }


def _valid_hashes(record: HashRecord, horizon: float | None) -> list[tuple[int, str]]:
    """The well-formed (round, hash) pairs of a hash record, at most its 16 newest rounds (it comes from a stranger)."""
    pairs = []
    for round_text, params_hash in list(record.hashes.items())[:256]:
        if not (round_text.isdigit() and len(round_text) <= 10 and HASH_RE.match(params_hash)):
            continue
        round_index = int(round_text)
        if horizon is None or round_index <= horizon:
            pairs.append((round_index, params_hash))
    return sorted(pairs)[-16:]


def _median(values: list[int]) -> float:
    ordered = sorted(values)
    return float(ordered[len(ordered) // 2])


def choose_fingerprint(fingerprints: list[str]) -> tuple[str | None, dict[str, int]]:
    """The fingerprint most live peers of a run id publish (ties broken by value, so every monitor picks the same)
    and how many publish each."""
    counts = Counter(fingerprints)
    if not counts:
        return None, {}
    return max(counts, key=lambda f: (counts[f], f)), dict(counts)


def settled_rounds(rounds: list[dict], *, after: int) -> list[dict]:
    """Rounds (rows of status()["rounds"]) past `after` that are settled: a later round has losses already, so
    every live peer has had time to publish this one's."""
    with_loss = [row for row in rounds if row["loss"] is not None]
    return [row for row in with_loss[:-1] if row["round"] > after]
