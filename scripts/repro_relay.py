"""Relayed connections with hivemind 1.1.12's p2pd, on 127.0.0.1: a relay, a peer that listens nowhere (as if behind
NAT) with auto-relay through it, and a dialer that reaches that peer through the relay and calls a handler.

Shows the two causes of the earlier failures and that relaying works once both are avoided:
  --encoding hivemind   the circuit address as hivemind's Multiaddr encodes it: /p2p/<id> goes out as a CIDv1, which
                        p2pd's go-multiaddr reads as a multihash ("length greater than remaining number of bytes in
                        buffer"); --encoding multihash sends the raw multihash, as libp2p specifies.
  --discovery on        p2pd's default for -autoRelay: -relayDiscovery=1, where the trusted relay is one candidate among
                        at least 4 wanted, so go-libp2p waits out its 3-minute boot delay before reserving a slot; with
                        --discovery off (-relayDiscovery=0) the trusted relays are static and reserved at once.

Usage: python scripts/repro_relay.py [--encoding hivemind|multihash] [--discovery on|off] [--mib N]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hivemind.p2p import P2P, P2PContext  # noqa: E402
from hivemind.proto import dht_pb2, runtime_pb2  # noqa: E402
from hivemind.utils.multiaddr import Multiaddr  # noqa: E402

from peer.relay import circuit_address, patch_p2pd_relay_discovery  # noqa: E402


async def echo(stream, _context: P2PContext):
    async for message in stream:
        yield message


async def ping(_request: dht_pb2.PingRequest, _context: P2PContext) -> dht_pb2.PingResponse:
    return dht_pb2.PingResponse(available=True)


async def run(args) -> int:
    relay = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], force_reachability="public")
    relay_maddr = str((await relay.get_visible_maddrs())[0])
    print(f"relay: {relay_maddr}")
    behind = await P2P.create(
        initial_peers=[relay_maddr],
        host_maddrs=[],
        no_listen=True,
        use_auto_relay=True,
        trusted_relays=[relay_maddr],
        force_reachability="private",
    )
    await behind.add_protobuf_handler("ping", ping, dht_pb2.PingRequest)
    await behind.add_protobuf_handler("echo", echo, runtime_pb2.Tensor, stream_input=True, stream_output=True)
    await relay.add_protobuf_handler("echo", echo, runtime_pb2.Tensor, stream_input=True, stream_output=True)
    dialer = await P2P.create(initial_peers=[relay_maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    if args.encoding == "hivemind":
        address = Multiaddr(f"{relay_maddr}/p2p-circuit")
    else:
        address = circuit_address(relay_maddr)
    print(
        f"dialing {behind.peer_id} at {relay_maddr}/p2p-circuit ({args.encoding} encoding: {address.to_bytes().hex()})"
    )
    status = 1
    try:
        started = time.monotonic()
        for attempt in range(args.attempts):
            try:
                await asyncio.wait_for(dialer._client.connect(behind.peer_id, [address]), 10)
                break
            except Exception as e:
                print(f"  connect attempt {attempt + 1}: {type(e).__name__}: {e}")
                await asyncio.sleep(2)
        else:
            print(f"FAILED: no relayed connection after {time.monotonic() - started:.0f} s")
            return 1
        print(f"connected through the relay after {time.monotonic() - started:.1f} s")
        response = await asyncio.wait_for(
            dialer.call_protobuf_handler(behind.peer_id, "ping", dht_pb2.PingRequest(), dht_pb2.PingResponse),
            10,
        )
        print(f"unary call through the relay: available={response.available}")
        payload = runtime_pb2.Tensor(buffer=b"x" * (1 << 20))

        async def chunks():
            for _ in range(args.mib):
                yield payload

        for name, target in (("relayed", behind.peer_id), ("direct", relay.peer_id)):
            started, received = time.monotonic(), 0
            async for message in await dialer.iterate_protobuf_handler(
                target, "echo", chunks(), runtime_pb2.Tensor
            ):
                received += len(message.buffer)
            elapsed = time.monotonic() - started
            print(
                f"{name}: echoed {received / 2**20:.0f} MiB in {elapsed:.2f} s ({received / 2**20 / elapsed:.0f} MiB/s)"
            )
        status = 0
    finally:
        for p2p in (dialer, behind, relay):
            await p2p.shutdown()
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoding", choices=["hivemind", "multihash"], default="multihash")
    parser.add_argument("--discovery", choices=["on", "off"], default="off")
    parser.add_argument("--attempts", type=int, default=5)
    parser.add_argument("--mib", type=int, default=16)
    args = parser.parse_args()
    if args.discovery == "off":
        patch_p2pd_relay_discovery()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
