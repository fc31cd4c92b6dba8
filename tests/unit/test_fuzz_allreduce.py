"""Fuzzing the part checks of the all-reduce reducer (peer/allreduce.py OrderedPartReducer) with hypothesis, offline
with asyncio as tests/unit/test_allreduce.py does: senders hand in parts of random shapes, dtypes, values and
weights, and each part is either accepted or rejected as that sender's failure, never a crash or a hang of the
reducer; every sender still in the group gets the same bytes, a finite average of the accepted contributions."""

from __future__ import annotations

import asyncio
import functools
import math

import hypothesis.extra.numpy as hnp
import numpy as np
import torch
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import NoCompression
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.allreduce import OrderedPartReducer, encode_once
from peer.config import RunConfig
from peer.robust import capped_weights, max_round_tokens

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PART_TIMEOUT_S = 5.0  # a part that is not decided by then is a hung reducer (it takes microseconds)
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
MAX_WEIGHT = float(max_round_tokens(RunConfig()))  # the default run's cap: 500 steps of the largest batch

part_shapes = st.lists(
    hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6), min_size=1, max_size=3
)
moderate = st.floats(-1e3, 1e3, width=32)
extreme = st.floats(width=32, allow_nan=True, allow_infinity=True) | st.sampled_from(
    [3.4e38, -3.4e38, 1e-45, float("nan"), float("inf")]
)
good_weights = st.floats(1e-3, 1e6)
any_weights = st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 5e-324, 1e308]) | st.floats(
    allow_nan=True
)
DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool]


@st.composite
def contribution(draw, expected_shape: tuple[int, ...]) -> tuple[object, float]:
    """(part, weight) one sender hands in for a part: mostly the right kind with ordinary values, else anything."""
    shape = (
        expected_shape
        if draw(st.integers(0, 5))
        else draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=6))
    )
    values = draw(hnp.arrays(np.float32, shape, elements=moderate if draw(st.integers(0, 3)) else extreme))
    part = torch.from_numpy(values.copy())
    if not draw(st.integers(0, 5)):
        part = part.to(draw(st.sampled_from(DTYPES)))
    if not draw(st.integers(0, 20)):
        part = values  # a numpy array, not a tensor
    weight = draw(good_weights if draw(st.integers(0, 3)) else any_weights)
    return part, weight


def acceptable(part, weight: float, expected_shape: tuple[int, ...]) -> bool:
    """What the reducer must accept: exactly the expected fp32 shape, finite values, a positive finite weight."""
    return (
        isinstance(part, torch.Tensor)
        and part.dtype == torch.float32
        and tuple(part.shape) == expected_shape
        and bool(torch.isfinite(part).all())
        and 0 < weight < float("inf")
    )


@st.composite
def rounds_of_parts(draw):
    """Shapes, the senders' order keys, and for each part each sender's (part, weight) and arrival order."""
    shapes = [tuple(shape) for shape in draw(part_shapes)]
    num_senders = draw(st.integers(1, 4))
    order_keys = draw(st.lists(st.binary(min_size=1, max_size=4), min_size=num_senders, max_size=num_senders))
    parts = [[draw(contribution(shape)) for _ in range(num_senders)] for shape in shapes]
    arrivals = [draw(st.permutations(range(num_senders))) for _ in shapes]
    value_bound = draw(st.sampled_from([0.0, 1e-2, 1.0, 1e4]))
    return shapes, order_keys, parts, arrivals, value_bound


async def hand_in(reducer: OrderedPartReducer, part_index: int, arrivals, contributions, banned: set[int]):
    """Each sender hands in its part in arrival order, as AllReduceRunner would: a sender whose part raised is
    banned at once (on_sender_failed), and a banned sender sends nothing more. Returns {sender: result or error}."""
    tasks, part_future = {}, reducer.current_part_future
    for sender in arrivals:
        if sender in banned:
            continue
        part, weight = contributions[sender]
        tasks[sender] = asyncio.create_task(reducer.accumulate_part(sender, part_index, part, weight=weight))
        await asyncio.sleep(0)  # let it reach the reducer before the next one arrives
        if tasks[sender].done() and tasks[sender].exception() is not None:
            banned.add(sender)
            reducer.on_sender_failed(sender)
    done = await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), PART_TIMEOUT_S)
    if part_future.done() and not part_future.cancelled():
        part_future.exception()  # "every sender of this part failed" with nobody left to hear it: not news
    return dict(zip(tasks, done, strict=True))


