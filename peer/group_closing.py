"""When a leader closes its group before the group time: once its own pseudo-gradient is ready and every peer
expected in the round has joined, where "expected" is the largest count that any member who asked to join saw."""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger(__name__)
MAX_EXPECTED_PEERS = 1 << 16  # a larger claim is not a real swarm's count; the group then closes at its time


def full_group_size(metadata: dict) -> int | None:
    """The group size a member expects (its gathered "group_size", counted from the round's progress records);
    None: none, or fewer than 2, and the group closes at its scheduled time as hivemind's default does."""
    expected = metadata.get("group_size")
    if isinstance(expected, int) and not isinstance(expected, bool) and 2 <= expected <= MAX_EXPECTED_PEERS:
        return expected
    return None


class EarlyClose:
    """(averager process) One matchmaking step's rule for closing the group early, as its leader.

    Each peer counts the round's peers when it schedules, from the progress records it sees then. A peer that
    arrived later (a newcomer, or one whose record was late) is missing from the others' counts but not from its
    own, so every join request raises the count to the requester's (`count_in`). And the group closes early only
    once the leader's own all-reduce is triggered (`close_once_triggered`): the round's peers join at scheduling,
    seconds before the round ends, and a group closed at that moment would turn away whoever joins after it.
    Before the trigger, hivemind's `target_group_size` stays None (no "group is full" refusal, no closing);
    after it, it is the expected count, so the last expected join closes the group at once.

    Relies on hivemind 1.1.12's Matchmaking internals (`target_group_size`, `current_followers`, `current_leader`,
    `assembled_group`, `lock_request_join_group`, `leader_assemble_group`), as hivemind's own join handler does.
    """

    def __init__(self, matchmaking, *, expected: int | None, round_index: object):
        self.matchmaking, self.expected, self.round_index = matchmaking, expected, round_index
        self.triggered = False
        matchmaking.target_group_size = None

    def count_in(self, metadata: dict) -> None:
        """A peer of our round asks to join: expect at least as many peers as it saw."""
        claimed = full_group_size(metadata)
        if claimed is None or metadata.get("round") != self.round_index:
            return
        if self.expected is None or claimed > self.expected:
            self.expected = claimed
            if self.triggered:
                self.matchmaking.target_group_size = claimed

    async def close_once_triggered(self, step) -> None:
        """Wait for our trigger, then close the group if everyone expected already joined (hivemind's join handler
        closes it on the last expected join otherwise)."""
        try:
            await step.wait_for_trigger()
        except (asyncio.CancelledError, AssertionError):  # the step ended first (or has no trigger)
            return
        self.triggered = True
        try:
            if self.expected is None:
                return  # nobody said how many to expect: the group closes at its time
            matchmaking = self.matchmaking
            matchmaking.target_group_size = self.expected
            async with matchmaking.lock_request_join_group:
                if (
                    matchmaking.is_looking_for_group
                    and not matchmaking.client_mode
                    and matchmaking.current_leader is None
                    and not matchmaking.assembled_group.done()
                    and len(matchmaking.current_followers) + 1 >= self.expected
                ):
                    await matchmaking.leader_assemble_group()
        except Exception as e:  # as if it had not closed early: the group still closes at its time
            logger.warning(f"could not close the group early: {e!r}")
