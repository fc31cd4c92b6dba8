"""Agreement (I1/I3): publish our hash after each round; a peer whose global parameters differ from the majority of
the round's live peers downloads a majority peer's state instead of training on a forked model."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from peer import coordination, rounds
from peer.config import SwarmConfig
from peer.network import SwarmNetwork
from peer.outer import AveragingResult
from peer.state import ReplicatedState


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

    def adopt_swarm_state_on_join(self) -> None:
        """I4: a newcomer (or a peer resuming behind the swarm) starts from the swarm's current state."""
        view = coordination.latest_view(self.network)
        if view is None or view.majority_hash is None or view.round_index < self.state.round:
            return
        if self.load_swarm_state(view.donors, min_round=view.round_index):
            self.log.info(f"joined the swarm at round {self.state.round}, inner step {self.state.inner_step}")
        else:
            self.log.warning("could not download the swarm's state; starting from our own")

    def check_round(self, result: AveragingResult | None) -> bool:
        """Publish our hash of the round just completed; if the majority of its peers holds another one, adopt their
        state. Returns True if we resynced."""
        round_index, params_hash = self.state.round, self.state.params_hash()
        self.network.publish_hash(round_index, params_hash)
        if result is not None:  # the group published (or is publishing) its hashes right now
            expected, timeout_s = result.group_size, self.swarm.matchmaking_s
        else:  # we failed; the others may still be finishing their all-reduce
            expected = len(self.network.live_peers())
            timeout_s = min(self.swarm.allreduce_timeout_s, 4 * self.swarm.matchmaking_s + 5)
        view = coordination.view_of_round(self.network, round_index, expected=expected, timeout_s=timeout_s)
        if not rounds.should_resync(view, params_hash):
            return False
        return self.resync(view, reason=f"our hash {params_hash[:10]} differs from the majority")

    def forked_view(self) -> rounds.SwarmView | None:
        """The swarm's view of our current round if the majority holds other global parameters than ours."""
        view = coordination.view_of_round(self.network, self.state.round, expected=1, timeout_s=0.0)
        return view if rounds.should_resync(view, self.state.params_hash()) else None

    def resync(self, view: rounds.SwarmView, *, reason: str) -> bool:
        self.log.warning(
            f"round {view.round_index}: {reason} {view.majority_hash[:10]} ({view.num_records} peers); "
            "downloading their state"
        )
        if not self.load_swarm_state(view.donors, min_round=view.round_index):
            self.log.warning(f"round {view.round_index}: resync failed; will retry")
            return False
        self.resyncs += 1
        self.network.publish_hash(self.state.round, self.state.params_hash())
        return True

    def load_swarm_state(self, donors: list[bytes], *, min_round: int) -> bool:
        """Replace our global state with a donor's (verified against its hash); True on success."""
        downloaded = self.network.download_state(donors)
        if downloaded is None:
            return False
        metadata, tensors = downloaded
        problem = self.state.check_donation(metadata, tensors, min_round=min_round)
        if problem is not None:
            self.log.warning(problem)
            return False
        self.state.adopt(metadata, tensors, inner_steps=self.inner_steps)
        self.state.outer.copy_to_(self.local_params)
        return True
