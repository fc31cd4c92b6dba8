"""The reachability decision from the dial-back answers, and which addresses a checker is asked to dial."""

from __future__ import annotations

from peer.reachability import MAX_ADDRESSES, addresses_to_dial, classify, own_addresses


def test_classify():
    assert classify(client_mode=True, answers=[True], relay_addresses=[]).kind == "outgoing-only"
    assert classify(client_mode=False, answers=[None, False, True], relay_addresses=[]).kind == "direct"
    assert classify(client_mode=False, answers=[None, None], relay_addresses=[]).kind == "unknown"
    assert classify(client_mode=False, answers=[], relay_addresses=[]).kind == "unknown"
    behind_nat = classify(client_mode=False, answers=[False, None, False], relay_addresses=[])
    assert behind_nat.kind == "outgoing-only" and "none of 2 peers" in behind_nat.line
    relayed = classify(
        client_mode=False, answers=[False], relay_addresses=["/ip4/1.2.3.4/tcp/1/p2p/X/p2p-circuit"]
    )
    assert relayed.kind == "relayed"
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
