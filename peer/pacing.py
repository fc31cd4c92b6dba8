"""Keeps one sender's streams to a group's reducers in step: no stream hands part i + 1 to its transport before every
other stream of that sender has handed over part i.

Why: a reducer averages part i only once every sender's part i has arrived, and reads a sender's part i + 1 only
after that. A sender's k - 1 TCP flows share its uplink, and TCP does not advance them evenly; a flow that runs
ahead takes uplink from the one that lags, and every reducer waiting on the lagging one idles its own uplink
(measured at k = 8 on 100 Mbit/s links: uplinks idle 0.3-0.4 s in the middle of an all-reduce). With the kernel's
unsent buffer kept small (direct_transport sets TCP_NOTSENT_LOWAT), "handed to the transport" is close to "on
the wire", so keeping the hand-overs in step keeps the flows in step.

A wait is bounded (max_wait_s): pacing only orders the sends, it must never be why a round is late. A stream that
made another wait that long is stalled (its reducer is still finishing its inner steps, or stopped reading: the
reducer timeout's business) and holds nobody back until it hands over its next part. With one slow reducer
(a slow downlink), a sender's other streams go at the pace of the stream to it: the round cannot end before that
stream does anyway.
"""

from __future__ import annotations

import asyncio

MAX_WAIT_S = 1.0


class StreamPacer:
    """The hand-over counts of one sender's streams (one per reducer, keyed by the reducer's index)."""

    def __init__(self, *, max_wait_s: float = MAX_WAIT_S) -> None:
        self.max_wait_s = max_wait_s
        self._num_sent: dict[int, int] = {}
        """Per open stream: how many of its parts it handed to its transport."""
        self._stalled: set[int] = set()
        """Open streams that held another back for max_wait_s and have not handed over a part since."""
        self._changed = asyncio.Event()
        """Set (and replaced) whenever a count or the set of streams changes."""
        self.num_waits = 0
        """How often a stream waited for another (for the stats)."""

    def open(self, stream: int) -> None:
        self._num_sent[stream] = 0

    def _lagging(self, stream: int, part_index: int) -> list[int]:
        """The streams that must hand over more parts before `stream` may hand over part `part_index`."""
        return [
            other
            for other, num_sent in self._num_sent.items()
            if num_sent < part_index and other != stream and other not in self._stalled
        ]

    async def wait_turn(self, stream: int, part_index: int) -> None:
        """Wait (at most max_wait_s) until every other stream has handed over parts 0 .. part_index - 1."""
        if not self._lagging(stream, part_index):
            return
        self.num_waits += 1
        try:
            async with asyncio.timeout(self.max_wait_s):
                while self._lagging(stream, part_index):
                    await self._changed.wait()
        except TimeoutError:
            self._stalled.update(self._lagging(stream, part_index))
            self._notify()

    def sent(self, stream: int) -> None:
        """The stream handed one more part to its transport."""
        self._num_sent[stream] += 1
        self._stalled.discard(stream)
        self._notify()

    def close(self, stream: int) -> None:
        """The stream ended (all parts sent, or it failed): it holds nobody back."""
        self._num_sent.pop(stream, None)
        self._stalled.discard(stream)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
