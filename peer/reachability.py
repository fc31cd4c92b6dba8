"""Is this peer reachable from the internet? Other peers dial it back with a fresh connection and say whether that
worked; the answer decides whether the peer may reduce shards and serve state, or must stay outgoing-only.

A reused connection would always succeed, so the peer that checks dials from a short-lived probe p2p daemon of its
own with relays off and nothing listening (as Petals does). Both sides run inside hivemind's DHT process through
`DHT.run_coroutine`: `serve_reachability_checks` registers the handler (peers and bootstrap nodes serve it),
`ask_peers_to_dial_back` asks. A peer nobody could dial reserves a slot on a relay (peer/relay.py) and asks again, this
time to be dialed through the relay: if that works it is `relayed`. Written against hivemind 1.1.12.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from functools import partial

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import dht_pb2
from hivemind.utils.multiaddr import Multiaddr

from peer.relay import circuit_address

logger = logging.getLogger(__name__)

HANDLER = "diloco.reachability.check"
DIAL_TIMEOUT_S = 5.0
"""How long a checker tries to open a fresh connection to the asking peer."""
ASK_TIMEOUT_S = 30.0
"""How long the asking peer waits for one answer (the checker starts a p2p daemon first)."""
CHECK_TIMEOUT_S = 60.0
"""The longest a whole check may take (at start, before the peer trains)."""
RELAY_RETRY_S = 2.0
"""Pause between relayed checks while the relay slot may not be reserved yet."""
MAX_CHECKERS = 3
MAX_ADDRESSES = 8
"""A request names at most this many addresses to dial (it comes from a stranger)."""
REACHABILITY = ("direct", "relayed", "outgoing-only", "unknown")


@dataclass(frozen=True)
class Reachability:
    kind: str
    """direct, relayed, outgoing-only or unknown (see REACHABILITY)."""
    line: str
    """What the peer tells its user, in one line."""


def classify(
    *,
    client_mode: bool,
    answers: list[bool | None],
    relay_addresses: list[str],
    relayed_answers: list[bool | None] = (),
) -> Reachability:
    """The peer's reachability from the checkers' answers (True: they could dial it; None: no answer); with
    `relayed_answers`, those of a second check through the relays in `relay_addresses`."""
    if client_mode:
        return Reachability("outgoing-only", "reachability: outgoing-only (--client-mode): this peer sends its "
                            "updates every round but does not reduce shards or serve state")  # fmt: skip
    heard = [a for a in answers if a is not None]
    if any(heard):
        return Reachability(
            "direct", f"reachability: direct ({sum(heard)} of {len(heard)} peers could dial this peer)"
        )
    if not heard:
        return Reachability(
            "unknown",
            "reachability: unknown (no other peer answered the check; the first peers of a swarm cannot be "
            "checked); if this machine is behind a router without port forwarding, restart with --client-mode",
        )
    if relay_addresses and any(relayed_answers):
        return Reachability(
            "relayed",
            f"reachability: relayed through {relay_addresses[0]} (no peer could dial this peer directly; "
            f"{sum(a is True for a in relayed_answers)} could through the relay); it sends its updates every round "
            "but does not reduce shards or serve state",
        )
    return Reachability(
        "outgoing-only",
        f"reachability: outgoing-only (none of {len(heard)} peers could dial this peer: behind NAT or a firewall); "
        "it sends its updates every round but does not reduce shards or serve state. Forward a port and pass "
        "--announce-maddrs to contribute more",
    )


def own_addresses(maddrs: list[str]) -> list[str]:
    """The addresses to ask checkers to dial: this peer's own (no relay circuits), without /p2p/<id>, at most
    MAX_ADDRESSES."""
    found = []
    for text in maddrs:
        if "/p2p-circuit" in text:
            continue  # a relay's address, not ours: the check is about direct dials
        text = text.split("/p2p/")[0]
        if text not in found:
            found.append(text)
    return found[:MAX_ADDRESSES]


def relay_circuits(relays: list[str]) -> list[str]:
    """`<relay>/p2p-circuit` for each relay address with a peer id: where a checker dials us through a relay."""
    return [f"{m}/p2p-circuit" for m in relays if "/p2p/" in m and "/p2p-circuit" not in m][:MAX_ADDRESSES]


def addresses_to_dial(requested: list[str], connection_hosts: set[str]) -> list[str]:
    """Of the addresses a peer asks us to dial, those on a host it is connected to us from. A checker never dials
    anything else (a stranger must not make it connect to arbitrary hosts); a peer behind NAT connects from its
    router's address and names its private one, so nothing is dialed and the answer is "not reachable"."""
    allowed = []
    for text in requested[:MAX_ADDRESSES]:
        parts = text.split("/")
        if (
            len(parts) >= 5
            and parts[1] in ("ip4", "ip6")
            and parts[2] in connection_hosts
            and parts[3] == "tcp"
        ):
            allowed.append(text)
    return allowed


