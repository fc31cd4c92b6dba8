"""What the training loop needs from the swarm, as one interface: records, averaging, state download, swarm time.

`peer.swarm.Swarm` implements it with hivemind; tests implement it in memory (tests/unit/fake_network.py). No
hivemind type crosses this boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from peer.outer import AveragingResult
from peer.records import HashRecord, ProgressRecord, SummaryRecord

StateProvider = Callable[[], tuple[dict, list[torch.Tensor]]]
"""Returns (metadata, tensors) of this peer's global state, for a peer that downloads it from us."""
DonationCheck = Callable[[object, object], "str | None"]
"""check(metadata, tensors): why a downloaded state is not usable (peer/state.py check_donation), or None."""


class ScheduledAveraging(Protocol):
    """A round's all-reduce whose matchmaking has started; it runs once triggered with the pseudo-gradient."""

    round_index: int
    scheduled_time: float
    how: str
    """own (this peer chose the time), adopted (another peer of the round did), or after-inner (scheduled once
    the inner phase was over)."""
    lead_s: float
    """How long before the group time matchmaking started."""

    def cancel(self) -> None: ...


@dataclass
class AveragingAttempt:
    """How one all-reduce went for this peer."""

    result: AveragingResult | None
    """The group's average (None: the all-reduce failed or was stopped)."""
    began_transfer: bool = True
    """Data started moving before it failed: others depended on us, so this can not be a round of one."""


class SwarmNetwork(Protocol):
    """This peer's membership in the swarm."""

    peer_id: str
    """This peer's id as printed in logs and metrics."""
    short_id: str
    reachability: str
    """How other peers reach this one: direct, relayed, outgoing-only or unknown (peer/reachability.py)."""

    def time(self) -> float:
        """The swarm's clock (DHT time) used in every record."""
        ...

    def visible_maddrs(self) -> list[str]: ...

    def my_key(self) -> bytes:
        """The key of this peer's own records in the dicts below."""
        ...

    def report_progress(
        self,
        *,
        round_index: int,
        inner_step: int,
        tokens: int,
        done: bool,
        tokens_per_s: float,
        eta: float,
        now: bool = False,
    ) -> None:
        """Update this peer's progress record (published in the background; at once if `now`)."""
        ...

    def my_progress(self) -> ProgressRecord: ...

    def live_peers(self) -> dict[bytes, ProgressRecord]:
        """Progress records of every peer that published recently, this one included."""
        ...

    def publish_hash(self, round_index: int, params_sha256: str, state_sha256: str) -> None:
        """Publish this peer's hashes of a round: of the global parameters (I1) and of parameters and momentum."""
        ...

    def hash_records(self) -> dict[bytes, HashRecord]:
        """Every live hash record, by the key that signed it (one key, one vote)."""
        ...

    def publish_summary(self, summary: SummaryRecord) -> None:
        """Publish this peer's summary of its latest round for monitors (peer/monitor.py), without waiting."""
        ...

    def schedule_averaging(
        self,
        round_index: int,
        *,
        scheduled_time: float,
        order_key: bytes,
        how: str,
        value_bound: float,
        expected_peers: int = 0,
    ) -> ScheduledAveraging:
        """Start matchmaking for a round's all-reduce for the given group time. `value_bound` (peer/robust.py): this
        peer clamps the contributions it reduces to it and checks the averaged parts it receives against it.
        `expected_peers`: the round's live peers, this one included; a group that has them all starts at once
        instead of at the group time (0: unknown, wait for the group time)."""
        ...

    def run_averaging(
        self,
        scheduled: ScheduledAveraging,
        pseudo_grads: list[torch.Tensor],
        *,
        tokens: int,
        should_stop: Callable[[], bool],
        during_allreduce: Callable[[], None] | None = None,
    ) -> AveragingAttempt:
        """Trigger a scheduled all-reduce with our pseudo-gradient (weighted by tokens) and wait for it."""
        ...

    def mark_averaging(self, round_index: int) -> None:
        """Say in our progress record which round's all-reduce we are about to join (-1: none), so that peers
        still training that round count us in (a scheduled group time is published by schedule_averaging)."""
        ...

    def download_state(
        self, donors: list[bytes], *, check: DonationCheck
    ) -> tuple[dict, list[torch.Tensor]] | None:
        """(metadata, tensors) from the first donor (each tried once, in the given order) that sends a complete state
        that passes `check`; None if none did."""
        ...

    def shutdown(self) -> None: ...


NetworkFactory = Callable[..., SwarmNetwork]
"""Builds the network: factory(config, settings=, fingerprint=, averaged_tensors=, state_provider=, run_settings=)."""
