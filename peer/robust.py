"""Bounds every peer computes the same way, so that no single peer can move the average by more than a bounded amount.

A pseudo-gradient is the sum of H AdamW steps, and an AdamW step moves each value by at most a few learning rates
(Adam's normalized update) plus weight decay. So every value of an honest contribution lies within a bound that each
peer computes identically from the run's settings and the global parameters: reducers clamp contributions to it and
every receiver checks the averaged parts against it (I8). That bound is loose (it must hold for any data), so a
reducer also scales each contribution down to NORM_CLIP_FACTOR x the group's lower-median norm for that part: honest
peers of one run have norms within about 2x of each other, a contribution far above theirs is an attack.
Honest contributions are inside both bounds, so they pass bit for bit unchanged and peers agree with the simulation,
which never clamps.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from peer.config import MAX_STEP_TOKENS, RunConfig
from peer.outer import average_contributions

# |m_hat| / sqrt(v_hat) of Adam with beta1 = 0.9, beta2 = 0.95 stays below (1 - b1) / sqrt(1 - b2) / (1 - b1 / sqrt(b2))
# ~ 5.8 however the gradients behave; twice that leaves room for bias correction and eps.
ADAM_UPDATE_BOUND = 12.0
# a peer's weight (its tokens) counts up to this many times the median weight of the group
WEIGHT_CAP_FACTOR = 4.0
# a contribution's L2 norm (per part) counts up to this many times the group's lower-median norm. Honest peers differ
# by up to 2.1x (bench_attacks' five shards, round 6 of 6, per tensor) and must pass unchanged, so that the networked
# run stays the simulation; one that takes several times more inner steps than the others (--round-tokens, a much
# faster GPU) may be scaled down, its direction kept
NORM_CLIP_FACTOR = 3.0
# decoding a lossy codec (fp16, 8-bit blockwise) may overshoot a value slightly
RECEIVED_VALUE_SLACK = 1.05
# a reducer that returned an averaged part no honest reducer can produce is banned from our groups this long
BAN_S = 600.0
# peer ids a group member's ban list may name (read from its matchmaking metadata; the rest are ignored)
MAX_BANS_GATHERED = 32
MAX_PEER_ID_BYTES = 64


def max_inner_steps(config: RunConfig) -> int:
    """The most inner steps an honest peer takes in a round: H, or with --round-tokens the budget in steps of one
    sequence (a peer alone in the swarm with batch size 1)."""
    if config.inner.round_tokens:
        return max(config.inner.steps, -(-config.inner.round_tokens // config.data.seq_len))
    return config.inner.steps


@torch.no_grad()
def pseudo_gradient_bound(global_params: Sequence[torch.Tensor], config: RunConfig) -> float:
    """The largest absolute value an honest pseudo-gradient can hold this round."""
    max_abs = max((float(p.abs().max()) for p in global_params if p.numel()), default=0.0)
    per_step = config.inner.lr * (ADAM_UPDATE_BOUND + config.inner.weight_decay * 2.0 * max_abs)
    return max_inner_steps(config) * per_step


def max_round_tokens(config: RunConfig) -> int:
    """The most tokens an honest peer can process in a round, so the largest averaging weight it can claim: H steps of
    the largest step config.py allows (MAX_STEP_TOKENS), or with --round-tokens the budget plus the step that crosses
    it. Every peer computes the same number: H and the budget are part of the run's fingerprint."""
    if config.inner.round_tokens:
        return config.inner.round_tokens + MAX_STEP_TOKENS
    return config.inner.steps * MAX_STEP_TOKENS