def circuit_relay_id(text: str) -> str | None:
    """The relay's peer id in `/ip4/H/tcp/P/p2p/<relay id>/p2p-circuit`, else None."""
    head, sep, tail = text.partition("/p2p/")
    relay_id, _, rest = tail.partition("/")
    parts = head.split("/")
    if not sep or rest != "p2p-circuit" or not 0 < len(relay_id) <= 128 or len(parts) != 5:
        return None
    return relay_id if parts[1] in ("ip4", "ip6") and parts[3] == "tcp" else None


def circuits_to_dial(requested: list[str], relay_hosts: dict[str, set[str]]) -> list[str]:
    """Of the relay circuits a peer asks us to dial it through, those whose relay we are connected to, on a host we
    are connected to it on (as for direct addresses: a stranger must not make us connect to arbitrary hosts)."""
    allowed = []
    for text in requested[:MAX_ADDRESSES]:
        relay_id = circuit_relay_id(text)
        if relay_id is not None and addresses_to_dial(
            [text.partition("/p2p/")[0]], relay_hosts.get(relay_id, set())
        ):
            allowed.append(text)
    return allowed


async def serve_reachability_checks(_dht, node) -> None:
    """Run in the DHT process: answer other peers' reachability checks (one at a time)."""
    busy = asyncio.Lock()

    async def check(request: dht_pb2.FindRequest, context: P2PContext) -> dht_pb2.PingResponse:
        if busy.locked():
            raise RuntimeError("busy with another check")  # the asker reads it as no answer
        async with busy:
            requested = [key.decode(errors="replace") for key in request.keys[:MAX_ADDRESSES]]
            circuits = [text for text in requested if "/p2p-circuit" in text]
            if circuits:  # dial it through its relays (which we must be connected to)
                relay_hosts = {}
                for relay_id in {circuit_relay_id(text) for text in circuits} - {None}:
                    try:
                        relay_hosts[relay_id] = await _connection_hosts(
                            node.p2p, PeerID.from_base58(relay_id)
                        )
                    except Exception:  # not a peer id
                        continue
                available = await _dial_back(
                    context.remote_id, circuits_to_dial(circuits, relay_hosts), relayed=True
                )
                return dht_pb2.PingResponse(available=available)
            hosts = await _connection_hosts(node.p2p, context.remote_id)
            if not hosts:
                raise RuntimeError("no direct connection to the asking peer")  # e.g. relayed: no answer
            available = await _dial_back(context.remote_id, addresses_to_dial(requested, hosts))
        return dht_pb2.PingResponse(available=available)

    await node.p2p.add_protobuf_handler(HANDLER, check, dht_pb2.FindRequest)


async def _connection_hosts(p2p: P2P, peer_id: PeerID) -> set[str]:
    """The IP addresses our connections to a peer come from."""
    hosts = set()
    for info in await p2p.list_peers():
        if info.peer_id == peer_id:
            for addr in info.addrs:
                parts = str(addr).split("/")
                if len(parts) >= 3 and parts[1] in ("ip4", "ip6") and "/p2p-circuit" not in str(addr):
                    hosts.add(parts[2])
    return hosts


async def _dial_back(peer_id: PeerID, addresses: list[str], *, relayed: bool = False) -> bool:
    maddrs = []
    for text in addresses:
        try:
            maddrs.append(circuit_address(text.removesuffix("/p2p-circuit")) if relayed else Multiaddr(text))
        except Exception:  # a stranger's garbage
            continue
    if not maddrs:
        return False  # none of its addresses is where it connects from: behind NAT
    probe = await P2P.create(
        use_relay=relayed,
        auto_nat=False,
        nat_port_map=False,
        no_listen=True,
        dht_mode="client",
        host_maddrs=[],
    )
    try:
        await asyncio.wait_for(probe._client.connect(peer_id, maddrs), DIAL_TIMEOUT_S)
        return True
    except Exception as e:  # unreachable: refused, timed out, no route
        logger.debug(f"dial-back to {peer_id} failed: {e!r}")
        return False
    finally:
        await probe.shutdown()


