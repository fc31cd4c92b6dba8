"""Bounded influence at the reducer (peer/robust.py, peer/allreduce.py): one lying sender cannot move the average
by more than a bound every peer computes the same way, and honest contributions pass through bit for bit."""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch
from hivemind.compression import NoCompression

from peer.allreduce import OrderedPartReducer, encode_once
from peer.config import MAX_STEP_TOKENS, DataConfig, InnerConfig, RunConfig
from peer.inner import build_inner_optimizer, inner_step
from peer.model import build_model, load_model_config
from peer.outer import OuterOptimizer, average_contributions, tensors_sha256
from peer.robust import (
    AGGREGATORS,
    MAX_BANS_GATHERED,
    NORM_CLIP_FACTOR,
    RECEIVED_VALUE_SLACK,
    all_finite,
    capped_weights,
    clamp_contribution,
    clip_to_median_norm,
    excluded_members,
    max_round_tokens,
    parse_bans,
    pseudo_gradient_bound,
    trimmed_mean,
    within_bound,
)
from tests.unit.test_allreduce import submit

SIZE = 64
KEYS = (b"\x01", b"\x02", b"\x03")


def reduce_once(parts: list[torch.Tensor], weights: list[float], bound: float) -> torch.Tensor:
    async def run():
        reducer = OrderedPartReducer(
            (torch.Size([SIZE]),),
            len(parts),
            part_dtypes=(torch.float32,),
            order_keys=KEYS[: len(parts)],
            encode=functools.partial(encode_once, NoCompression()),
            value_bound=bound,
            max_weight=1e9,
        )
        return await submit(reducer, [(s, 0, parts[s], weights[s]) for s in range(len(parts))])

    results = asyncio.run(run())
    assert all(r[0] is results[0][0] for r in results), "every sender gets the same bytes"
    return results[0][1]


def honest_parts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(SIZE, generator=generator) * 1e-3 for _ in range(2)]


def test_honest_contributions_within_the_bound_pass_through_bit_for_bit():
    parts = honest_parts()
    averaged = reduce_once(parts, [1.0, 2.0], bound=1.0)
    assert tensors_sha256([averaged]) == tensors_sha256([average_contributions(parts, [1.0, 2.0], KEYS[:2])])
    assert clamp_contribution(parts[0], 1.0) is parts[0]


def test_a_huge_finite_contribution_moves_the_average_by_at_most_the_bound():
    parts = honest_parts()
    attacker = torch.full((SIZE,), 3e38)  # finite, would overflow the outer step
    averaged = reduce_once([*parts, attacker], [1.0, 1.0, 1.0], bound=0.01)
    clean = average_contributions(parts, [1.0, 1.0], KEYS[:2])
    assert within_bound(averaged, 0.01)
    assert float((averaged - clean).abs().max()) <= 0.01  # its share (1/3) of at most twice the bound


def test_an_inflated_weight_counts_at_most_four_times_the_median():
    assert capped_weights([1.0, 1.0, 1e30], max_weight=1e9) == [1.0, 1.0, 4.0]
    # two peers: the lower median is the honest one
    assert capped_weights([1.0, 1e30], max_weight=1e9) == [1.0, 4.0]
    # honest heterogeneous peers keep their weights
    assert capped_weights([1.0, 2.0, 4.0], max_weight=1e9) == [1.0, 2.0, 4.0]
    parts = honest_parts()
    attacker = torch.full((SIZE,), 0.01)
    averaged = reduce_once([*parts, attacker], [1.0, 1.0, 1e30], bound=0.01)
    # without the cap the average would be the attacker's update exactly
    assert not torch.equal(averaged, attacker)
    clipped, scaled_down = clip_to_median_norm([*parts, attacker])
    assert scaled_down == [
        2
    ]  # and its values, ten times an honest peer's, are scaled to twice the median norm
    expected = average_contributions(clipped, [1.0, 1.0, 4.0], KEYS)
    assert tensors_sha256([averaged]) == tensors_sha256([expected])


