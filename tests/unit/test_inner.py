from __future__ import annotations

import math

import pytest

from peer.config import InnerConfig
from peer.inner import inner_lr, schedule_step


def test_warmup_is_linear_to_the_peak():
    config = InnerConfig(lr=1e-3, warmup_steps=10)
    assert inner_lr(0, config=config, total_steps=100) == pytest.approx(1e-4)
    assert inner_lr(4, config=config, total_steps=100) == pytest.approx(5e-4)
    assert inner_lr(9, config=config, total_steps=100) == pytest.approx(1e-3)


def test_cosine_decays_to_the_floor_and_stays_there():
    config = InnerConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert inner_lr(10, config=config, total_steps=110) == pytest.approx(1e-3)
    halfway = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert inner_lr(60, config=config, total_steps=110) == pytest.approx(halfway)
    assert inner_lr(110, config=config, total_steps=110) == pytest.approx(1e-4)
    assert inner_lr(500, config=config, total_steps=110) == pytest.approx(1e-4)


def test_without_a_horizon_the_rate_stays_at_the_peak():
    config = InnerConfig(lr=2e-4, warmup_steps=5)
    assert inner_lr(10_000, config=config, total_steps=0) == pytest.approx(2e-4)


def test_schedule_is_a_function_of_the_global_step():
    """A late joiner at round r uses the same rate as everyone else (round x H + inner step)."""
    config = InnerConfig(lr=1e-3, warmup_steps=100, steps=50, min_lr_ratio=0.1)
    late = schedule_step(3, 7, steps_per_round=50)
    assert late == 157
    # past the 100 warmup steps: 57 of the 900 cosine steps done
    cosine = 0.5 * (1 + math.cos(math.pi * 57 / 900))
    assert inner_lr(late, config=config, total_steps=1000) == pytest.approx(1e-3 * (0.1 + 0.9 * cosine))
    # not the rate of a peer counting its own steps from zero, which would still be warming up
    assert inner_lr(
        schedule_step(0, 7, steps_per_round=50), config=config, total_steps=1000
    ) == pytest.approx(8e-5)


def test_extra_steps_of_a_fast_peer_stay_in_their_round_of_the_schedule():
    # H = 10: steps 0..9 of round 3 are positions 30..39; a --round-tokens peer's 25th step is still 39
    assert [schedule_step(3, step, steps_per_round=10) for step in (0, 9, 10, 24)] == [30, 39, 39, 39]
    assert schedule_step(4, 0, steps_per_round=10) == 40
