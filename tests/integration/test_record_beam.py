"""Record lookups and stores with a beam of RECORD_BEAM_SIZE nodes (peer/swarm.py) instead of hivemind's 20: every
node a lookup visits answers with the whole key (all k records), so the beam is what a lookup costs. These tests
check, on 8 real DHT nodes on 127.0.0.1, that the narrow beam still finds every peer's record from every node, and
that it visits fewer nodes than hivemind's default beam."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os

from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.utils import get_dht_time

from peer.records import RECORD_BEAM_SIZE

NUM_NODES = 8  # more than the beam, fewer than hivemind's 20
KEY = "test_record_beam"


def count_finds(monkeypatch) -> list[int]:
    """A one-item list counting the find requests any node of this process serves (a lookup visits one node per
    find request). Patched before the nodes start: hivemind binds the handlers when a node starts."""
    served = [0]
    original = DHTProtocol.rpc_find

    @functools.wraps(original)  # hivemind reads the handler's type annotations
    async def rpc_find(self, request, context):
        served[0] += 1
        return await original(self, request, context)

    monkeypatch.setattr(DHTProtocol, "rpc_find", rpc_find)
    return served


async def start_nodes(count: int) -> list[DHTNode]:
    first = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    maddrs = [str(a) for a in await first.get_visible_maddrs()]
    others = await asyncio.gather(
        *(
            DHTNode.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            for _ in range(count - 1)
        )
    )
    return [first, *others]


async def finds_per_lookup(nodes: list[DHTNode], served: list[int], **beam) -> list[int]:
    counts = []
    for reader in nodes:
        before = served[0]
        await reader.get(KEY, latest=True, **beam)
        counts.append(served[0] - before)
    return counts


def test_a_narrow_beam_finds_every_record_from_every_node_and_visits_fewer_nodes(monkeypatch):
    served = count_finds(monkeypatch)

    async def scenario():
        nodes = await start_nodes(NUM_NODES)
        try:
            subkeys = [os.urandom(16) for _ in nodes]
            for node, subkey in zip(nodes, subkeys, strict=True):
                assert await node.store(
                    KEY, b"progress", get_dht_time() + 60, subkey=subkey, beam_size=RECORD_BEAM_SIZE
                )
            for reader in nodes:
                found = await reader.get(KEY, latest=True, beam_size=RECORD_BEAM_SIZE)
                assert found is not None and set(found.value) == set(subkeys)
            narrow = await finds_per_lookup(nodes, served, beam_size=RECORD_BEAM_SIZE)
            default = await finds_per_lookup(nodes, served)
            return narrow, default
        finally:
            with contextlib.suppress(Exception):
                await asyncio.gather(*(node.shutdown() for node in nodes))

    narrow, default = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert max(narrow) <= RECORD_BEAM_SIZE, narrow
    assert min(default) >= NUM_NODES - 1, default  # hivemind's beam of 20 visits every other node