def test_a_contribution_far_above_the_median_norm_is_scaled_down_and_honest_ones_pass_bit_for_bit():
    parts = honest_parts()
    attacker = torch.full((SIZE,), 0.01)  # within the value bound, ten times an honest peer's norm
    clipped, scaled_down = clip_to_median_norm([parts[0], attacker, parts[1]])
    assert scaled_down == [1]
    assert clipped[0] is parts[0] and clipped[2] is parts[1]
    median = sorted(float(p.norm()) for p in [parts[0], attacker, parts[1]])[1]
    assert float(clipped[1].norm()) == pytest.approx(NORM_CLIP_FACTOR * median, rel=1e-5)
    assert torch.allclose(clipped[1] / clipped[1].norm(), attacker / attacker.norm())  # direction kept
    # the reducer applies it: the attacker's pull on the average is at most its share of twice the median norm
    averaged = reduce_once([parts[0], parts[1], attacker], [1.0, 1.0, 1.0], bound=0.01)
    clean = average_contributions(parts, [1.0, 1.0], KEYS[:2])
    assert float((averaged - clean * 2 / 3).norm()) <= NORM_CLIP_FACTOR * median / 3 * 1.0001
    # a tiny (or zero) contribution among three cannot shrink the honest ones: the lower median is honest
    clipped, scaled_down = clip_to_median_norm([parts[0], torch.zeros(SIZE), parts[1]])
    assert scaled_down == [] and clipped[0] is parts[0]
    # of two senders the smaller norm is the reference: an attacker can shrink an update, not replace it
    _, scaled_down = clip_to_median_norm([parts[0], attacker])
    assert scaled_down == [1]
    # norms of the largest finite values do not overflow
    clipped, scaled_down = clip_to_median_norm([*parts, torch.full((SIZE,), 3e38)])
    assert scaled_down == [2] and bool(torch.isfinite(clipped[2]).all())


def test_no_weight_counts_for_more_than_the_tokens_a_round_can_hold():
    config = RunConfig(inner=InnerConfig(steps=10))
    cap = max_round_tokens(config)
    assert cap == 10 * MAX_STEP_TOKENS
    budget = RunConfig(inner=InnerConfig(steps=10, round_tokens=5000))
    assert max_round_tokens(budget) == 5000 + MAX_STEP_TOKENS
    # a majority of liars moves the median, but not past the absolute cap: the sum stays finite
    assert capped_weights([1.0, 1e308, 1e308], max_weight=cap) == [1.0, cap, cap]
    assert capped_weights([float(MAX_STEP_TOKENS)] * 3, max_weight=cap) == [float(MAX_STEP_TOKENS)] * 3
    # so no honest peer ever claims more than the cap
    with pytest.raises(ValueError, match="tokens per step"):
        DataConfig(batch_size=MAX_STEP_TOKENS, seq_len=2)


def test_receivers_refuse_non_finite_and_out_of_bound_averages():
    assert within_bound(torch.full((4,), 0.01), 0.01)
    assert within_bound(torch.full((4,), 0.01 * RECEIVED_VALUE_SLACK), 0.01)  # a lossy codec's overshoot
    assert not within_bound(torch.full((4,), 0.02), 0.01)
    assert not within_bound(torch.tensor([0.0, float("nan")]), 1.0)
    assert not within_bound(torch.tensor([float("inf")]), 0.0)  # no bound still means finite
    assert not within_bound(torch.tensor([-float("inf"), 0.0]), 1.0)
    assert not within_bound(torch.full((4,), -0.02), 0.01)  # the bound holds for negative values too
    assert within_bound(torch.full((4,), -0.01), 0.01)


