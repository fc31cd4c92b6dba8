"""An in-memory SwarmNetwork for driving the training loop without hivemind (tests/unit/test_train.py).

The test plays the rest of the swarm: it sets other peers' progress and hash records, what each round's all-reduce
returns and which state a donor serves; the fake records what the peer asked of the network."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from peer.network import AveragingAttempt
from peer.outer import AveragingResult
from peer.records import HashRecord, ProgressRecord

ME = b"me"


@dataclass
class FakeScheduled:
    round_index: int
    scheduled_time: float
    how: str
    lead_s: float
    steps_done: int
    """Inner steps of the round this peer had done when matchmaking started."""
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


def alone(round_index: int, pseudo_grads: list[torch.Tensor], tokens: int) -> AveragingAttempt:
    """The default all-reduce: a group of one returns our own pseudo-gradient."""
    return AveragingAttempt(
        AveragingResult(averaged=[g.clone() for g in pseudo_grads], group_size=1, tokens=tokens)
    )


@dataclass
class FakeSwarm:
    """The rest of the swarm, as the test scripts it."""

    companions: int = 0
    """Other live peers that are always in our round with their inner steps done (ids c0, c1, ...)."""
    other_progress: dict[bytes, ProgressRecord] = field(default_factory=dict)
    other_hashes: dict[bytes, HashRecord] = field(default_factory=dict)
    allreduce: Callable[[int, list[torch.Tensor], int], AveragingAttempt] = alone
    """(round index, our pseudo-gradient, our tokens) -> what the all-reduce gives us."""
    donor_state: tuple[dict, list[torch.Tensor]] | None = None
    on_download: Callable[[], None] | None = None
    """Runs after each state download: the swarm moving on while the peer was downloading."""
    # what the peer did
    contributions: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    results: dict[int, AveragingResult | None] = field(default_factory=dict)
    scheduled: list[FakeScheduled] = field(default_factory=list)
    published_hashes: dict[int, str] = field(default_factory=dict)
    state_votes: list[tuple[int, str]] = field(default_factory=list)
    """Every (round, state hash) published, in order (a round's vote is its last)."""
    published_summaries: list = field(default_factory=list)
    downloads: int = 0
    shut_down: bool = False
    published_run_settings: dict | None = None

    def factory(
        self, config, *, settings, fingerprint, averaged_tensors, state_provider, run_settings=None
    ) -> FakeNetwork:
        self.published_run_settings = run_settings
        return FakeNetwork(self, state_provider=state_provider)


class FakeNetwork:
    """Implements peer.network.SwarmNetwork in memory."""

    peer_id = "FakePeer0001"
    short_id = "eer0001"
    reachability = "direct"

    def __init__(self, swarm: FakeSwarm, *, state_provider):
        self.swarm, self.state_provider = swarm, state_provider
        self.lock = threading.Lock()  # the background all-reduce (--overlap) runs on another thread
        self.progress = ProgressRecord(
            peer_id=ME,
            round=-1,
            inner_step=0,
            tokens=0,
            done=False,
            averaging=-1,
            scheduled_time=0.0,
            tokens_per_s=0.0,
            eta=self.time(),
            client_mode=False,
        )

    def time(self) -> float:
        return time.time()

    def visible_maddrs(self) -> list[str]:
        return ["/ip4/127.0.0.1/tcp/1/p2p/FakePeer0001"]

    def my_key(self) -> bytes:
        return ME

    def report_progress(self, *, round_index, inner_step, tokens, done, tokens_per_s, eta, now=False) -> None:
        with self.lock:
            self.progress = self.progress.copy(
                update=dict(
                    round=round_index,
                    inner_step=inner_step,
                    tokens=tokens,
                    done=done,
                    tokens_per_s=tokens_per_s,
                    eta=eta,
                )
            )

    def my_progress(self) -> ProgressRecord:
        return self.progress

    def live_peers(self) -> dict[bytes, ProgressRecord]:
        mine = self.progress
        companions = {
            f"c{i}".encode(): mine.copy(update=dict(peer_id=f"c{i}".encode(), done=True, eta=0.0))
            for i in range(self.swarm.companions)
        }
        return {**self.swarm.other_progress, **companions, ME: mine}

    def mark_averaging(self, round_index: int, scheduled_time: float = 0.0) -> None:
        with self.lock:
            self.progress = self.progress.copy(
                update=dict(averaging=round_index, scheduled_time=scheduled_time)
            )

    def publish_hash(self, round_index: int, params_sha256: str, state_sha256: str) -> None:
        self.swarm.published_hashes[round_index] = params_sha256
        self.swarm.state_votes.append((round_index, state_sha256))

    def publish_summary(self, summary) -> None:
        self.swarm.published_summaries.append(summary)

    def hash_records(self) -> dict[bytes, HashRecord]:
        ours = {str(r): h for r, h in self.swarm.published_hashes.items()}
        our_states = {str(r): h for r, h in self.swarm.state_votes}  # the last per round

        def holding_ours(key: bytes) -> HashRecord:
            return HashRecord(peer_id=key, hashes=ours, state_hashes=our_states)

        # companions hold what we hold unless the test gave them records of their own
        companions = {f"c{i}".encode(): holding_ours(f"c{i}".encode()) for i in range(self.swarm.companions)}
        return {**companions, **self.swarm.other_hashes, ME: holding_ours(ME)}

    def schedule_averaging(
        self,
        round_index: int,
        *,
        scheduled_time: float,
        order_key: bytes,
        how: str,
        value_bound: float,
        expected_peers: int = 0,
    ):
        scheduled = FakeScheduled(
            round_index,
            scheduled_time,
            how,
            lead_s=scheduled_time - self.time(),
            steps_done=self.progress.inner_step,
        )
        self.swarm.scheduled.append(scheduled)
        self.mark_averaging(round_index, scheduled_time)
        return scheduled

    def run_averaging(self, scheduled, pseudo_grads, *, tokens, should_stop, during_allreduce=None):
        assert not scheduled.cancelled, "a cancelled all-reduce was triggered"
        self.swarm.contributions[scheduled.round_index] = [g.clone() for g in pseudo_grads]
        attempt = self.swarm.allreduce(scheduled.round_index, pseudo_grads, tokens)
        self.swarm.results[scheduled.round_index] = attempt.result
        return attempt

    def download_state(self, donors: list[bytes], *, check):
        self.swarm.downloads += 1
        donated = self.swarm.donor_state
        if self.swarm.on_download is not None:
            self.swarm.on_download()
        return None if donated is None or check(*donated) is not None else donated

    def shutdown(self) -> None:
        self.swarm.shut_down = True
