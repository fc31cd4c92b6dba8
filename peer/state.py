"""The state every peer of a round holds identically (global parameters, outer momentum, round), and its exchange.

What a newcomer or a resyncing peer downloads, and the checks a downloaded state must pass before it replaces ours.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from peer.config import OuterConfig
from peer.outer import OuterOptimizer, tensors_sha256


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
                "inner_step": 0 if self.averaging_in_background else self.inner_step,
                "fingerprint": self.fingerprint,
                "params_sha256": self.outer.params_hash(),
            }
            return metadata, [t.clone() for t in self.outer.state_tensors()]

    def check_donation(self, metadata: dict, tensors: list[torch.Tensor], *, min_round: int) -> str | None:
        """Why a downloaded state is not usable (None: it is)."""
        if metadata.get("fingerprint") != self.fingerprint or metadata.get("round", -1) < min_round:
            return f"donor state is not usable: {metadata}"
        if tensors_sha256(tensors[: len(self.outer.global_params)]) != metadata["params_sha256"]:
            return "downloaded state does not match its hash; discarded"
        return None

    def adopt(self, metadata: dict, tensors: list[torch.Tensor], *, inner_steps: int) -> None:
        """Replace our global state and position with a checked donation."""
        with self.lock:
            self.outer.load_state_tensors_(tensors)
            self.round = metadata["round"]
            self.inner_step = min(metadata["inner_step"], inner_steps - 1)