def test_the_one_pass_finite_check_agrees_with_isfinite_even_when_the_sum_overflows():
    generator = torch.Generator().manual_seed(3)
    finite = torch.randn(10_000, generator=generator)
    assert all_finite(finite) and all_finite(torch.empty(0))
    huge = torch.full((1000,), 3e38)  # finite values whose sum overflows: the exact check decides
    assert not torch.isfinite(huge.sum()) and all_finite(huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for position in (0, 4321, 9999):
            poisoned = finite.clone()
            poisoned[position] = bad
            assert not all_finite(poisoned)
            poisoned_huge = huge.clone()
            poisoned_huge[position % 1000] = bad
            assert not all_finite(poisoned_huge)


def _clip_with_float64_norms(parts, factor=NORM_CLIP_FACTOR):
    """clip_to_median_norm as it was before its float32 shortcut: the reference the shortcut must agree with."""
    norms = [float(torch.linalg.vector_norm(part, dtype=torch.float64)) for part in parts]
    limit = factor * sorted(norms)[(len(norms) - 1) // 2]
    clipped = [i for i, norm in enumerate(norms) if norm > limit]
    return [(p * (limit / norms[i])).to(p.dtype) if i in clipped else p for i, p in enumerate(parts)], clipped


@pytest.mark.parametrize("ratio", [0.5, 2.84, 2.86, 3.0, 3.0001, 50.0])  # the shortcut decides below 2.85
@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e30])  # squares that underflow, fit, overflow in float32
def test_the_float32_norm_shortcut_decides_exactly_as_float64_norms(ratio, scale):
    generator = torch.Generator().manual_seed(11)
    honest = [torch.randn(10_000, generator=generator) * scale for _ in range(2)]
    base = float(torch.linalg.vector_norm(honest[0], dtype=torch.float64))
    other = float(torch.linalg.vector_norm(honest[1], dtype=torch.float64))
    outlier = torch.randn(10_000, generator=generator)
    # an outlier at `ratio` x the lower median norm of the three (honest[0] or honest[1], whichever is larger)
    outlier = outlier * (
        ratio * max(base, other) / float(torch.linalg.vector_norm(outlier, dtype=torch.float64))
    )
    parts = [honest[0], outlier, honest[1]]
    got, got_clipped = clip_to_median_norm(parts)
    want, want_clipped = _clip_with_float64_norms(parts)
    assert got_clipped == want_clipped
    assert tensors_sha256(got) == tensors_sha256(want)
    assert all(g is p for i, (g, p) in enumerate(zip(got, parts, strict=True)) if i not in got_clipped)


def test_real_pseudo_gradients_are_well_inside_the_bound():
    """The bound is loose enough that honest training never trips it: H AdamW steps of the tiny model at a high
    learning rate stay far inside it."""
    config = RunConfig(
        data=DataConfig(batch_size=2, seq_len=16),
        inner=InnerConfig(steps=4, lr=3e-3, warmup_steps=0),
    )
    model = build_model(load_model_config("tiny", vocab_size=512, max_seq_len=16), seed=0)
    outer = OuterOptimizer(list(model.parameters()), config.outer)
    optimizer = build_inner_optimizer(model, config.inner)
    generator = torch.Generator().manual_seed(0)
    for _ in range(config.inner.steps):
        inner_step(
            model, optimizer, torch.randint(0, 512, (2, 16), generator=generator), lr=3e-3, grad_clip=1.0
        )
    pseudo_grads = outer.pseudo_gradient(list(model.parameters()))
    bound = pseudo_gradient_bound(outer.global_params, config)
    largest = max(float(g.abs().max()) for g in pseudo_grads)
    assert 0 < largest < bound / 2, (largest, bound)


def test_a_member_banned_by_a_strict_majority_of_its_group_is_left_out():
    honest, liar = [b"h1", b"h2", b"h3", b"h4"], b"liar"
    members = [*honest, liar]
    everyone_saw_it = {peer: frozenset({liar}) for peer in honest}
    assert excluded_members(members, everyone_saw_it) == {liar}
    # the liar accusing honest peers (even all of them) excludes nobody: one vote is no majority
    accusations = {**everyone_saw_it, liar: frozenset(honest)}
    assert excluded_members(members, accusations) == {liar}
    assert excluded_members(members, {liar: frozenset(honest)}) == frozenset()
    # half of the group is not a majority; votes about oneself and about non-members do not count
    assert excluded_members(members, {b"h1": frozenset({liar}), b"h2": frozenset({liar})}) == frozenset()
    assert (
        excluded_members([b"a", b"b", b"c"], {b"a": frozenset({b"a"}), b"b": frozenset({b"a", b"x"})})
        == set()
    )
    # two members: one accuser is no majority (a lone honest peer cannot tell who lied; see README)
    assert excluded_members([b"a", b"b"], {b"a": frozenset({b"b"})}) == frozenset()
    assert excluded_members([b"a", b"b", b"c"], {b"a": frozenset({b"c"}), b"b": frozenset({b"c"})}) == {b"c"}


