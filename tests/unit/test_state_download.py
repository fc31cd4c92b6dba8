"""Choosing donors for a state download (peer/swarm_averaging.py RoundAveraging.download_state, without a network):
each network identity is asked once however many records name it, a state that fails the caller's check moves on to
the next donor, and a check that trips on what a stranger sent is that donor's failure, not our crash."""

from __future__ import annotations

import torch
from hivemind.p2p import PeerID

from peer.config import RunConfig, SwarmConfig
from peer.swarm_averaging import MAX_DONORS_TRIED, RoundAveraging

DONORS = [PeerID(bytes([0, 36, 8, 1, 18, 32]) + bytes([i]) * 32) for i in range(12)]  # identity-hash peer ids


class FakeAverager:
    def __init__(self, states: dict[PeerID, object]):
        self.states, self.asked = states, []

    def load_state_from(self, donor, *, chunk_timeout_s, total_timeout_s, max_bytes, min_rate_bytes_s):
        assert total_timeout_s > 0 and max_bytes > 0 and min_rate_bytes_s > 0
        self.asked.append(donor)
        return self.states.get(donor)


def averaging(states: dict[PeerID, object]) -> RoundAveraging:
    averaging = RoundAveraging.__new__(RoundAveraging)  # no averager process: the donors answer from `states`
    averaging.config = RunConfig(swarm=SwarmConfig(state_timeout_s=60.0))
    averaging.short_id, averaging.max_state_bytes = "test", 1 << 20
    averaging.averager = FakeAverager(states)
    return averaging


GOOD = ({"round": 3}, [torch.ones(2)])
WRONG = ({"round": 3}, [torch.zeros(2)])


def check(metadata, tensors) -> str | None:
    return None if torch.equal(tensors[0], torch.ones(2)) else "not the majority's state"


def test_a_refused_state_moves_on_to_the_next_donor_and_each_donor_is_asked_once():
    liar, gone, honest = DONORS[:3]
    download = averaging({liar: WRONG, honest: GOOD})
    names = [liar.to_bytes(), liar.to_bytes(), gone.to_bytes(), liar.to_bytes(), honest.to_bytes()]
    assert download.download_state(names, check=check) == GOOD
    assert download.averager.asked == [liar, gone, honest]


def test_a_check_that_trips_on_a_strangers_state_fails_that_donor_only():
    odd, honest = DONORS[:2]
    download = averaging({odd: ({"round": 3}, "not tensors"), honest: GOOD})
    assert download.download_state([odd.to_bytes(), honest.to_bytes()], check=check) == GOOD


def test_at_most_a_bounded_number_of_donors_per_attempt():
    download = averaging({donor: WRONG for donor in DONORS})
    assert download.download_state([d.to_bytes() for d in DONORS], check=check) is None
    assert len(download.averager.asked) == MAX_DONORS_TRIED
