"""Peers behind a home router (an iptables-masquerade NAT in a network namespace) train with the swarm: they contribute
every round and agree bit for bit. Needs root, ip, tc and iptables; skips itself with the reason otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.integration.harness import hashes_by_round

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from netlab import Netlab, sh, unavailable_reason  # noqa: E402

REASON = unavailable_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"NAT tests: {REASON}"), pytest.mark.timeout(300)]


@pytest.fixture
def lab():
    net = Netlab("dlt").up()
    try:
        yield net
    finally:
        net.down()


def test_peer_behind_nat_contributes_every_round_and_agrees(local_swarm, lab):
    for name in ("boot", "a", "b"):
        lab.add_public(name)
    home = lab.add_behind_nat("home")
    # the NAT is real: the home peer's traffic leaves through its router, and "the internet" has no way in
    assert (
        f"via {home.address.rsplit('.', 1)[0]}.1"
        in sh(*lab.command("home", "ip", "route", "get", lab.hosts["a"].address)).stdout
    )
    assert sh(*lab.command("a", "ip", "route", "get", home.address), check=False).returncode != 0

    local_swarm.start_bootstrap(host=lab.hosts["boot"].address, prefix=tuple(lab.command("boot")))
    common = ["--max-rounds", "3", "--wait-for-peers", "3"]
    peers = [
        local_swarm.start_peer(
            name,
            *common,
            "--host-maddrs",
            f"/ip4/{lab.hosts[name].address}/tcp/0",
            prefix=tuple(lab.command(name)),
        )
        for name in ("a", "b")
    ]
    peers.append(
        local_swarm.start_peer(
            "home",
            *common,
            "--client-mode",
            "--host-maddrs",
            "/ip4/0.0.0.0/tcp/0",
            prefix=tuple(lab.command("home")),
        )
    )
    local_swarm.wait_rounds(peers, 3, timeout_s=240)
    for peer in peers:
        records = peer.records()
        assert [r["group_size"] for r in records] == [3, 3, 3], peer.log()[-3000:]
        assert all(not r["failed"] and r["resyncs"] == 0 for r in records)
    assert all(
        r["bytes_sent"] > 0 for r in peers[2].records()
    )  # the NAT'd peer's update went out every round
    for round_index, by_peer in hashes_by_round(peers).items():
        assert len(set(by_peer.values())) == 1, f"round {round_index}: peers disagree: {by_peer}"
