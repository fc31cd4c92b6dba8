"""Global parameters, pseudo-gradients, the exact weighted average and the replicated Nesterov outer step.

Knows nothing about networking: the loop hands it the average the swarm computed (peer/network.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from peer.config import OuterConfig


def tensors_sha256(tensors: Sequence[torch.Tensor]) -> str:
    """sha256 over the fp32 bytes of the tensors, in order."""
    digest = hashlib.sha256()
    _feed(digest, tensors)
    return digest.hexdigest()


def _feed(digest, tensors: Sequence[torch.Tensor]) -> None:
    for tensor in tensors:  # the array's own buffer: no copy of the bytes (hashlib releases the GIL on it)
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1))


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def average_contributions(
    parts: Sequence[torch.Tensor], weights: Sequence[float], order_keys: Sequence[bytes]
) -> torch.Tensor:
    """Weighted mean of same-shape fp32 tensors, summed in a canonical order.

    Floating-point sums depend on order; sorting by a key derived from each contribution (not from
    arrival time or peer identity) makes the result the same wherever it is computed: on a reducer
    of a networked all-reduce (one shard at a time) or in the in-process simulation (whole tensors).
    """
    assert len(parts) == len(weights) == len(order_keys) > 0
    total_weight = float(sum(weights))
    order = sorted(range(len(parts)), key=lambda i: (order_keys[i], i))
    result = parts[order[0]].float() * (weights[order[0]] / total_weight)
    for i in order[1:]:
        result += parts[i].float() * (weights[i] / total_weight)  # multiply then add: no fused rounding
    return result


def contribution_key(pseudo_grads: Sequence[torch.Tensor]) -> bytes:
    """The order key of one peer's pseudo-gradient in average_contributions."""
    return bytes.fromhex(tensors_sha256(pseudo_grads))


@dataclass
class AveragingResult:
    """What one round's all-reduce gave this peer."""

    averaged: list[torch.Tensor]
    """The token-weighted mean pseudo-gradient, identical on every peer of the group."""
    group_size: int
    """Peers whose contributions were averaged, this one included."""
    tokens: int = 0
    """Tokens behind the average: the whole group's in the simulation, this peer's own in a networked round
    (hivemind does not report the group's total weight)."""
    info: dict = field(default_factory=dict)
    """Transport details (bytes sent and received, timings) for the metrics."""
    voters: frozenset[bytes] = frozenset()
    """The record-signing keys of the group's members (from their gathered metadata): only they vote on whether
    this round's result is the swarm's (empty: unknown, e.g. in the simulation)."""


class OuterOptimizer:
    """The fp32 global parameters and the SGD-with-Nesterov-momentum state that every peer replicates."""

    def __init__(self, params: Sequence[torch.Tensor], config: OuterConfig):
        self.config = config
        self.global_params = [p.detach().to("cpu", torch.float32).clone() for p in params]
        self.momentum = [torch.zeros_like(p) for p in self.global_params]
        # the hashes are read several times a round (agreement, donors, metrics): each read would hash every byte
        # again, seconds per round for a 150M model, so they are kept until the state changes (`changed`)
        self._version = 0
        self._hashes: tuple[int, str, str] | None = None

    @torch.no_grad()
    def pseudo_gradient(self, local_params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Delta = global - local: points downhill like a gradient."""
        return [
            g - p.detach().to("cpu", torch.float32)
            for g, p in zip(self.global_params, local_params, strict=True)
        ]

    @torch.no_grad()
    def step_(self, averaged_pseudo_grads: Sequence[torch.Tensor]) -> None:
        """SGD with Nesterov momentum, written out so every peer does exactly the same float operations:
        buf = m * buf + g;  theta -= lr * (g + m * buf)."""
        lr, momentum = self.config.lr, self.config.momentum
        try:
            for theta, buf, grad in zip(
                self.global_params, self.momentum, averaged_pseudo_grads, strict=True
            ):
                buf.mul_(momentum).add_(grad)
                update = grad + buf * momentum
                theta.sub_(update * lr)
        finally:
            self.changed()

    @torch.no_grad()
    def rebase_(self, local_params: Sequence[torch.Tensor], snapshot: Sequence[torch.Tensor]) -> None:
        """The overlapped outer step's local update: local <- theta + (local - snapshot).

        `snapshot` holds the local parameters whose pseudo-gradient was just averaged; what the peer learned
        since then is carried over onto the new global parameters. With no progress (local == snapshot) the
        difference is exactly zero, so this gives exactly `copy_to_`: the non-overlapped update."""
        for p, g, s in zip(local_params, self.global_params, snapshot, strict=True):
            progress = p.detach().to("cpu", torch.float32) - s.to("cpu", torch.float32)
            p.copy_((g + progress).to(p.device, p.dtype))

    @torch.no_grad()
    def copy_to_(self, local_params: Sequence[torch.Tensor]) -> None:
        """Start the next round from the global parameters."""
        for p, g in zip(local_params, self.global_params, strict=True):
            p.copy_(g.to(p.device, p.dtype))

    def changed(self) -> None:
        """Forget the hashes: the global parameters or the momentum were modified. Called once a change is complete,
        so that a hash computed while the tensors were being written is never kept (see `hashes`)."""
        self._version += 1

    def hashes(self) -> tuple[str, str]:
        """(sha256 of the global parameters, sha256 of the global parameters then the momentum), in one pass over
        the parameters; computed once per change of the state."""
        memo, version = self._hashes, self._version
        if memo is not None and memo[0] == version:
            return memo[1], memo[2]
        params = hashlib.sha256()
        _feed(params, self.global_params)
        state = params.copy()  # the state hash continues the parameters' one: the same as hashing them again
        _feed(state, self.momentum)
        result = params.hexdigest(), state.hexdigest()
        if self._version == version:  # nothing changed the state while we hashed it
            self._hashes = (version, *result)
        return result

    def params_hash(self) -> str:
        return self.hashes()[0]

    def state_hash(self) -> str:
        return self.hashes()[1]

    def state_tensors(self) -> list[torch.Tensor]:
        """Everything needed for bit-identical continuation: global params, then momentum buffers."""
        return [*self.global_params, *self.momentum]

    @torch.no_grad()
    def load_state_tensors_(self, tensors: Sequence[torch.Tensor]) -> None:
        num = len(self.global_params)
        if len(tensors) != 2 * num:
            raise ValueError(f"state has {len(tensors)} tensors, expected {2 * num}")
        try:
            for dst, src in zip(self.global_params + self.momentum, tensors, strict=True):
                if dst.shape != src.shape:
                    raise ValueError(
                        f"state tensor shape {tuple(src.shape)} does not match {tuple(dst.shape)}"
                    )
                dst.copy_(src.to(torch.float32))
        finally:  # also after a partial copy
            self.changed()
