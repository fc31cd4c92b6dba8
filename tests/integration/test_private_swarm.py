"""Private swarms (--swarm-key) with real processes on 127.0.0.1: peers with the key train together and agree (with
the simulation, bit for bit); a peer without the key, or with another one, on the same DHT and run id sees none of
their records, is never in their groups, and is refused their state; and an outsider that learned the averaging
prefix (libp2p's identify protocol shows handler names to any connected peer) still cannot join a group or download."""

from __future__ import annotations

import contextlib
import signal

import hivemind
import pytest
import torch
import torch.multiprocessing
from hivemind.compression import NoCompression
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time
from pydantic.v1 import ValidationError

from peer.allreduce import ExactAverager
from peer.cli import config_from_args
from peer.records import ProgressRecord, hashes_key, progress_key, settings_key
from peer.signing import RecordSigner
from peer.simulate import simulate
from peer.swarm_key import KeyedAccess, OpenAccess, SealError, read_swarm_key
from tests.integration.harness import FAST_PEER_ARGS, Proc, wait_for
from tests.integration.test_dashboard import dashboard_url, get_status

# as the peers do (peer/__main__.py): hivemind's default "file_system" sharing starts a torch_shm_manager process that
# the suite's leftover-process cleanup would kill under this test process's feet
torch.multiprocessing.set_sharing_strategy("file_descriptor")

SECRET = b"a-private-swarm-key-for-tests-0123456789"
WRONG_SECRET = b"another-swarm-key-of-another-run-987654"
RUN_ID = "private"
ROUNDS = 3
STATE_MAX_BYTES = 1 << 26


