"""Circuit relays with hivemind 1.1.12's p2pd: the two workarounds that make a peer behind NAT reachable through a relay
(scripts/repro_relay.py shows both failures), and the daemon options of a peer that uses its bootstrap nodes as relays.
"""

from __future__ import annotations

import threading

import base58
from hivemind.p2p import P2P
from hivemind.utils.multiaddr import Multiaddr

P2P_CODE = 421
P2P_CIRCUIT_CODE = 290
_patch_lock = threading.Lock()
_patched = False


class RawMaddr:
    """A multiaddr as p2pd reads it. hivemind's Multiaddr.to_bytes() writes /p2p/<id> as a CIDv1, which go-multiaddr
    rejects ("length greater than remaining number of bytes in buffer"); libp2p's binary form is the bare multihash."""

    def __init__(self, text: str, data: bytes):
        self.text, self.data = text, data

    def to_bytes(self) -> bytes:
        return self.data

    def __str__(self) -> str:
        return self.text


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def circuit_address(relay_maddr: str) -> RawMaddr:
    """`<relay address>/p2p/<relay id>/p2p-circuit`, to dial a peer through that relay (ValueError if malformed)."""
    base, sep, relay_id = str(relay_maddr).partition("/p2p/")
    relay_id = relay_id.split("/")[0]
    if not sep or not relay_id:
        raise ValueError(f"a relay address needs /p2p/<peer id>: {relay_maddr}")
    multihash = base58.b58decode(relay_id)
    data = Multiaddr(base).to_bytes() + _varint(P2P_CODE) + _varint(len(multihash)) + multihash
    return RawMaddr(f"{base}/p2p/{relay_id}/p2p-circuit", data + _varint(P2P_CIRCUIT_CODE))


def patch_p2pd_relay_discovery() -> None:
    """Make p2pd reserve a slot on its trusted relays at once. With -autoRelay, p2pd defaults to -relayDiscovery=1:
    the trusted relays are then one candidate of the at least 4 that go-libp2p's autorelay wants, and it waits out its
    3-minute boot delay first. hivemind.P2P.create cannot pass the flag, so this adds -relayDiscovery=0 to the daemon's
    arguments whenever trusted relays are given (in this process and in the DHT processes it forks)."""
    global _patched
    with _patch_lock:
        if _patched:
            return
        original = P2P._make_process_args

        def make_process_args(*args, **kwargs):
            if kwargs.get("autoRelay") and kwargs.get("trustedRelays"):
                kwargs.setdefault("relayDiscovery", False)
            return original(*args, **kwargs)

        P2P._make_process_args = staticmethod(make_process_args)
        _patched = True


def relay_options(initial_peers: list[str]) -> dict:
    """hivemind.DHT keyword arguments of a peer nobody can dial: reserve a slot on the initial peers (bootstrap nodes,
    which serve as relays) and use it at once (it knows it is private: the reachability check said so)."""
    patch_p2pd_relay_discovery()
    relays = [m for m in initial_peers if "/p2p/" in m and "/p2p-circuit" not in m]
    if not relays:
        return {}
    return {
        "use_relay": True,
        "use_auto_relay": True,
        "trusted_relays": relays,
        "force_reachability": "private",
    }
