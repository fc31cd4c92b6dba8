"""A follower that never hears its leader's verdict asks once more, and the leader answers a member of the group it
just assembled with that group.

In hivemind's matchmaking a leader answers a join request with ACCEPTED, then later, on the same stream, with
BEGIN_ALLREDUCE (the group) or GROUP_DISBANDED. Under load the stream now and then ended between the two without a
word (seen in a soak: the leader assembled a group of three; 2 ms later one follower's stream ended with no message).
The leader's group then includes a member that never learns of it: that member waits out its matchmaking and fails
("could not find a group"), and the others wait for its parts until their timeouts and fail too. One lost message
cost the whole round. The cause was the leader closing its end right after its last message, which lets the p2p
daemon reset the stream (ExactAverager.rpc_join_group now waits for the follower to hang up); this module is the
backstop for a verdict lost any other way.

A follower whose stream ends after ACCEPTED opens a new one and asks again (`RejoiningStub`), once, with the very same
request. The leader remembers the last group it assembled, under which group key, and each member's request
(`LedGroups`): a member asking again with that key and that request is answered with the group. Anything else, a
member's next request included (a new step, or a round averaged again under the same key), goes through hivemind's
usual handling.

Relies on hivemind 1.1.12's Matchmaking internals (`leader_assemble_group`, `current_followers`,
`group_key_manager.current_key`) and its stub classes, as peer/group_closing.py does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from hivemind.averaging.group_info import GroupInfo
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2

logger = logging.getLogger(__name__)


class LedGroups:
    """(averager process) The group this peer last assembled as a leader, for its members that ask again."""

    def __init__(self, keep_s: float):
        self.keep_s = keep_s  # how long a member may still ask: the all-reduce's own time limit
        # (group key, the group, each follower's request expiration, until when) of the last group we assembled
        self._last: tuple[str, GroupInfo, dict[PeerID, float], float] | None = None

    def watch(self, matchmaking) -> None:
        """Remember every group `matchmaking` assembles as a leader (wraps that one method on this instance)."""
        if getattr(matchmaking, "_remembers_led_groups", False):
            return
        assemble = matchmaking.leader_assemble_group

        async def assemble_and_remember() -> GroupInfo:
            key = matchmaking.group_key_manager.current_key  # followers asked with it; assembling changes it
            # each follower's request (its expiration time) tells its asking again from a later, new request
            requests = {peer: request.expiration for peer, request in matchmaking.current_followers.items()}
            group_info = await assemble()
            self._last = (key, group_info, requests, time.monotonic() + self.keep_s)
            return group_info

        matchmaking.leader_assemble_group = assemble_and_remember
        matchmaking._remembers_led_groups = True

    def answer(
        self, member: PeerID, request: averaging_pb2.JoinRequest
    ) -> averaging_pb2.MessageFromLeader | None:
        """The group's BEGIN_ALLREDUCE if `member` (authenticated by libp2p) asks again with the request that got it
        into the group we last assembled, recently; None for any other request (an ordinary one)."""
        if self._last is None:
            return None
        key, group_info, requests, until = self._last
        if key != request.group_key or requests.get(member) != request.expiration or time.monotonic() > until:
            return None
        logger.info(f"{member} asked again for the group we assembled; sending it the group")
        return begin_allreduce(group_info)


def begin_allreduce(group_info: GroupInfo) -> averaging_pb2.MessageFromLeader:
    """The message a leader sends each member of an assembled group (as hivemind's rpc_join_group builds it)."""
    return averaging_pb2.MessageFromLeader(
        code=averaging_pb2.BEGIN_ALLREDUCE,
        group_id=group_info.group_id,
        ordered_peer_ids=[peer_id.to_bytes() for peer_id in group_info.peer_ids],
        gathered=group_info.gathered,
    )


Messages = AsyncIterator[averaging_pb2.MessageFromLeader]


async def ask_again_if_cut_off(stream: Messages, ask_again: Callable[[], Awaitable[Messages]]) -> Messages:
    """The leader's messages on `stream`; if it ends after ACCEPTED without another word, the messages of one new
    request (`ask_again`) instead, less a repeated ACCEPTED, so that matchmaking sees one accepted request."""
    accepted = False
    try:
        async for message in stream:
            yield message
            if message.code != averaging_pb2.ACCEPTED:
                return  # the leader's verdict (or a refusal): the exchange is complete
            accepted = True
    finally:
        await stream.aclose()
    if not accepted:
        return
    logger.info("the leader's stream ended after it accepted us; asking it again")
    retry = await ask_again()
    try:
        async for message in retry:
            # a leader still looking accepts us anew: matchmaking already knows that, so pass on only what follows
            if message.code != averaging_pb2.ACCEPTED:
                yield message
                return
    finally:
        await retry.aclose()


class RejoiningStub:
    """A stub of our averager's RPCs whose rpc_join_group asks again once if the leader's stream is cut off
    (ask_again_if_cut_off); every other RPC is the wrapped stub's."""

    def __init__(self, stub):
        self._stub = stub

    def __getattr__(self, name: str):
        return getattr(self._stub, name)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, timeout: float | None = None
    ) -> Messages:
        stream = await self._stub.rpc_join_group(request, timeout=timeout)
        return ask_again_if_cut_off(stream, lambda: self._stub.rpc_join_group(request, timeout=timeout))