def key_flag(tmp_path, name: str, secret: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(secret + b"\n")
    return f"@{path}"


def observer_dht(initial_peers: list[str]) -> hivemind.DHT:
    """A DHT node that reads what anyone on this DHT can read (signatures checked, nothing else)."""
    return hivemind.DHT(
        initial_peers=initial_peers,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        record_validators=[RecordSigner()],
        start=True,
        await_ready=True,
    )


def stored(dht: hivemind.DHT, key: str) -> dict:
    """subkey -> stored value under a DHT key, as a DHT get returns it."""
    found = dht.get(key, latest=True)
    return (
        {}
        if found is None or not isinstance(found.value, dict)
        else {s: v.value for s, v in found.value.items()}
    )


def start_monitor(local_swarm, tmp_path, name: str, *extra: str) -> Proc:
    args = ["-m", "peer.monitor", "--initial-peers", *local_swarm.bootstrap_maddrs, "--run-id", RUN_ID]
    monitor = Proc(name, [*args, "--host", "127.0.0.1", "--port", "0", "--poll-s", "0.5", *extra], tmp_path)
    local_swarm.procs.append(monitor)
    return monitor


def live_peers(monitor: Proc) -> set[str]:
    return {row["peer_id"] for row in get_status(dashboard_url(monitor))["peers"]}


def averager(dht, access, prefix: str, *, value: float, client_mode: bool = False) -> ExactAverager:
    """An averager of one small tensor under `prefix`, serving ({"donor": value}, [the tensor]) as its state."""
    return ExactAverager(
        [torch.full((4,), value)],
        dht,
        prefix=prefix,
        start=True,
        target_group_size=None,
        min_group_size=2,
        min_matchmaking_time=2.0,
        request_timeout=1.0,
        allreduce_timeout=30.0,
        next_chunk_timeout=10.0,
        compression=NoCompression(),
        client_mode=client_mode,
        state_provider=lambda: ({"donor": value}, [torch.full((4,), value)]),
        access=access,
        shutdown_timeout=3,
    )


def step(member: ExactAverager, access, *, round_index: int, in_s: float):
    """Start matchmaking for a group at now + in_s (the earliest time leads: hivemind's followers join leaders that
    declared an earlier time), with metadata sealed the way `access` seals it."""
    metadata = access.seal_metadata(member.peer_id.to_bytes(), {"round": round_index})
    return member.step(
        gather=metadata,
        weight=1.0,
        scheduled_time=get_dht_time() + in_s,
        timeout=20.0,
        allow_retries=False,
        wait=False,
    )


def outcome(control) -> str:
    """'averaged', or the error that ended the step."""
    try:
        control.result(timeout=60)
        return "averaged"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def values(member: ExactAverager) -> list[float]:
    with member.get_tensors() as tensors:
        return tensors[0].tolist()


def download(member: ExactAverager, donor: PeerID):
    return member.load_state_from(donor, chunk_timeout_s=5.0, total_timeout_s=20.0, max_bytes=STATE_MAX_BYTES)


@pytest.mark.timeout(300)
def test_an_outsider_that_knows_the_averaging_prefix_can_neither_join_a_group_nor_download_state():
    keyed = KeyedAccess(SECRET, RUN_ID)
    wrong = KeyedAccess(WRONG_SECRET, RUN_ID)
    prefix = keyed.prefix(
        "0123456789abcdef", "averaging"
    )  # what an outsider may learn through libp2p's identify
    dhts, members = [], []
    try:
        dhts.append(hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True))
        initial = [str(a) for a in dhts[0].get_visible_maddrs()]
        dhts += [
            hivemind.DHT(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
            for _ in range(3)
        ]
        first, second = (
            averager(dhts[0], keyed, prefix, value=1.0),
            averager(dhts[1], keyed, prefix, value=3.0),
        )
        spy = averager(dhts[2], OpenAccess(), prefix, value=100.0)  # an unmodified open-swarm averager
        wrong_key = averager(dhts[3], wrong, prefix, value=200.0)
        members += [first, second, spy, wrong_key]

        # the control: two holders of the key average
        controls = [step(m, keyed, round_index=1, in_s=3.0) for m in (first, second)]
        assert [outcome(c) for c in controls] == ["averaged", "averaged"]
        assert values(first) == values(second) == [2.0] * 4

        # the outsider leads and a keyed peer joins it: the keyed peer sees a member without the key and refuses to
        # average before sending anything, so whatever the outsider's all-reduce reports (with tiny tensors it may
        # reduce everything itself and "average" its own values alone), nothing of ours reached it
        spy_leads = step(spy, OpenAccess(), round_index=2, in_s=2.0)
        joins = step(first, keyed, round_index=2, in_s=6.0)
        joined = outcome(joins)
        assert "does not hold the swarm key" in joined, joined
        outcome(spy_leads)
        assert values(spy) == [100.0] * 4 and values(first) == [2.0] * 4

        # a keyed peer leads and the peer with the wrong key asks to join: refused at once, it never is in a group
        leads, asks = (
            step(first, keyed, round_index=3, in_s=2.0),
            step(wrong_key, wrong, round_index=3, in_s=6.0),
        )
        asked, alone = outcome(asks), outcome(leads)
        assert "could not find a group" in asked, asked  # never accepted, so no group to fail in
        assert "could not find a group" in alone, alone
        assert values(wrong_key) == [200.0] * 4 and values(first) == [2.0] * 4

        # state: only a holder of the key is served (the request carries an HMAC of the requester's peer id)
        assert download(spy, first.peer_id) is None
        assert download(wrong_key, first.peer_id) is None
        state = download(second, first.peer_id)
        assert state is not None and state[0] == {"donor": 1.0} and state[1][0].tolist() == [1.0] * 4
    finally:
        for member in members:
            member.shutdown()
        for dht in dhts:
            dht.shutdown()


@pytest.mark.timeout(420)
def test_keyed_peers_train_and_agree_while_peers_without_the_key_never_see_their_run(local_swarm, tmp_path):
    right, wrong = key_flag(tmp_path, "swarm.key", SECRET), key_flag(tmp_path, "wrong.key", WRONG_SECRET)
    # a run that never ends (the checks below need the keyed peers live), with the schedule of a 3-round run
    common = ["--run-id", RUN_ID, "--seed", "7", "--total-steps", str(ROUNDS * 5)]
    local_swarm.start_bootstrap()
    keyed = [
        local_swarm.start_peer(
            f"keyed{i}", *common, "--swarm-key", right, "--wait-for-peers", "2", "--data-shard", f"{i}/2"
        )
        for i in range(2)
    ]
    outsider = local_swarm.start_peer("outsider", *common)  # same DHT, run id and settings, no key
    wrong_key = local_swarm.start_peer("wrongkey", *common, "--swarm-key", wrong)
    everyone = [*keyed, outsider, wrong_key]
    monitors = {
        "keyed": start_monitor(local_swarm, tmp_path, "keyedmonitor", "--swarm-key", right),
        "plain": start_monitor(local_swarm, tmp_path, "plainmonitor"),
    }
    local_swarm.wait_rounds(everyone, ROUNDS, timeout_s=300)

    # the keyed peers averaged with each other only, every round, and agree with the simulation bit for bit
    config, _ = config_from_args([*FAST_PEER_ARGS, *common, "--max-rounds", str(ROUNDS)])
    simulated = [r["global_params_sha256"] for r in simulate(config, num_replicas=2)]
    for peer in keyed:
        records = peer.records()[:ROUNDS]
        assert [r["group_size"] for r in records] == [2] * ROUNDS, peer.log()[-3000:]
        assert [r["global_params_sha256"] for r in records] == simulated
    for peer in (outsider, wrong_key):  # their averaging never found anybody
        assert all(r["group_size"] <= 1 for r in peer.records()), peer.log()[-3000:]

    peer_ids = {peer.name: peer.records()[0]["peer_id"] for peer in everyone}
    (fingerprint,) = {peer.records()[0]["fingerprint"] for peer in everyone}  # the key is no training setting
    keyed_ids = {peer_ids["keyed0"], peer_ids["keyed1"]}
    names = {
        "open": OpenAccess(),
        "right": KeyedAccess(read_swarm_key(right), RUN_ID),
        "wrong": KeyedAccess(read_swarm_key(wrong), RUN_ID),
    }

    def keys(access) -> list[str]:
        prefix = access.prefix(fingerprint, "records")
        return [progress_key(prefix), hashes_key(prefix), settings_key(access.prefix(RUN_ID, "records"))]

    def authors(access, key: str, values: dict) -> set[str]:
        """The peer ids in the records under `key` that open and parse with `access`."""
        found = set()
        for subkey, value in values.items():
            with contextlib.suppress(SealError):
                record = access.open(key, subkey, value)
                if isinstance(record, dict) and isinstance(record.get("peer_id"), bytes):
                    found.add(PeerID(record["peer_id"]).to_base58())
        return found

    # a monitor given the key shows the keyed peers, one without it only the outsider
    keyed_view, plain_view = monitors["keyed"], monitors["plain"]
    wait_for(
        lambda: live_peers(keyed_view) == keyed_ids, timeout_s=60, what="the keyed peers on the keyed monitor"
    )
    wait_for(
        lambda: live_peers(plain_view) == {peer_ids["outsider"]}, timeout_s=60, what="the outsider alone"
    )

    dht = observer_dht(local_swarm.bootstrap_maddrs)
    try:
        # what a peer without the key reads under the run's plain names: the outsider's records, none of the keyed
        progress = keys(names["open"])[0]
        wait_for(
            lambda: peer_ids["outsider"] in authors(names["open"], progress, stored(dht, progress)),
            timeout_s=30,
            what="the outsider's own progress record",
        )
        for key in keys(names["open"]):
            assert authors(names["open"], key, stored(dht, key)) <= {peer_ids["outsider"]}, key

        # under the names derived from the key (which it cannot compute) a DHT node holds only sealed bytes: they
        # parse as no record, do not open with another key, and open with the right one as the keyed peers' records
        progress = keys(names["right"])[0]
        wait_for(
            lambda: authors(names["right"], progress, stored(dht, progress)) == keyed_ids,
            timeout_s=30,
            what="both keyed peers' sealed progress records",
        )
        for key in keys(names["right"]):
            sealed = stored(dht, key)
            assert sealed and all(isinstance(value, bytes) for value in sealed.values()), key
            for value in sealed.values():
                with pytest.raises(ValidationError):
                    ProgressRecord.parse_obj(value)
            assert (
                authors(names["wrong"], key, sealed) == set() and authors(names["open"], key, sealed) == set()
            )
            assert authors(names["right"], key, sealed) == keyed_ids, key
        for key in keys(names["wrong"]):  # the peer with the wrong key has a run of its own, as invisible
            assert authors(names["wrong"], key, stored(dht, key)) <= {peer_ids["wrongkey"]}

        # a direct state request to a keyed peer's handler (its name learned as an outsider could): refused unless
        # the requester holds the key
        prefix = names["right"].prefix(fingerprint, "averaging")
        donor = PeerID.from_base58(peer_ids["keyed0"])
        for access in (names["open"], names["wrong"], names["right"]):
            requester = averager(dht, access, prefix, value=0.0, client_mode=True)
            try:
                state = download(requester, donor)
            finally:
                requester.shutdown()
            if access is names["right"]:
                assert state is not None and isinstance(state[0], dict) and state[1], (
                    "the control must succeed"
                )
            else:
                assert state is None
    finally:
        dht.shutdown()

    assert all(peer.alive() for peer in everyone), "nobody crashed"
    for proc in [*everyone, *monitors.values()]:
        proc.signal(signal.SIGTERM)
    for proc in [*everyone, *monitors.values()]:
        assert proc.wait(timeout_s=60) == 0, proc.log()[-2000:]
