"""What one record operation costs in DHT traffic as the swarm grows: k hivemind DHT nodes on 127.0.0.1 (one
process, one p2p daemon each), every node holding its own record under one key, as every peer's progress record
is held in the swarm. Reported per k: the bytes of the DHT requests and responses (their protobuf sizes, summed over
every node that took part) caused by one store of a record and by one read of the whole key, with hivemind's
default beam (bucket_size = 20 nodes) and with the beam peer/swarm.py uses (RECORD_BEAM_SIZE), and how many of
the k records a read found.

    python scripts/bench_dht.py                      # k = 4, 8, 16, 32
    python scripts/bench_dht.py --peers 8,64 --reads 5

Records are random bytes of the sizes of a signed progress record (its value with the signature, its subkey with the
owner's public key), so that the figures are this project's. Why this matters: every node a lookup visits answers
with the whole key, all k records, so a lookup costs (nodes visited) x k x record size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hivemind.dht.node import DHTNode  # noqa: E402
from hivemind.dht.protocol import DHTProtocol  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402

from peer.records import RECORD_BEAM_SIZE  # noqa: E402

VALUE_BYTES = 525  # a signed ProgressRecord (msgpack fields + "[signature:...]")
SUBKEY_BYTES = 391  # "[owner:<RSA public key>]"
KEY = "bench_dht_progress"


class Counter:
    """Bytes of every DHT request and response served by any node of this process (servers see both)."""

    def __init__(self):
        self.bytes = 0
        self.calls = []

    def install(self) -> None:
        counter = self
        for name in ("rpc_find", "rpc_store", "rpc_ping"):
            original = getattr(DHTProtocol, name)

            @functools.wraps(original)  # hivemind reads the handler's type annotations
            async def counted(self, request, context, _original=original):
                response = await _original(self, request, context)
                size = request.ByteSize() + (response.ByteSize() if response is not None else 0)
                counter.bytes += size
                counter.calls.append((_original.__name__, size))
                return response

            setattr(DHTProtocol, name, counted)


async def settle(seconds: float) -> None:
    await asyncio.sleep(seconds)  # let background cache stores and pings finish before reading the counter


async def measure_k(k: int, counter: Counter, *, reads: int) -> dict:
    first = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], cache_refresh_before_expiry=0)
    maddrs = [str(a) for a in await first.get_visible_maddrs()]
    nodes = [first]
    nodes += await asyncio.gather(
        *(
            DHTNode.create(
                initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], cache_refresh_before_expiry=0
            )
            for _ in range(k - 1)
        )
    )
    try:
        expiration = get_dht_time() + 600
        for node in nodes:  # every peer's record under the key
            await node.store(KEY, os.urandom(VALUE_BYTES), expiration, subkey=os.urandom(SUBKEY_BYTES))
        for node in nodes:  # every node reads once, as peers do, so caches fill as they would
            await node.get(KEY, latest=True)
        await settle(1.0)
        row, stored = {"k": k}, k
        for label, beam in (("default", None), ("beam", RECORD_BEAM_SIZE)):
            extra = {} if beam is None else {"beam_size": beam}
            store_bytes, get_bytes, found = [], [], []
            for i in range(reads):
                node = nodes[i % k]
                subkey = os.urandom(SUBKEY_BYTES)
                counter.bytes, counter.calls = 0, []
                await node.store(KEY, os.urandom(VALUE_BYTES), get_dht_time() + 600, subkey=subkey, **extra)
                stored += 1
                await settle(0.3)
                store_bytes.append(counter.bytes)
                if os.environ.get("DEBUG"):
                    print("store", label, k, counter.calls, file=sys.stderr)
                reader = nodes[(i + k // 2) % k]
                counter.bytes = 0
                counter.calls = []
                result = await reader.get(KEY, latest=True, **extra)
                await settle(0.3)
                if os.environ.get("DEBUG"):
                    print(label, k, counter.calls, file=sys.stderr)
                get_bytes.append(counter.bytes)
                found.append((len(result.value) if result is not None else 0) / stored)
            row[label] = {
                "store_kb": statistics.median(store_bytes) / 1e3,
                "get_kb": statistics.median(get_bytes) / 1e3,
                "found": min(found),
            }
        return row
    finally:
        await asyncio.gather(*(node.shutdown() for node in nodes), return_exceptions=True)


def print_row(row: dict) -> None:
    d, b = row["default"], row["beam"]
    print(
        f"{row['k']:>4} | {d['store_kb']:>9.1f} {d['get_kb']:>9.1f} {d['found']:>6.0%} | "
        f"{b['store_kb']:>9.1f} {b['get_kb']:>9.1f} {b['found']:>6.0%} | "
        f"{d['get_kb'] / max(b['get_kb'], 1e-9):>5.1f}x",
        flush=True,
    )


async def main_async(args) -> None:
    counter = Counter()
    counter.install()
    print(f"record: {VALUE_BYTES} B value + {SUBKEY_BYTES} B subkey; beam = {RECORD_BEAM_SIZE}")
    print("   k | default beam: store KB  read KB  found | our beam: store KB  read KB  found | read cut")
    for k in args.peers:
        started = time.monotonic()
        row = await measure_k(k, counter, reads=args.reads)
        print_row(row)
        print(f"      ({time.monotonic() - started:.0f} s)", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", default="4,8,16,32", help="comma-separated k (default 4,8,16,32)")
    p.add_argument(
        "--reads", type=int, default=3, help="stores and reads measured per k and beam (default 3)"
    )
    args = p.parse_args(argv)
    try:
        args.peers = [int(x) for x in args.peers.split(",")]
    except ValueError:
        p.error("--peers takes comma-separated integers, e.g. 4,8,16")
    if any(k < 2 for k in args.peers) or args.reads < 1:
        p.error("every k must be at least 2, and --reads at least 1")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
