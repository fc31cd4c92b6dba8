"""peer/rejoin.py: a follower asks again once when its leader's stream ends between ACCEPTED and the verdict, and a
leader answers only a member of the group it last assembled, under that group's key, for a while."""

from __future__ import annotations

import asyncio
import types

from hivemind.averaging.group_info import GroupInfo
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2

from peer.rejoin import LedGroups, ask_again_if_cut_off

ACCEPTED, BEGIN, DISBANDED = (
    averaging_pb2.ACCEPTED,
    averaging_pb2.BEGIN_ALLREDUCE,
    averaging_pb2.GROUP_DISBANDED,
)


def _peer(seed: int) -> PeerID:
    return PeerID(bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) + bytes([seed]) * 32)


class _Stream:
    """A leader's replies on one stream; remembers whether it was closed."""

    def __init__(self, *codes):
        self.codes, self.closed = list(codes), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.codes:
            raise StopAsyncIteration
        return averaging_pb2.MessageFromLeader(code=self.codes.pop(0))

    async def aclose(self):
        self.closed = True


def _collect(first: _Stream, *again: _Stream) -> tuple[list[int], int]:
    """The codes matchmaking sees, and how many times it asked again."""
    retries = list(again)

    async def ask_again():
        return retries.pop(0)

    async def run():
        return [m.code async for m in ask_again_if_cut_off(first, ask_again)]

    codes = asyncio.run(run())
    return codes, len(again) - len(retries)


def test_a_complete_exchange_is_passed_on_untouched():
    first = _Stream(ACCEPTED, BEGIN)
    assert _collect(first, _Stream(BEGIN)) == ([ACCEPTED, BEGIN], 0)
    assert first.closed


def test_a_refusal_is_not_asked_again():
    assert _collect(_Stream(averaging_pb2.NOT_LOOKING_FOR_GROUP), _Stream(BEGIN)) == (
        [averaging_pb2.NOT_LOOKING_FOR_GROUP],
        0,
    )


def test_a_stream_cut_after_accepted_asks_again_once_and_passes_the_verdict_on():
    retry = _Stream(BEGIN)
    assert _collect(_Stream(ACCEPTED), retry) == ([ACCEPTED, BEGIN], 1)
    assert retry.closed


def test_a_leader_still_looking_accepts_anew_and_matchmaking_sees_one_accepted():
    assert _collect(_Stream(ACCEPTED), _Stream(ACCEPTED, DISBANDED)) == ([ACCEPTED, DISBANDED], 1)


def test_a_second_cut_ends_the_exchange_without_a_third_request():
    assert _collect(_Stream(ACCEPTED), _Stream(ACCEPTED), _Stream(BEGIN)) == ([ACCEPTED], 1)


def _request(expiration: float, key: str = "run.0b01") -> averaging_pb2.JoinRequest:
    return averaging_pb2.JoinRequest(group_key=key, expiration=expiration)


def _led(members, *, key="run.0b01", keep_s=60.0) -> LedGroups:
    """A leader (members[-1]) that assembled `members`; follower i asked with expiration 100 + i."""
    led = LedGroups(keep_s=keep_s)
    group = GroupInfo(b"group", tuple(members), tuple(b"gathered-%d" % i for i in range(len(members))))
    matchmaking = types.SimpleNamespace(
        group_key_manager=types.SimpleNamespace(current_key=key),
        current_followers={peer: _request(100.0 + i, key) for i, peer in enumerate(members[:-1])},
    )

    async def assemble():
        matchmaking.group_key_manager.current_key = (
            "run.0b10"  # assembling moves the key on, as hivemind's does
        )
        return group

    matchmaking.leader_assemble_group = assemble
    led.watch(matchmaking)
    led.watch(matchmaking)  # idempotent: one wrapper, however many steps
    assert asyncio.run(matchmaking.leader_assemble_group()) is group
    return led


def test_a_member_asking_again_with_the_same_request_gets_the_group():
    a, b, c = _peer(1), _peer(2), _peer(3)
    answer = _led([a, b, c]).answer(b, _request(101.0))
    assert answer.code == BEGIN and answer.group_id == b"group"
    assert [PeerID(p) for p in answer.ordered_peer_ids] == [a, b, c]
    assert list(answer.gathered) == [b"gathered-0", b"gathered-1", b"gathered-2"]


def test_every_other_request_goes_through_the_usual_matchmaking():
    a, b = _peer(1), _peer(2)
    led = _led([a, b])
    assert led.answer(_peer(9), _request(100.0)) is None  # not a member
    assert led.answer(b, _request(100.0)) is None  # the leader itself never asks
    # a member's next request under the same key (its next step, or the round averaged again) is a new request
    assert led.answer(a, _request(105.0)) is None
    assert led.answer(a, _request(100.0, key="run.0b10")) is None  # another key
    assert _led([a, b], keep_s=-1.0).answer(a, _request(100.0)) is None  # too long ago
    assert LedGroups(keep_s=60.0).answer(a, _request(100.0)) is None  # never led a group
    assert led.answer(a, _request(100.0)).code == BEGIN
