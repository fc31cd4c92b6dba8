"""The reachability decision from the dial-back answers, and which addresses a checker is asked to dial."""

from __future__ import annotations

from peer.reachability import MAX_ADDRESSES, classify, dialable_addresses


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


def test_dialable_addresses_drop_loopback_circuits_and_ids():
    maddrs = [
        "/ip4/10.0.0.5/tcp/4000/p2p/12D3KooWabc",
        "/ip4/127.0.0.1/tcp/4000/p2p/12D3KooWabc",
        "/ip4/10.0.0.5/tcp/4000",
        "/ip4/1.2.3.4/tcp/1/p2p/12D3KooWrelay/p2p-circuit/p2p/12D3KooWabc",
        "/ip6/::1/tcp/4000",
    ]
    assert dialable_addresses(maddrs) == ["/ip4/10.0.0.5/tcp/4000"]
    assert len(dialable_addresses([f"/ip4/10.0.0.{i}/tcp/1" for i in range(50)])) == MAX_ADDRESSES
