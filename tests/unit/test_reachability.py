"""The reachability decision from the dial-back answers, and which addresses a checker is asked to dial."""

from __future__ import annotations

from peer.reachability import (
    MAX_ADDRESSES,
    addresses_to_dial,
    circuit_relay_id,
    circuits_to_dial,
    classify,
    own_addresses,
    relay_circuits,
)
from peer.relay import circuit_address


def test_classify():
    assert classify(client_mode=True, answers=[True], relay_addresses=[]).kind == "outgoing-only"
    assert classify(client_mode=False, answers=[None, False, True], relay_addresses=[]).kind == "direct"
    assert classify(client_mode=False, answers=[None, None], relay_addresses=[]).kind == "unknown"
    assert classify(client_mode=False, answers=[], relay_addresses=[]).kind == "unknown"
    behind_nat = classify(client_mode=False, answers=[False, None, False], relay_addresses=[])
    assert behind_nat.kind == "outgoing-only" and "none of 2 peers" in behind_nat.line
    relay = ["/ip4/203.0.113.7/tcp/1/p2p/QmRelay"]
    relayed = classify(
        client_mode=False, answers=[False], relay_addresses=relay, relayed_answers=[None, True]
    )
    assert relayed.kind == "relayed" and relay[0] in relayed.line
    # a relay slot nobody could dial us through is no better than none
    assert classify(
        client_mode=False, answers=[False], relay_addresses=relay, relayed_answers=[False]
    ).kind == ("outgoing-only")
    for result in (behind_nat, relayed):
        assert result.line.startswith("reachability: ") and "\n" not in result.line


def test_own_addresses_drop_circuits_and_ids():
    maddrs = [
        "/ip4/10.0.0.5/tcp/4000/p2p/12D3KooWabc",
        "/ip4/10.0.0.5/tcp/4000",
        "/ip4/1.2.3.4/tcp/1/p2p/12D3KooWrelay/p2p-circuit/p2p/12D3KooWabc",
        "/ip4/127.0.0.1/tcp/4000",
    ]
    assert own_addresses(maddrs) == ["/ip4/10.0.0.5/tcp/4000", "/ip4/127.0.0.1/tcp/4000"]
    assert len(own_addresses([f"/ip4/10.0.0.{i}/tcp/1" for i in range(50)])) == MAX_ADDRESSES


def test_a_checker_dials_only_the_host_the_asker_connects_from():
    requested = ["/ip4/192.168.1.20/tcp/4000", "/ip4/203.0.113.7/tcp/4000", "/ip4/10.9.9.9/tcp/22", "garbage"]
    # behind NAT: it connects from its router's public address and names its private one
    assert addresses_to_dial(requested[:1], {"203.0.113.7"}) == []
    # port forwarding with --announce-maddrs: the announced public address is where it connects from
    assert addresses_to_dial(requested, {"203.0.113.7"}) == ["/ip4/203.0.113.7/tcp/4000"]
    assert addresses_to_dial(["/ip4/203.0.113.7/udp/4000/quic"], {"203.0.113.7"}) == []
    assert addresses_to_dial([f"/ip4/203.0.113.7/tcp/{p}" for p in range(50)], {"203.0.113.7"}) == [
        f"/ip4/203.0.113.7/tcp/{p}" for p in range(MAX_ADDRESSES)
    ]


def test_relay_circuits_and_which_a_checker_dials():
    relays = [
        "/ip4/203.0.113.7/tcp/31337/p2p/QmcgpsyWgH8Y8ajJz1Cu72KnS5uo2Aa2LpzU7kinSupNKC",
        "/ip4/1.2.3.4/tcp/5",
    ]
    circuits = relay_circuits(relays)
    assert circuits == [relays[0] + "/p2p-circuit"]  # a relay without a peer id cannot be dialed through
    relay_id = "QmcgpsyWgH8Y8ajJz1Cu72KnS5uo2Aa2LpzU7kinSupNKC"
    assert circuit_relay_id(circuits[0]) == relay_id
    for bad in (
        relays[0],
        "/ip4/203.0.113.7/udp/1/p2p/X/p2p-circuit",
        "/p2p/X/p2p-circuit",
        circuits[0] + "/x",
    ):
        assert circuit_relay_id(bad) is None, bad
    # only through a relay we are connected to, on the host we are connected to it on
    assert circuits_to_dial(circuits, {relay_id: {"203.0.113.7"}}) == circuits
    assert circuits_to_dial(circuits, {relay_id: {"198.51.100.1"}}) == []
    assert circuits_to_dial(circuits, {}) == []


def test_circuit_address_is_libp2p_binary():
    """/p2p/<id> as the bare multihash (code 421, length 34, 0x1220...), then p2p-circuit (code 290), as p2pd reads it;
    hivemind's own Multiaddr would write a CIDv1 there."""
    maddr = circuit_address("/ip4/127.0.0.1/tcp/4000/p2p/QmcgpsyWgH8Y8ajJz1Cu72KnS5uo2Aa2LpzU7kinSupNKC")
    data = maddr.to_bytes()
    assert data.startswith(bytes.fromhex("047f000001060fa0a503221220"))
    assert data.endswith(bytes.fromhex("a202")) and len(data) == 8 + 3 + 34 + 2
    assert str(maddr).endswith("/p2p-circuit")
