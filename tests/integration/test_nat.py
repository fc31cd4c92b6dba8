"""Peers behind a home router (an iptables-masquerade NAT in a network namespace) train with the swarm: they find that
nobody can dial them, take a slot on the bootstrap node (a relay) through which others can, contribute every round and
agree bit for bit. Needs root, ip, tc and iptables; skips itself with the reason otherwise."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.integration.harness import Proc, hashes_by_round, wait_for

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


def test_relayed_peer_behind_nat_contributes_every_round_and_agrees(local_swarm, lab):
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
    wait_for(lambda: all(p.maddrs() for p in peers), timeout_s=120, what="the public peers to be up")
    # no --client-mode: the reachability check finds that nobody can dial it and makes it a client with a relay slot
    # on the bootstrap node; a public peer then dials it through the relay
    peers.append(
        local_swarm.start_peer(
            "home",
            *common,
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
    assert all(r["bytes_sent"] > 0 for r in peers[2].records())  # its update went out every round
    home_line = next(line for line in peers[2].log().splitlines() if "reachability: " in line)
    assert "reachability: relayed through /ip4/" + lab.hosts["boot"].address in home_line, home_line
    for peer in peers[:2]:
        assert "reachability: direct" in peer.log() or "reachability: unknown" in peer.log()
    for round_index, by_peer in hashes_by_round(peers).items():
        assert len(set(by_peer.values())) == 1, f"round {round_index}: peers disagree: {by_peer}"


def run_node(local_swarm, lab, name: str, *args: str) -> Proc:
    host = "0.0.0.0" if lab.hosts[name].behind_nat else lab.hosts[name].address
    proc = Proc(
        name,
        [
            "-m",
            "tests.integration.reachability_node",
            "--initial-peers",
            *local_swarm.bootstrap_maddrs,
            "--host",
            host,
            *args,
        ],
        local_swarm.workdir,
        prefix=tuple(lab.command(name)),
    )
    local_swarm.procs.append(proc)
    return proc


def json_line(proc: Proc, key: str, *, timeout_s: float) -> dict:
    def found():
        if not proc.alive() and key not in proc.log():
            raise AssertionError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
        for line in proc.log().splitlines():
            if line.startswith("{") and f'"{key}"' in line:
                return json.loads(line)
        return None

    return wait_for(found, timeout_s=timeout_s, what=f"{proc.name}'s {key}")


def test_reachability_check_tells_direct_from_behind_nat(local_swarm, lab):
    for name in ("boot", "a", "b", "c"):
        lab.add_public(name)
    lab.add_behind_nat("home")
    local_swarm.start_bootstrap(host=lab.hosts["boot"].address, prefix=tuple(lab.command("boot")))
    # the first peer has no other peer to ask: the bootstrap node answers
    first = run_node(local_swarm, lab, "a", "--ask", "--serve-s", "120")
    assert json_line(first, "answers", timeout_s=90)["kind"] == "direct"
    run_node(local_swarm, lab, "b", "--serve-s", "120")
    json_line(local_swarm.procs[-1], "ready", timeout_s=60)
    public = run_node(local_swarm, lab, "c", "--ask")
    home = run_node(local_swarm, lab, "home", "--ask")
    public_result, home_result = (
        json_line(public, "answers", timeout_s=120),
        json_line(home, "answers", timeout_s=120),
    )
    assert public_result["kind"] == "direct" and True in public_result["answers"], public_result
    assert home_result["kind"] == "outgoing-only" and False in home_result["answers"], home_result


def test_swarm_averages_when_most_peers_are_behind_nat(local_swarm, lab):
    """2 of 3 peers cannot be dialed: the public one reduces every shard, the others send their updates to it and never
    reduce or serve state; everyone contributes every round and all agree bit for bit."""
    lab.add_public("boot")
    lab.add_public("pub")
    for name in ("home1", "home2"):
        lab.add_behind_nat(name)
    local_swarm.start_bootstrap(host=lab.hosts["boot"].address, prefix=tuple(lab.command("boot")))
    common = ["--max-rounds", "3", "--wait-for-peers", "3"]
    public = local_swarm.start_peer(
        "pub",
        *common,
        "--host-maddrs",
        f"/ip4/{lab.hosts['pub'].address}/tcp/0",
        prefix=tuple(lab.command("pub")),
    )
    wait_for(public.maddrs, timeout_s=120, what="the public peer to be up")
    peers = [public] + [
        local_swarm.start_peer(
            name, *common, "--host-maddrs", "/ip4/0.0.0.0/tcp/0", prefix=tuple(lab.command(name))
        )
        for name in ("home1", "home2")
    ]
    local_swarm.wait_rounds(peers, 3, timeout_s=240)
    for peer in peers:
        records = peer.records()
        assert [r["group_size"] for r in records] == [3, 3, 3], peer.log()[-3000:]
        assert all(not r["failed"] and r["resyncs"] == 0 for r in records)
    for peer in peers[1:]:
        assert "reachability: relayed through" in peer.log(), peer.log()[-3000:]
        assert all(r["bytes_sent"] > 0 for r in peer.records())
    # the public peer reduces both others' whole updates: it receives about what they send together
    for round_index in range(3):
        sent_by_homes = sum(peer.records()[round_index]["bytes_sent"] for peer in peers[1:])
        received = public.records()[round_index]["bytes_received"]
        assert received >= 0.9 * sent_by_homes, (round_index, received, sent_by_homes)
    for round_index, by_peer in hashes_by_round(peers).items():
        assert len(set(by_peer.values())) == 1, f"round {round_index}: peers disagree: {by_peer}"