@FUZZ
@given(case=rounds_of_parts())
def test_every_part_is_accepted_or_fails_only_its_sender(case):
    shapes, order_keys, parts, arrivals, value_bound = case

    async def run():
        reducer = OrderedPartReducer(
            tuple(torch.Size(shape) for shape in shapes),
            len(order_keys),
            part_dtypes=(torch.float32,) * len(shapes),
            order_keys=order_keys,
            encode=functools.partial(encode_once, NoCompression()),
            value_bound=value_bound,
            max_weight=MAX_WEIGHT,
        )
        banned: set[int] = set()
        outcomes = []
        for part_index in range(len(shapes)):
            was_banned = set(banned)
            results = await hand_in(reducer, part_index, arrivals[part_index], parts[part_index], banned)
            outcomes.append((was_banned, results))
        finished = reducer.finished.is_set()
        reducer.finalize()  # as AllReduceRunner does once every stream ended
        return finished, len(banned) < len(order_keys), outcomes

    finished, anyone_left, outcomes = asyncio.run(run())
    for part_index, (was_banned, results) in enumerate(outcomes):
        shape, contributions = shapes[part_index], parts[part_index]
        accepted = []
        for sender, result in results.items():
            assert sender not in was_banned
            part, weight = contributions[sender]
            if acceptable(part, weight, shape):
                assert not isinstance(result, BaseException), (part_index, sender, result)
                accepted.append((part, weight))
            else:
                assert isinstance(result, AllreduceException), (part_index, sender, weight, result)
                assert not isinstance(result, BannedException), "a failing part is its sender's own failure"
        if not accepted:
            continue
        served = [results[sender] for sender in results if not isinstance(results[sender], BaseException)]
        serialized, averaged = served[0]
        assert all(other[0] is serialized for other in served), "every sender gets the same bytes"
        assert averaged.dtype == torch.float32 and tuple(averaged.shape) == shape
        assert bool(torch.isfinite(averaged).all())
        check_within_the_contributions(averaged, accepted, value_bound)
    if anyone_left:  # with every sender banned nobody hands in the last part: the runner's finalize ends it
        assert finished, "the reducer finished with the last part"


def check_within_the_contributions(averaged: torch.Tensor, accepted: list[tuple], value_bound: float) -> None:
    """A weighted mean lies between the smallest and largest (clamped) contribution, up to fp32 rounding; the norm
    clip scales a contribution toward zero, so the range is widened to include 0."""
    stacked = torch.stack([part.double() for part, _ in accepted])
    if value_bound > 0:
        stacked = stacked.clamp(-value_bound, value_bound)
        assert float(averaged.abs().max()) <= value_bound * (1 + 4 * FLOAT32_EPS)
    assert math.isfinite(sum(capped_weights([weight for _, weight in accepted], max_weight=MAX_WEIGHT)))
    low, high = stacked.min(dim=0).values.clamp(max=0.0), stacked.max(dim=0).values.clamp(min=0.0)
    slack = stacked.abs().max(dim=0).values * (len(accepted) + 1) * FLOAT32_EPS + 1e-44
    assert bool(((averaged.double() >= low - slack) & (averaged.double() <= high + slack)).all())


def test_weights_summing_past_the_float_range_still_average_inside_the_contributions():
    """Two of three senders claiming weight 1e308 (a double on the wire) would overflow the sum of the weights, and
    every share would be 0: the average 0 instead of a mean of the contributions. The absolute cap (the tokens a round
    can hold, peer/robust.py max_round_tokens) keeps the sum finite, at the reducer as here."""
    parts = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])]

    async def run():
        reducer = OrderedPartReducer(
            (torch.Size([2]),),
            3,
            part_dtypes=(torch.float32,),
            order_keys=[b"a", b"b", b"c"],
            encode=functools.partial(encode_once, NoCompression()),
            max_weight=MAX_WEIGHT,
        )
        results = await hand_in(
            reducer, 0, [0, 1, 2], list(zip(parts, [1.0, 1e308, 1e308], strict=True)), set()
        )
        reducer.finalize()
        return results

    results = asyncio.run(run())
    assert all(not isinstance(r, BaseException) for r in results.values()), results
    assert torch.equal(results[0][1], torch.tensor([1.0, 1.0]))
