"""Agreement (I1/I3): publish our hash after each round; a peer whose global parameters differ from the majority of
the round's live peers downloads a majority peer's state instead of training on a forked model."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import torch

from peer import coordination, rounds
from peer.config import SwarmConfig
from peer.network import SwarmNetwork
from peer.outer import AveragingResult
from peer.state import ReplicatedState

RECENT_GROUPS = 16  # rounds whose group members we remember as voters
# state downloads a newcomer makes at most to start in a round whose group it can still join
JOIN_DOWNLOADS = 3


class Agreement:
    """Checks this peer's global parameters against the swarm's and repairs them by download."""

    def __init__(
        self,
        network: SwarmNetwork,
        state: ReplicatedState,
        *,
        local_params: Sequence[torch.Tensor],
        swarm: SwarmConfig,
        inner_steps: int,
        log: logging.LoggerAdapter,
    ):
        self.network, self.state, self.local_params = network, state, local_params
        self.swarm, self.inner_steps, self.log = swarm, inner_steps, log
        self.resyncs = 0
        self.group_voters: dict[int, frozenset[bytes]] = {}  # round -> record keys of its group's members
        # (round, monotonic deadline) of a round we averaged whose group has not yet shown us all its hashes
        self.unsettled: tuple[int, float] | None = None

    def adopt_swarm_state_on_join(self, *, overlap: bool = False, should_stop=lambda: False) -> None:
        """I4: a newcomer (or a peer resuming behind the swarm) starts from the swarm's current state. If the swarm
        is already averaging that state's round (not with --overlap, where peers train the next round meanwhile),
        it starts from the round's result: the round's group was counted without it. The same holds when the round
        ended while we downloaded its state (its last steps took less than our download): we would train its last
        steps for a group that formed without us, fail the round and download again anyway."""
        view = coordination.joining_view(self.network)
        if view is None or view.majority_hash is None or view.round_index < self.state.round:
            return
        for attempt in range(JOIN_DOWNLOADS):
            if not overlap and self.round_closing(view.round_index):
                self.log.info(
                    f"round {view.round_index + 1}: its peers are averaging it; waiting for its result"
                )
                later = coordination.wait_for_round_after(
                    self.network,
                    view.round_index,
                    timeout_s=self.swarm.matchmaking_s + self.swarm.allreduce_timeout_s,
                    should_stop=should_stop,
                )
                if later is not None and later.majority_hash is not None:
                    view = later
                elif attempt > 0:
                    break  # the result did not come in time: train from the round's state we hold
            if not self.load_swarm_state(view.donors, min_round=view.round_index, voters=None):
                if attempt > 0:
                    break  # we still hold the state of the round before
                self.log.warning("could not download the swarm's state; starting from our own")
                return
            if overlap or attempt + 1 == JOIN_DOWNLOADS or not self.round_closing(self.state.round):
                break
            self.log.info(
                f"round {self.state.round + 1} ended while we downloaded its state; taking its result"
            )
            view = dataclasses.replace(view, round_index=self.state.round)
        self.log.info(f"joined the swarm at round {self.state.round}, inner step {self.state.inner_step}")

    def round_closing(self, round_index: int) -> bool:
        return rounds.round_closing(
            self.network.live_peers(), me=self.network.my_key(), round_index=round_index
        )

    def voters_of(self, round_index: int) -> frozenset[bytes] | None:
        """Who may vote on a round: its group's members if we were in it, else the members of our recent groups
        (peers we averaged with, by their network identity); None (every live peer) only if we know nobody yet."""
        if round_index in self.group_voters:
            return self.group_voters[round_index]
        known = frozenset().union(*self.group_voters.values())
        return known or None

    def record_group(self, result: AveragingResult | None) -> None:
        """Remember who averaged the round just completed: they vote on it."""
        if result is not None and result.voters:
            self.group_voters[self.state.round] = result.voters | {self.network.my_key()}
            for old in sorted(self.group_voters)[:-RECENT_GROUPS]:
                del self.group_voters[old]

    def publish(self) -> None:
        self.network.publish_hash(self.state.round, self.state.params_hash(), self.state.state_hash())

    def check_round(self, result: AveragingResult | None) -> bool:
        """Publish our hashes of the round just completed. After a failed all-reduce, wait for the others' hashes
        and adopt the majority's state if they applied the round (without publishing ours first when theirs are
        in already); True if we resynced.

        After a successful one nothing is waited for: the group publishes its hashes within milliseconds of ours,
        and `forked_view` compares them while the next inner phase runs (every check, and before we contribute
        again). Waiting here instead cost every peer a DHT round trip per group member every round, for a fork
        that only a bug or a corrupted replica causes."""
        self.record_group(result)
        if result is not None:
            self.publish()
            self.unsettled = (self.state.round, time.monotonic() + self.swarm.matchmaking_s)
            return False
        round_index, state_hash = self.state.round, self.state.state_hash()
        voters = self.voters_of(round_index)
        # we failed; the others may still be finishing their all-reduce
        expected = len(self.network.live_peers()) - 1
        if voters is not None:
            expected = min(expected, len(voters) - 1)
        # we kept the previous global state: if the others applied the round, theirs is right and ours is not,
        # however the votes would tie (so we do not vote on it ourselves)

        def majority(timeout_s: float) -> rounds.SwarmView:
            return coordination.view_of_round(
                self.network,
                round_index,
                expected=expected,
                timeout_s=timeout_s,
                voters=voters,
                without_me=True,
            )

        # if they all published this round already (e.g. the swarm moved past it without us, as happens to a
        # newcomer) and not our state, we take theirs without ever voting for ours: a peer that applied the round
        # alone would see our stale vote tie with its own, and the hash order hand the round to the stale one
        view = majority(timeout_s=0.0)
        if not (view.complete and rounds.should_resync(view, state_hash)):
            self.publish()
            view = majority(timeout_s=min(self.swarm.allreduce_timeout_s, 4 * self.swarm.matchmaking_s + 5))
            if not rounds.should_resync(view, state_hash):
                return False
        return self.resync(
            view, reason=f"our state {state_hash[:10]} differs from the majority's", without_me=True
        )

    def forked_view(self, *, settle: bool = False) -> rounds.SwarmView | None:
        """The swarm's view of our current round if its majority holds another global state than ours.

        Looks without waiting, except with `settle`: before we contribute again, the group of the round we averaged
        gets until `matchmaking_s` after our outer step to publish its hashes (normally long past by then)."""
        round_index = self.state.round
        voters = self.voters_of(round_index)
        unsettled = not self.settled
        # our own group's hashes: a view is complete only once every member's is in, so that a tie between us and
        # one other member (the third one's record late) does not hand the round to the larger hash
        expected = len(voters) if round_index in self.group_voters else 1
        timeout_s = max(0.0, self.unsettled[1] - time.monotonic()) if settle and unsettled else 0.0
        view = coordination.view_of_round(
            self.network, round_index, expected=expected, timeout_s=timeout_s, voters=voters
        )
        if unsettled and (view.complete or time.monotonic() >= self.unsettled[1]):
            self.unsettled = None
        return view if rounds.should_resync(view, self.state.state_hash()) else None

    @property
    def settled(self) -> bool:
        """Whether every hash of the round we averaged last has been compared (or stopped being waited for)."""
        return self.unsettled is None or self.unsettled[0] != self.state.round

    def resync(self, view: rounds.SwarmView, *, reason: str, without_me: bool = False) -> bool:
        self.log.warning(
            f"round {view.round_index}: {reason} {view.majority_hash[:10]} ({view.num_records} voters); "
            "downloading their state"
        )
        voters = self.voters_of(view.round_index)
        if not self.load_swarm_state(
            view.donors, min_round=view.round_index, voters=voters, without_me=without_me
        ):
            self.log.warning(f"round {view.round_index}: resync failed; will retry")
            return False
        self.resyncs += 1
        self.publish()
        return True

    def load_swarm_state(
        self,
        donors: list[bytes],
        *,
        min_round: int,
        voters: frozenset[bytes] | None,
        without_me: bool = False,
    ) -> bool:
        """Replace our global state with a donor's, if it is the state the majority of the voters holds for the
        donor's round; True on success."""

        def majority_hash(round_index: int) -> str | None:
            view = coordination.view_of_round(
                self.network, round_index, timeout_s=0.0, voters=voters, without_me=without_me
            )
            return view.majority_hash

        def problem(metadata: object, tensors: object) -> str | None:
            return self.state.check_donation(
                metadata, tensors, min_round=min_round, expected_state_hash=majority_hash
            )

        downloaded = self.network.download_state(donors, check=problem)  # a refused state: the next donor's
        if downloaded is None:
            return False
        metadata, tensors = downloaded
        self.state.adopt(metadata, tensors, inner_steps=self.inner_steps)
        self.state.outer.copy_to_(self.local_params)
        return True
