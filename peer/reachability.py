"""Is this peer reachable from the internet? Other peers dial it back with a fresh connection and say whether that
worked; the answer decides whether the peer may reduce shards and serve state, or must stay outgoing-only.

A reused connection would always succeed, so the peer that checks dials from a short-lived probe p2p daemon of its
own with relays off and nothing listening (as Petals does). Both sides run inside hivemind's DHT process through
`DHT.run_coroutine`: `serve_reachability_checks` registers the handler, `ask_peers_to_dial_back` asks. Written
against hivemind 1.1.12.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from functools import partial

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import dht_pb2
from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)

HANDLER = "diloco.reachability.check"
DIAL_TIMEOUT_S = 5.0
"""How long a checker tries to open a fresh connection to the asking peer."""
ASK_TIMEOUT_S = 30.0
"""How long the asking peer waits for one answer (the checker starts a p2p daemon first)."""
CHECK_TIMEOUT_S = 60.0
"""The longest a whole check may take (at start, before the peer trains)."""
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


def classify(*, client_mode: bool, answers: list[bool | None], relay_addresses: list[str]) -> Reachability:
    """The peer's reachability from the checkers' answers (True: they could dial it; None: no answer)."""
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
    if relay_addresses:
        return Reachability("relayed", f"reachability: relayed through {relay_addresses[0]} (no peer could dial "
                            "this peer directly)")  # fmt: skip
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


async def serve_reachability_checks(_dht, node) -> None:
    """Run in the DHT process: answer other peers' reachability checks (one at a time)."""
    busy = asyncio.Lock()

    async def check(request: dht_pb2.FindRequest, context: P2PContext) -> dht_pb2.PingResponse:
        if busy.locked():
            raise RuntimeError("busy with another check")  # the asker reads it as no answer
        async with busy:
            requested = [key.decode(errors="replace") for key in request.keys[:MAX_ADDRESSES]]
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


async def _dial_back(peer_id: PeerID, addresses: list[str]) -> bool:
    maddrs = []
    for text in addresses:
        try:
            maddrs.append(Multiaddr(text))
        except Exception:  # a stranger's garbage
            continue
    if not maddrs:
        return False  # none of its addresses is where it connects from: behind NAT
    probe = await P2P.create(
        use_relay=False, auto_nat=False, nat_port_map=False, no_listen=True, dht_mode="client", host_maddrs=[]
    )
    try:
        await asyncio.wait_for(probe._client.connect(peer_id, maddrs), DIAL_TIMEOUT_S)
        return True
    except Exception as e:  # unreachable: refused, timed out, no route
        logger.debug(f"dial-back to {peer_id} failed: {e!r}")
        return False
    finally:
        await probe.shutdown()


async def ask_peers_to_dial_back(_dht, node, *, maddrs: list[str]) -> list[bool | None]:
    """Run in the DHT process: ask known peers, one at a time, to dial us at `maddrs`, until one could or
    MAX_CHECKERS have answered (each check starts a probe daemon on the checker: ask few). True/False per answer,
    None for a peer that did not answer (it does not serve checks, is busy, or timed out)."""
    me = node.peer_id
    candidates = [pid for pid in node.protocol.routing_table.peer_id_to_uid if pid != me]
    random.shuffle(candidates)
    request = dht_pb2.FindRequest(keys=[m.encode() for m in own_addresses(maddrs)])
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
    return classify(
        client_mode=False, answers=answers, relay_addresses=[m for m in maddrs if "/p2p-circuit" in m]
    )


def _is_loopback(maddr: str) -> bool:
    return maddr.startswith(("/ip4/127.", "/ip6/::1/"))
