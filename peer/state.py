"""The state every peer of a round holds identically (global parameters, outer momentum, round), and its exchange.

What a newcomer or a resyncing peer downloads, and the checks a downloaded state must pass before it replaces ours.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from peer.config import OuterConfig
from peer.outer import OuterOptimizer, tensors_sha256

MAX_ROUND = 10**9
MAX_INNER_STEP = 10**9


class ReplicatedState:
    """The outer optimizer (fp32 global parameters and momentum) and this peer's position in the swarm's schedule.

    hivemind's thread reads it to serve donors while the loop trains, hence the lock around every change."""

    def __init__(self, params: Sequence[torch.Tensor], config: OuterConfig, *, fingerprint: str):
        self.outer = OuterOptimizer(params, config)
        self.fingerprint = fingerprint
        self.round = 0
        """Outer steps completed (the round being trained is round + 1 in metrics)."""
        self.inner_step = 0
        """Inner steps done in the current round."""
        self.averaging_in_background = False
        """An all-reduce of round `round` runs behind the next round's inner steps (--overlap)."""
        self.lock = threading.Lock()

    def params_hash(self) -> str:
        return self.outer.params_hash()

    def set_inner_step(self, step: int) -> None:
        with self.lock:
            self.inner_step = step

    def for_donation(self) -> tuple[dict, list[torch.Tensor]]:
        """What a newcomer or a resyncing peer downloads from us (runs on hivemind's thread)."""
        with self.lock:
            metadata = {
                "round": self.round,
                "state_sha256": self.outer.state_hash(),
                "inner_step": 0 if self.averaging_in_background else self.inner_step,
                "fingerprint": self.fingerprint,
                "params_sha256": self.outer.params_hash(),
            }
            return metadata, [t.clone() for t in self.outer.state_tensors()]

    def state_hash(self) -> str:
        """sha256 over the global parameters and the outer momentum: what must agree for the next step to agree."""
        return self.outer.state_hash()

    def check_donation(
        self, metadata: object, tensors: object, *, min_round: int, expected_state_hash
    ) -> str | None:
        """Why a downloaded state is not usable (None: it is). Everything a donor sends is checked before use: the
        metadata's types and bounds, the tensors' count, shapes and dtypes, and the hash of what arrived against the
        hash the majority of the swarm holds for that round (`expected_state_hash(round)`), not the donor's word."""
        if not isinstance(metadata, dict) or not isinstance(tensors, list):
            return "the donor sent a malformed state"
        round_index, inner_step = metadata.get("round"), metadata.get("inner_step")
        if metadata.get("fingerprint") != self.fingerprint:
            return f"the donor's state belongs to another run ({metadata.get('fingerprint')!r})"
        if (
            type(round_index) is not int
            or type(inner_step) is not int
            or not 0 <= inner_step <= MAX_INNER_STEP
        ):
            return "the donor's state has a malformed round or inner step"
        if not min_round <= round_index <= MAX_ROUND:
            return f"the donor's state is of round {round_index}, older than round {min_round}"
        expected = self.outer.state_tensors()
        if len(tensors) != len(expected) or any(
            not isinstance(t, torch.Tensor) or t.dtype != e.dtype or t.shape != e.shape
            for t, e in zip(tensors, expected, strict=False)
        ):
            return "the donor's state does not have this model's tensors"
        majority = expected_state_hash(round_index)
        if majority is None or tensors_sha256(tensors) != majority:
            return f"the donor's state of round {round_index} is not the one the swarm's majority holds; discarded"
        return None

    def adopt(self, metadata: dict, tensors: list[torch.Tensor], *, inner_steps: int) -> None:
        """Replace our global state and position with a checked donation."""
        with self.lock:
            self.outer.load_state_tensors_(tensors)
            self.round = metadata["round"]
            self.inner_step = min(metadata["inner_step"], inner_steps - 1)
