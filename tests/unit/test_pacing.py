"""StreamPacer offline (asyncio, no network): a sender's streams hand over their parts in step, a stream that lags
too long stops holding the others back until it moves again, and no interleaving of transports deadlocks it."""

from __future__ import annotations

import asyncio
import random

import pytest

from peer.pacing import StreamPacer


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30.0))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_stream_waits_for_the_others_to_hand_over_the_previous_part():
    async def scenario():
        pacer = StreamPacer(max_wait_s=30.0)
        for stream in (0, 1, 2):
            pacer.open(stream)
        await pacer.wait_turn(0, 0)  # part 0 never waits
        pacer.sent(0)
        ahead = asyncio.create_task(pacer.wait_turn(0, 1))
        await settle()
        assert not ahead.done()  # streams 1 and 2 have not handed over part 0
        pacer.sent(1)
        await settle()
        assert not ahead.done()  # stream 2 still has not
        pacer.close(2)  # it ended (failed): it holds nobody back
        await settle()
        assert ahead.done() and pacer.num_waits == 1

    run(scenario())


def test_a_stream_that_lags_too_long_holds_nobody_back_until_it_moves_again():
    async def scenario():
        pacer = StreamPacer(max_wait_s=0.05)
        for stream in (0, 1):
            pacer.open(stream)
        pacer.sent(0)
        await pacer.wait_turn(0, 1)  # stream 1 (a reducer still on its way) never hands over part 0: gives up
        pacer.sent(0)
        waits = pacer.num_waits
        await pacer.wait_turn(0, 2)  # stream 1 is stalled: no wait at all
        assert pacer.num_waits == waits
        pacer.sent(0)
        pacer.sent(1)  # it moved: from now on it holds the others back again
        blocked = asyncio.create_task(pacer.wait_turn(0, 3))
        await settle()
        assert not blocked.done()
        pacer.sent(1)
        pacer.sent(1)
        await settle()
        assert blocked.done()

    run(scenario())


@pytest.mark.parametrize("seed", range(20))
def test_random_transports_finish_and_every_hand_over_is_in_step(seed):
    """Streams of uneven lengths whose transports take random times: every stream finishes, and whenever one hands
    over part i, every other open stream that is not stalled has handed over parts 0 .. i - 1."""
    rng = random.Random(seed)
    num_parts = [rng.randint(1, 6) for _ in range(rng.randint(1, 7))]
    violations = []

    async def scenario():
        pacer = StreamPacer(max_wait_s=30.0)  # long: with no stall, nothing may give up

        async def stream(index: int, parts: int) -> None:
            pacer.open(index)
            try:
                for part_index in range(parts):
                    await pacer.wait_turn(index, part_index)
                    lagging = [o for o, n in pacer._num_sent.items() if o != index and n < part_index]
                    if lagging:
                        violations.append((index, part_index, lagging))
                    for _ in range(rng.randint(0, 4)):  # the transport takes a while
                        await asyncio.sleep(0)
                    pacer.sent(index)
            finally:
                pacer.close(index)

        await asyncio.gather(*(stream(index, parts) for index, parts in enumerate(num_parts)))

    run(scenario())
    assert violations == []