def test_a_ban_list_from_a_stranger_is_bounded_and_typed():
    assert parse_bans(None) == frozenset()
    assert parse_bans("liar") == frozenset()
    assert parse_bans([b"a", "b", 3, b"", b"x" * 65, b"y" * 64]) == {b"a", b"y" * 64}
    assert len(parse_bans([bytes([i]) for i in range(200)])) == MAX_BANS_GATHERED


# ---- --aggregation trimmed-mean -------------------------------------------------------------------------------
def five_contributions(size: int = 1000) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(size, generator=generator) * 1e-3 for _ in range(5)]


FIVE_KEYS = tuple(bytes([i]) * 4 for i in (9, 3, 7, 1, 5))


def test_trimmed_mean_leaves_out_the_highest_and_lowest_value_of_each_coordinate():
    parts, weights = five_contributions(), [1.0, 2.0, 1.0, 3.0, 1.0]
    result = trimmed_mean(parts, weights, FIVE_KEYS)
    stacked = torch.stack(parts)
    values, rank = stacked.sort(dim=0)
    w = torch.tensor(weights, dtype=torch.float64)[rank[1:-1]]
    expected = (values[1:-1].double() * w).sum(0) / w.sum(0)
    assert torch.allclose(result.double(), expected, rtol=1e-5, atol=1e-9)
    # every value lies within the honest contributions' own range, whatever one of them is replaced by
    attacked = [*parts[:4], torch.full((1000,), 3e38)]
    poisoned = trimmed_mean(attacked, weights, FIVE_KEYS)
    assert bool((poisoned <= torch.stack(parts[:4]).max(0).values).all())
    assert bool((poisoned >= torch.stack(parts[:4]).min(0).values).all())
    # fewer than three contributions: the plain weighted mean, bit for bit
    two = trimmed_mean(parts[:2], weights[:2], FIVE_KEYS[:2])
    assert tensors_sha256([two]) == tensors_sha256(
        [average_contributions(parts[:2], weights[:2], FIVE_KEYS[:2])]
    )


def test_trimmed_mean_is_the_same_bits_in_any_input_order_and_for_any_split_into_parts():
    parts, weights = five_contributions(), [1.0, 2.0, 1.0, 3.0, 1.0]
    parts[2][:100] = parts[0][:100]  # ties between contributions of different weights
    whole = trimmed_mean(parts, weights, FIVE_KEYS)
    order = [3, 0, 4, 2, 1]
    shuffled = trimmed_mean(
        [parts[i] for i in order], [weights[i] for i in order], [FIVE_KEYS[i] for i in order]
    )
    assert tensors_sha256([shuffled]) == tensors_sha256([whole])
    # a reducer sees one part of a shard at a time; the simulation sees whole tensors
    pieces = [
        trimmed_mean([p[a:b] for p in parts], weights, FIVE_KEYS) for a, b in ((0, 1), (1, 337), (337, 1000))
    ]
    assert tensors_sha256([torch.cat(pieces)]) == tensors_sha256([whole])


def test_the_reducer_combines_with_the_runs_aggregation():
    parts = five_contributions(SIZE)

    async def run():
        reducer = OrderedPartReducer(
            (torch.Size([SIZE]),),
            5,
            part_dtypes=(torch.float32,),
            order_keys=FIVE_KEYS,
            encode=functools.partial(encode_once, NoCompression()),
            value_bound=1.0,
            max_weight=1e9,
            combine=AGGREGATORS["trimmed-mean"],
        )
        return await submit(reducer, [(s, 0, parts[s], 1.0) for s in range(5)])

    averaged = asyncio.run(run())[0][1]
    assert tensors_sha256([averaged]) == tensors_sha256([trimmed_mean(parts, [1.0] * 5, FIVE_KEYS)])
