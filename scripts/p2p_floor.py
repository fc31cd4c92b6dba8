"""The p2p daemon's floor under an all-reduce: each peer streams the bytes it would send as a sender to every
other peer through hivemind's P2P (the daemon the averager uses) and gets each message echoed back, as a
reducer's reply would come. No tensor serialization, no reduction, no codec: whatever an all-reduce built on
hivemind's p2pd moves, it costs at least this. Used by bench_allreduce.py (column "p2p s")."""

from __future__ import annotations

import asyncio
import time

HANDLER = "p2p_floor_echo"
HANG_UP_TIMEOUT_S = 60.0
DISCOVERY_TIMEOUT_S = 60.0


async def _echo(requests, _context):
    async for message in requests:
        yield message
    await asyncio.sleep(
        HANG_UP_TIMEOUT_S
    )  # keep our end open until the caller hangs up (see peer/allreduce.py)


async def _stream_to(p2p, peer_id, message, num_messages: int) -> None:
    from hivemind.proto import averaging_pb2

    async def requests():
        for _ in range(num_messages):
            yield message

    stream = await p2p.iterate_protobuf_handler(peer_id, HANDLER, requests(), averaging_pb2.AveragingData)
    received = 0
    try:
        async for _ in stream:
            received += 1
            if received == num_messages:
                break
    finally:
        await stream.aclose()
    if received != num_messages:
        raise RuntimeError(f"p2p floor: {received} of {num_messages} echoes from {peer_id}")


async def _measure(dht, key, peer_index, num_peers, bytes_per_peer, part_bytes, barrier, repeats):
    from hivemind import DHT
    from hivemind.p2p import P2P

    # a fresh replica each time (dht.replicate_p2p() caches one per process, bound to the first event loop)
    p2p = await P2P.replicate(dht.run_coroutine(DHT._get_p2p_daemon_listen_maddr))
    try:
        return await _measure_with(
            p2p, dht, key, peer_index, num_peers, bytes_per_peer, part_bytes, barrier, repeats
        )
    finally:
        await p2p.shutdown()  # a replica: closes our connections, leaves the DHT's daemon running


async def _measure_with(p2p, dht, key, peer_index, num_peers, bytes_per_peer, part_bytes, barrier, repeats):
    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2, runtime_pb2
    from hivemind.utils import get_dht_time

    await p2p.add_protobuf_handler(
        HANDLER, _echo, averaging_pb2.AveragingData, stream_input=True, stream_output=True
    )
    dht.store(key, subkey=peer_index, value=p2p.peer_id.to_base58(), expiration_time=get_dht_time() + 600)
    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while True:
        found = dht.get(key, latest=True)
        peers = {} if found is None else {k: v.value for k, v in found.value.items()}
        if len(peers) == num_peers:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"p2p floor: found {len(peers)} of {num_peers} peers")
        await asyncio.sleep(0.1)
    others = [PeerID.from_base58(v) for k, v in sorted(peers.items()) if k != peer_index]
    num_messages = max(1, -(-bytes_per_peer // part_bytes))
    message = averaging_pb2.AveragingData(
        code=averaging_pb2.PART_FOR_AVERAGING, tensor_part=runtime_pb2.Tensor(buffer=b"\0" * part_bytes)
    )
    times = []
    for _ in range(repeats + 1):  # the first one opens connections and grows the windows
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 120)
        started = time.perf_counter()
        await asyncio.gather(*[_stream_to(p2p, peer, message, num_messages) for peer in others])
        times.append(time.perf_counter() - started)
    await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 120)  # nobody leaves mid-echo
    await p2p.remove_protobuf_handler(HANDLER, stream_input=True, stream_output=True)
    return times[1:]


def measure(
    dht,
    *,
    key: str,
    peer_index: int,
    num_peers: int,
    bytes_to_each: int,
    part_bytes: int,
    barrier,
    repeats: int,
):
    """Seconds per repetition for this peer to stream `bytes_to_each` bytes to every other peer and get them back."""
    return asyncio.run(_measure(dht, key, peer_index, num_peers, bytes_to_each, part_bytes, barrier, repeats))