def capped_weights(weights: Sequence[float], *, max_weight: float) -> list[float]:
    """Each weight capped at `max_weight` (max_round_tokens: no honest peer claims more, and the sum of a group's
    weights stays finite whatever its senders claim), then at WEIGHT_CAP_FACTOR x the lower median, so one sender
    claiming a huge token count cannot make the average its own update."""
    if not weights:
        return []
    absolute = [min(float(w), max_weight) for w in weights]
    cap = WEIGHT_CAP_FACTOR * sorted(absolute)[(len(absolute) - 1) // 2]
    return [min(w, cap) for w in absolute]


def clamp_contribution(part: torch.Tensor, bound: float) -> torch.Tensor:
    """The part with every value clamped into [-bound, bound]; the very same tensor when nothing exceeds it."""
    if bound <= 0 or float(part.abs().max()) <= bound:
        return part
    return part.clamp(-bound, bound)


@torch.no_grad()
def clip_to_median_norm(
    parts: Sequence[torch.Tensor], factor: float = NORM_CLIP_FACTOR
) -> tuple[list[torch.Tensor], list[int]]:
    """Each part scaled down to `factor` x the lower median of the parts' L2 norms, and the indices of those scaled.

    The lower median: with one attacker among three or more senders it is an honest peer's norm, however large or
    small the attacker's; of two senders it is the smaller, so an attacker can shrink an honest update but not
    replace it. Parts within the limit are returned as the very same tensors (bit for bit, as in the simulation).
    Norms are accumulated in float64, so the finite values an attacker may send (up to the value bound) cannot
    overflow them."""
    if len(parts) < 2:
        return list(parts), []
    if _clearly_within(parts, factor):
        return list(parts), []
    norms = [float(torch.linalg.vector_norm(part, dtype=torch.float64)) for part in parts]
    limit = factor * sorted(norms)[(len(norms) - 1) // 2]
    clipped = [i for i, norm in enumerate(norms) if norm > limit]
    scaled = [
        (part * (limit / norms[i])).to(part.dtype) if i in clipped else part for i, part in enumerate(parts)
    ]
    return scaled, clipped


NORM_FAST_MARGIN = 0.95
"""clip_to_median_norm's float32 shortcut decides only when every norm is below this share of the limit: float32
norms of a part are within ~1e-5 of the float64 ones (far less than 5 %), so the shortcut never decides otherwise."""
NORM_FAST_MIN = 1e-15
"""... and only when every float32 norm is at least this (smaller ones may have lost squares that underflowed)."""


def _clearly_within(parts: Sequence[torch.Tensor], factor: float) -> bool:
    """Whether every part's norm is clearly within `factor` x the lower median, judged from float32 norms (~5x
    faster than float64 ones): then clip_to_median_norm scales nothing, exactly as the float64 norms would decide.
    False when in doubt: near the limit, or a norm that overflowed (non-finite) or may have underflowed."""
    norms = [float(torch.linalg.vector_norm(part)) for part in parts]
    if not all(math.isfinite(norm) and norm >= NORM_FAST_MIN for norm in norms):
        return False
    limit = factor * sorted(norms)[(len(norms) - 1) // 2]
    return all(norm <= NORM_FAST_MARGIN * limit for norm in norms)


@torch.no_grad()
def trimmed_mean(
    parts: Sequence[torch.Tensor], weights: Sequence[float], order_keys: Sequence[bytes]
) -> torch.Tensor:
    """Per value, the weighted mean of the contributions without the highest and the lowest one (with three or more
    contributions; with fewer, average_contributions). One sender that lies about a value is either left out or lies
    between two honest values, so it moves no value beyond the honest peers' own spread.

    Bit for bit the same wherever it is computed, on a reducer (one part of a shard) or in the simulation (whole
    tensors): every operation is per value (a stable sort of the contributions in canonical order, then a sum in
    sorted order), so how a tensor is split into parts cannot change a bit."""
    if len(parts) < 3:
        return average_contributions(parts, weights, order_keys)
    order = sorted(range(len(parts)), key=lambda i: (order_keys[i], i))
    values, rank = torch.sort(torch.stack([parts[i].float() for i in order]), dim=0, stable=True)
    ordered_weights = torch.tensor([float(weights[i]) for i in order], dtype=torch.float64)
    kept_values, kept_weights = values[1:-1], ordered_weights[rank[1:-1]]
    total = kept_weights[0].clone()
    for weight in kept_weights[1:]:
        total += weight
    result = kept_values[0] * (kept_weights[0] / total).float()
    for value, weight in zip(kept_values[1:], kept_weights[1:], strict=True):
        result += value * (weight / total).float()  # multiply then add: no fused rounding
    return result


AGGREGATORS = {"mean": average_contributions, "trimmed-mean": trimmed_mean}
"""--aggregation: how a reducer (and the simulation) combines a group's contributions to one part."""


def all_finite(part: torch.Tensor) -> bool:
    """Whether every value is finite: one sum (a NaN or an infinity makes any sum non-finite, so a finite sum proves
    it, ~30x faster than isfinite), and the exact check only when the sum is not finite (it may overflow)."""
    if part.numel() == 0 or math.isfinite(float(part.sum())):
        return True
    return bool(torch.isfinite(part).all())


def within_bound(part: torch.Tensor, bound: float) -> bool:
    """An averaged part a receiver may accept: finite and within the bound its reducer had to respect."""
    if part.numel() == 0:
        return True
    if bound <= 0:
        return all_finite(part)
    low, high = torch.aminmax(part)  # one pass; a NaN makes both NaN, an infinity is one of them
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        return False
    return max(-low, high) <= bound * RECEIVED_VALUE_SLACK


def parse_bans(value: object) -> frozenset[bytes]:
    """The peer ids a group member says it bans, from its matchmaking metadata (a stranger's: bounded, typed)."""
    if not isinstance(value, list | tuple):
        return frozenset()
    return frozenset(
        peer
        for peer in value[:MAX_BANS_GATHERED]
        if isinstance(peer, bytes) and 0 < len(peer) <= MAX_PEER_ID_BYTES
    )


def excluded_members(members: Sequence[bytes], bans: Mapping[bytes, frozenset[bytes]]) -> frozenset[bytes]:
    """The members of a group that a strict majority of its members ban (one vote per member, none about itself).

    Every member computes this from the same gathered metadata, so they all run the all-reduce among the same peers.
    A single attacker cannot exclude an honest peer (its one vote is no majority in a group of three or more), while
    a reducer that lied to the whole group is banned by every honest member at once (they all received its lie)."""
    group = set(members)
    votes = Counter(
        banned
        for voter in group
        for banned in bans.get(voter, frozenset())
        if banned != voter and banned in group
    )
    return frozenset(member for member in group if 2 * votes[member] > len(group))
