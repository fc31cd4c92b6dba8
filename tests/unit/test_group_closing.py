"""Early group closing (peer/group_closing.py): the count a leader waits for, and when it closes."""

from __future__ import annotations

import asyncio

import pytest

from peer.group_closing import MAX_EXPECTED_PEERS, EarlyClose, full_group_size


class Matchmaking:
    """The part of hivemind's Matchmaking that EarlyClose reads and calls: a leader with `followers` joined."""

    def __init__(self, followers: int = 0, *, leader: object = None, looking: bool = True):
        self.target_group_size: int | None = 7  # whatever the previous step left
        self.current_followers = {f"follower{i}": None for i in range(followers)}
        self.current_leader, self.client_mode, self.is_looking_for_group = leader, False, looking
        self.lock_request_join_group = asyncio.Lock()
        self.assembled = 0

    @property
    def assembled_group(self):
        future = asyncio.get_running_loop().create_future()
        if self.assembled:
            future.set_result(None)
        return future

    async def leader_assemble_group(self) -> None:
        assert self.lock_request_join_group.locked()
        self.assembled += 1


class Step:
    def __init__(self):
        self.trigger = asyncio.Event()

    async def wait_for_trigger(self) -> None:
        await self.trigger.wait()


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [({"group_size": 4}, 4), ({"group_size": 2}, 2), ({"group_size": 1}, None), ({"group_size": 0}, None),
     ({}, None), ({"group_size": True}, None), ({"group_size": "4"}, None), ({"group_size": 4.0}, None),
     ({"group_size": MAX_EXPECTED_PEERS + 1}, None), ({"group_size": -3}, None)],
)  # fmt: skip
def test_a_leader_closes_its_group_early_only_for_a_real_group_size(metadata, expected):
    assert full_group_size(metadata) == expected


def run_step(matchmaking: Matchmaking, *, expected, joins=(), join_after_trigger=()) -> EarlyClose:
    """One step: join requests with these metadata arrive, then the trigger, then the later join requests."""

    async def scenario() -> EarlyClose:
        early = EarlyClose(matchmaking, expected=expected, round_index=5)
        assert matchmaking.target_group_size is None  # no "group is full" and no closing before the trigger
        step = Step()
        closer = asyncio.create_task(early.close_once_triggered(step))
        for metadata in joins:
            early.count_in(metadata)
            assert matchmaking.target_group_size is None
        step.trigger.set()
        await asyncio.wait_for(closer, timeout=5)
        for metadata in join_after_trigger:
            early.count_in(metadata)
        return early

    return asyncio.run(scenario())


def test_the_group_closes_once_triggered_when_everyone_expected_joined():
    matchmaking = Matchmaking(followers=2)
    run_step(matchmaking, expected=3)
    assert matchmaking.assembled == 1 and matchmaking.target_group_size == 3


def test_a_late_member_that_counts_itself_in_is_waited_for():
    matchmaking = Matchmaking(followers=2)  # the two we expected; a third asked to join and counted three
    early = run_step(matchmaking, expected=2, joins=[{"round": 5, "group_size": 3}])
    assert early.expected == 3 and matchmaking.assembled == 1  # 2 followers + us = 3


def test_a_late_member_not_yet_joined_keeps_the_group_open():
    matchmaking = Matchmaking(followers=1)
    run_step(matchmaking, expected=2, joins=[{"round": 5, "group_size": 3}])
    assert matchmaking.assembled == 0 and matchmaking.target_group_size == 3  # hivemind closes on its join


def test_a_join_after_the_trigger_raises_hiveminds_target():
    matchmaking = Matchmaking(followers=0)
    run_step(matchmaking, expected=2, join_after_trigger=[{"round": 5, "group_size": 4}])
    assert matchmaking.target_group_size == 4 and matchmaking.assembled == 0


@pytest.mark.parametrize(
    "metadata",
    [
        {"round": 4, "group_size": 9},
        {"round": 5, "group_size": 2},
        {"round": 5, "group_size": "9"},
        {"round": 5},
    ],
)
def test_a_count_from_another_round_or_a_smaller_or_malformed_one_changes_nothing(metadata):
    matchmaking = Matchmaking(followers=2)
    early = run_step(matchmaking, expected=3, joins=[metadata])
    assert early.expected == 3 and matchmaking.assembled == 1


@pytest.mark.parametrize(
    "matchmaking",
    [Matchmaking(followers=2, leader="someone else"), Matchmaking(followers=2, looking=False)],
    ids=["following another leader", "not looking for a group"],
)
def test_only_a_leader_that_is_looking_closes_a_group(matchmaking):
    run_step(matchmaking, expected=3)
    assert matchmaking.assembled == 0


def test_without_an_expected_count_the_group_closes_at_its_time():
    matchmaking = Matchmaking(followers=5)
    run_step(matchmaking, expected=None)
    assert matchmaking.assembled == 0 and matchmaking.target_group_size is None


def test_a_step_that_ends_before_its_trigger_closes_nothing():
    async def scenario():
        matchmaking = Matchmaking(followers=2)
        early = EarlyClose(matchmaking, expected=3, round_index=5)
        closer = asyncio.create_task(early.close_once_triggered(Step()))
        await asyncio.sleep(0)
        closer.cancel()
        await asyncio.wait_for(closer, timeout=5)  # ends quietly
        return matchmaking

    assert asyncio.run(scenario()).assembled == 0
