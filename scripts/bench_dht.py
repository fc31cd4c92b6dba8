"""What one record operation costs in DHT traffic as the swarm grows: k hivemind DHT nodes on 127.0.0.1 (one
process, one p2p daemon each), every node holding its own record under a key, as every peer's progress record is
held in the swarm. Reported per k: the bytes of the DHT requests and responses (their protobuf sizes, summed over
every node that took part) caused by one store of a record and by one read of the whole key, and which share of the
records the read found, for three setups measured in the same run:

- before: hivemind's default beam (bucket_size = 20 nodes) and records signed with hivemind's RSA keys;
- beam: the beam peer/swarm.py uses (RECORD_BEAM_SIZE), RSA records;
- ours: that beam and Ed25519 records (peer/signing.py), as the peers run now.

    python scripts/bench_dht.py                      # k = 4, 8, 16, 32
    python scripts/bench_dht.py --peers 8,64 --reads 5

Records are random bytes of the sizes of a signed progress record under each scheme (the value with its signature,
the subkey with its owner's key, measured from the signers), so the figures are this project's. Why this matters:
every node a lookup visits answers with the whole key, all k records, so a lookup costs
(nodes visited) x k x record size, and each peer stores its record every progress period and reads the key about
as often.
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
from hivemind.dht.crypto import RSASignatureValidator  # noqa: E402
from hivemind.dht.node import DHTNode  # noqa: E402
from hivemind.dht.protocol import DHTProtocol  # noqa: E402
from hivemind.dht.validation import DHTRecord  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402
from hivemind.utils.serializer import MSGPackSerializer  # noqa: E402

from peer.records import RECORD_BEAM_SIZE, ProgressRecord  # noqa: E402
from peer.signing import RecordSigner  # noqa: E402


def record_sizes(signer) -> tuple[int, int]:
    """(value bytes with the signature, subkey bytes with the owner's key) of a signed progress record."""
    progress = ProgressRecord(
        peer_id=os.urandom(38), round=1234, inner_step=321, tokens=10**7, done=False, averaging=-1,
        scheduled_time=1.8e9, tokens_per_s=2500.5, eta=1.8e9, client_mode=False,
    )  # fmt: skip
    subkey = MSGPackSerializer.dumps(signer.local_public_key)
    record = DHTRecord(
        key=os.urandom(20),
        subkey=subkey,
        value=MSGPackSerializer.dumps(progress.dict()),
        expiration_time=1.8e9,
    )
    return len(signer.sign_value(record)), len(subkey)


RSA_SIZES = record_sizes(RSASignatureValidator(RSAPrivateKey()))
OURS_SIZES = record_sizes(RecordSigner())
SETUPS = {  # name: (beam size, (value bytes, subkey bytes))
    "before": (None, RSA_SIZES),
    "beam": (RECORD_BEAM_SIZE, RSA_SIZES),
    "ours": (RECORD_BEAM_SIZE, OURS_SIZES),
}


class Counter:
    """Bytes of every DHT request and response served by any node of this process (servers see both)."""

    def __init__(self):
        self.bytes = 0

    def install(self) -> None:
        counter = self
        for name in ("rpc_find", "rpc_store", "rpc_ping"):
            original = getattr(DHTProtocol, name)

            @functools.wraps(original)  # hivemind reads the handler's type annotations
            async def counted(self, request, context, _original=original):
                response = await _original(self, request, context)
                size = request.ByteSize() + (response.ByteSize() if response is not None else 0)
                counter.bytes += size
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
        row = {"k": k}
        for name, (beam, (value_bytes, subkey_bytes)) in SETUPS.items():
            key, extra = f"bench_dht_{name}", ({} if beam is None else {"beam_size": beam})
            expiration = get_dht_time() + 600
            for node in nodes:  # every peer's record under the key
                await node.store(
                    key, os.urandom(value_bytes), expiration, subkey=os.urandom(subkey_bytes), **extra
                )
            for node in nodes:  # every node reads once, as peers do, so that caches fill as they would
                await node.get(key, latest=True, **extra)
            await settle(1.0)
            stored, store_bytes, get_bytes, found = k, [], [], []
            for i in range(reads):
                counter.bytes = 0
                await nodes[i % k].store(
                    key,
                    os.urandom(value_bytes),
                    get_dht_time() + 600,
                    subkey=os.urandom(subkey_bytes),
                    **extra,
                )
                stored += 1
                await settle(0.3)
                store_bytes.append(counter.bytes)
                counter.bytes = 0
                result = await nodes[(i + k // 2) % k].get(key, latest=True, **extra)
                await settle(0.3)
                get_bytes.append(counter.bytes)
                found.append((len(result.value) if result is not None else 0) / stored)
            row[name] = {
                "store_kb": statistics.median(store_bytes) / 1e3,
                "get_kb": statistics.median(get_bytes) / 1e3,
                "found": min(found),
            }
        return row
    finally:
        await asyncio.gather(*(node.shutdown() for node in nodes), return_exceptions=True)


def print_row(row: dict) -> None:
    cells = " | ".join(
        f"{row[name]['store_kb']:>8.1f} {row[name]['get_kb']:>8.1f} {row[name]['found']:>5.0%}"
        for name in SETUPS
    )
    before, ours = row["before"], row["ours"]
    cut = (before["store_kb"] + before["get_kb"]) / max(ours["store_kb"] + ours["get_kb"], 1e-9)
    print(f"{row['k']:>4} | {cells} | {cut:>5.1f}x", flush=True)


async def main_async(args) -> None:
    counter = Counter()
    counter.install()
    print(
        f"progress record, value + subkey bytes: RSA {RSA_SIZES[0]} + {RSA_SIZES[1]}, "
        f"Ed25519 {OURS_SIZES[0]} + {OURS_SIZES[1]}; beam {RECORD_BEAM_SIZE} (hivemind's default 20)"
    )
    print("     | before (beam 20, RSA)   | beam 5, RSA             | ours (beam 5, Ed25519)  |")
    print("   k | store KB  read KB found | store KB  read KB found | store KB  read KB found | cut")
    for k in args.peers:
        started = time.monotonic()
        print_row(await measure_k(k, counter, reads=args.reads))
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
