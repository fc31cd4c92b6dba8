"""The peer's long-lived heap is frozen out of the garbage collector's full passes before the DHT and the averager
fork (a full pass over torch's and transformers' objects took 100-250 ms, and one inside an all-reduce held up the
whole group)."""

from __future__ import annotations

import gc

import hivemind
import pytest
from hivemind.averaging import DecentralizedAverager

from peer import swarm
from peer.allreduce import ExactAverager
from peer.config import SwarmConfig


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_the_heap_is_frozen_before_the_dht_forks(monkeypatch, unfrozen):
    frozen_at_start = []

    class NoDHT:
        def __init__(self, **kwargs):
            frozen_at_start.append(gc.get_freeze_count())

    monkeypatch.setattr(hivemind, "DHT", NoDHT)
    swarm._start_dht(SwarmConfig())
    assert frozen_at_start and frozen_at_start[0] > 1000


def test_the_averager_process_freezes_what_it_inherited_before_it_serves(monkeypatch, unfrozen):
    frozen_at_start = []
    monkeypatch.setattr(
        DecentralizedAverager, "run", lambda self: frozen_at_start.append(gc.get_freeze_count())
    )
    ExactAverager.run(object.__new__(ExactAverager))  # what the forked averager process runs
    assert frozen_at_start and frozen_at_start[0] > 1000