async def ask_peers_to_dial_back(
    _dht, node, *, maddrs: list[str], relayed: bool = False
) -> list[bool | None]:
    """Run in the DHT process: ask known peers, one at a time, to dial us at `maddrs`, until one could or
    MAX_CHECKERS have answered (each check starts a probe daemon on the checker: ask few). True/False per answer,
    None for a peer that did not answer (it does not serve checks, is busy, or timed out). `relayed`: `maddrs` are
    relay circuits (relay_circuits) to be dialed through."""
    me = node.peer_id
    candidates = [pid for pid in node.protocol.routing_table.peer_id_to_uid if pid != me]
    random.shuffle(candidates)
    addresses = relay_circuits(maddrs) if relayed else own_addresses(maddrs)
    request = dht_pb2.FindRequest(keys=[m.encode() for m in addresses])
    answers: list[bool | None] = []
    deadline = asyncio.get_running_loop().time() + CHECK_TIMEOUT_S
    for peer in candidates[: 3 * MAX_CHECKERS]:
        remaining_s = deadline - asyncio.get_running_loop().time()
        if remaining_s <= 0:
            break
        try:
            response = await asyncio.wait_for(
                node.p2p.call_protobuf_handler(peer, HANDLER, request, dht_pb2.PingResponse),
                min(ASK_TIMEOUT_S, remaining_s),
            )
            answers.append(bool(response.available))
        except Exception as e:
            logger.debug(f"reachability check by {peer} failed: {e!r}")
            answers.append(None)
        if any(answers) or sum(a is not None for a in answers) >= MAX_CHECKERS:
            break
    return answers


def check_reachability(dht, *, client_mode: bool) -> Reachability:
    """Serve other peers' checks from now on and find out how this peer is reached (blocks for the check)."""
    if client_mode:  # a client cannot serve checks (nobody can dial it) and needs none
        return classify(client_mode=True, answers=[], relay_addresses=[])
    try:
        dht.run_coroutine(serve_reachability_checks)
        maddrs = [str(m) for m in dht.get_visible_maddrs(latest=True)]
        if maddrs and all(_is_loopback(m) for m in maddrs):
            # every peer that could reach us runs on this machine (a local swarm, a test): no NAT in between
            return Reachability("direct", "reachability: direct (listening on loopback only; not checked)")
        answers = dht.run_coroutine(partial(ask_peers_to_dial_back, maddrs=maddrs))
    except Exception as e:  # a failed check is no reason not to train
        logger.warning(f"reachability check failed: {e!r}")
        maddrs, answers = [], []
    return classify(client_mode=False, answers=answers, relay_addresses=[])


def check_relayed(dht, *, relays: list[str]) -> Reachability:
    """After the check found nobody could dial us and the DHT restarted with a slot on `relays`: ask peers to dial us
    through them. `relayed` if one could, else `outgoing-only` (blocks for the check)."""
    answers = [False]  # the direct check's verdict, which got us here
    relayed_answers: list[bool | None] = []
    try:
        dht.run_coroutine(serve_reachability_checks)
        if relays:
            deadline = time.monotonic() + CHECK_TIMEOUT_S
            # the reservation is made in the background right after the daemon starts: retry briefly
            while not any(relayed_answers) and time.monotonic() < deadline:
                relayed_answers = dht.run_coroutine(
                    partial(ask_peers_to_dial_back, maddrs=relays, relayed=True)
                )
                if any(relayed_answers) or not any(a is False for a in relayed_answers):
                    break
                time.sleep(RELAY_RETRY_S)
    except Exception as e:  # a failed check is no reason not to train
        logger.warning(f"relayed reachability check failed: {e!r}")
    return classify(
        client_mode=False, answers=answers, relay_addresses=relays, relayed_answers=relayed_answers
    )


def _is_loopback(maddr: str) -> bool:
    return maddr.startswith(("/ip4/127.", "/ip6/::1/"))
