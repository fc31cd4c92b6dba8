"""The bootstrap node as a real process on 127.0.0.1: peers join through it, it stops cleanly on a
signal without leaving p2pd behind, its identity survives restarts, and bad input is one line."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import hivemind
import pytest
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

NODE_READY_TIMEOUT_S = 60.0  # importing torch+hivemind on a slow 2-core machine dominates this
EXIT_TIMEOUT_S = 10.0  # the node's promise after SIGINT/SIGTERM


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(condition: Callable[[], object], *, timeout_s: float, what: str) -> object:
    """Poll `condition` until it returns something truthy; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)  # polling interval, not synchronization: the condition decides


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    children, found, todo = _proc_children(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _is_running(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class NodeProcess:
    """One `python -m dht_bootstrap` subprocess with its output in files (a full pipe never blocks it)."""

    def __init__(self, tmp_path: Path, name: str, args: list[str]) -> None:
        self.maddrs_file = tmp_path / f"{name}.maddrs"
        self.stdout_path = tmp_path / f"{name}.stdout"
        self.stderr_path = tmp_path / f"{name}.stderr"
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dht_bootstrap", "--maddrs-file", str(self.maddrs_file), *args],
                stdout=stdout,
                stderr=stderr,
                # Own process group, so that teardown can kill p2pd too even if it was orphaned.
                start_new_session=True,
            )

    def wait_ready(self) -> list[str]:
        def maddrs() -> list[str] | None:
            assert self.proc.poll() is None, f"node exited early with {self.proc.returncode}: {self.stderr()}"
            return self.maddrs_file.read_text().split() if self.maddrs_file.exists() else None

        return _wait_for(maddrs, timeout_s=NODE_READY_TIMEOUT_S, what="the node's maddrs file")

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def kill_all(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Starts bootstrap nodes; kills whatever is left of them (process group included) at teardown."""
    nodes: list[NodeProcess] = []

    def start(*args: str, name: str = "node") -> NodeProcess:
        node = NodeProcess(tmp_path, f"{name}{len(nodes)}", list(args))
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.kill_all()


def _start_client(initial_peers: list[str]) -> hivemind.DHT:
    dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=False)
    dht.run_in_background(await_ready=True, timeout=30)
    return dht


LOCAL = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]


@pytest.mark.timeout(120)
def test_peers_join_and_exchange_values_through_the_node(start_node) -> None:
    node = start_node(*LOCAL, "--status-interval", "0.3")
    maddrs = node.wait_ready()

    assert maddrs and all(re.fullmatch(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+", m) for m in maddrs), maddrs
    assert node.stdout().strip() == "--initial-peers " + " ".join(maddrs)
    assert "only reachable on loopback" in node.stderr()

    writer = _start_client(maddrs)
    reader = None
    try:
        reader = _start_client(maddrs)
        assert writer.store("greeting", "hello", expiration_time=get_dht_time() + 60)
        found = reader.get("greeting", latest=True)
        assert found is not None and found.value == "hello"

        # The node's periodic status shows both clients and the record it stored for them.
        status_re = re.compile(r"routing table (\d+) peers \| (\d+) connected \| (\d+) records stored")

        def status_with_clients() -> bool:
            return any(
                int(peers) >= 2 and int(records) >= 1
                for peers, _, records in status_re.findall(node.stderr())
            )

        _wait_for(status_with_clients, timeout_s=30, what="a status line with 2 peers and 1 record")
    finally:
        writer.shutdown()
        if reader is not None:
            reader.shutdown()


@pytest.mark.timeout(180)
def test_a_second_node_joins_the_first_so_peers_may_join_through_either(start_node) -> None:
    first_maddrs = start_node(*LOCAL).wait_ready()
    second_maddrs = start_node(*LOCAL, "--initial-peers", *first_maddrs, name="second").wait_ready()
    assert set(first_maddrs).isdisjoint(second_maddrs)

    writer = _start_client(first_maddrs)  # each client knows only one of the nodes
    reader = None
    try:
        reader = _start_client(second_maddrs)
        assert writer.store("greeting", "hello", expiration_time=get_dht_time() + 60)
        found = reader.get("greeting", latest=True)
        assert found is not None and found.value == "hello", "the two nodes are not one DHT"
    finally:
        writer.shutdown()
        if reader is not None:
            reader.shutdown()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_node_cleanly_without_leftover_processes(start_node, signum: signal.Signals) -> None:
    node = start_node(*LOCAL)
    node.wait_ready()
    descendants = _descendants(node.proc.pid)
    p2pd_pids = [pid for pid in descendants if "p2pd" in _cmdline(pid)]
    assert len(p2pd_pids) == 1, [_cmdline(pid) for pid in descendants]

    sent_at = time.monotonic()
    node.proc.send_signal(signum)
    assert node.proc.wait(timeout=EXIT_TIMEOUT_S) == 0, node.stderr()
    assert time.monotonic() - sent_at < EXIT_TIMEOUT_S

    assert not _is_running(p2pd_pids[0]), "p2pd outlived the bootstrap node"
    # torch's shared-memory manager notices its parent is gone on its own poll timeout (~2 s).
    _wait_for(
        lambda: not any(_is_running(pid) for pid in descendants),
        timeout_s=EXIT_TIMEOUT_S,
        what="every child process to exit: " + ", ".join(_cmdline(pid) for pid in descendants),
    )
    assert "Traceback" not in node.stderr()
    assert not node.maddrs_file.exists(), "a stale maddrs file would look like a ready node"


@pytest.mark.timeout(60)
def test_stop_requested_during_startup_leaves_no_p2pd(tmp_path: Path) -> None:
    # In-process, so that "a signal arrived while the DHT was starting" is deterministic.
    from dht_bootstrap.node import BootstrapConfig, BootstrapNode

    identity_path = tmp_path / "startup.key"  # unique, so it marks this node's p2pd command line
    config = BootstrapConfig(host_maddrs=("/ip4/127.0.0.1/tcp/0",), identity_path=identity_path)
    children_before = set(_proc_children().get(os.getpid(), []))
    assert BootstrapNode.start(config, should_stop=lambda: True) is None

    def leftovers() -> list[str]:
        new_children = set(_proc_children().get(os.getpid(), [])) - children_before
        pids = new_children | {pid for pid in _all_pids() if str(identity_path) in _cmdline(pid)}
        # hivemind's first shared tensor in this (pytest) process starts torch's shm manager: not the node's.
        return [
            _cmdline(pid) for pid in pids if _is_running(pid) and "torch_shm_manager" not in _cmdline(pid)
        ]

    _wait_for(lambda: not leftovers(), timeout_s=EXIT_TIMEOUT_S, what="the DHT process and its p2pd to exit")


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


@pytest.mark.timeout(180)
def test_identity_file_keeps_peer_id_and_maddrs_across_restarts(start_node, tmp_path: Path) -> None:
    identity_path = tmp_path / "identity.key"
    args = ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{_free_port()}", "--identity-path", str(identity_path)]

    first = start_node(*args)
    first_maddrs = first.wait_ready()
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=EXIT_TIMEOUT_S) == 0, first.stderr()

    assert identity_path.stat().st_mode & 0o777 == 0o400
    peer_id = PeerID.from_identity(identity_path.read_bytes())
    assert all(maddr.endswith(f"/p2p/{peer_id}") for maddr in first_maddrs), (first_maddrs, peer_id)

    second = start_node(*args)
    assert second.wait_ready() == first_maddrs
    assert "created a new identity" in first.stderr()
    assert "created a new identity" not in second.stderr()


@pytest.mark.timeout(120)
def test_bad_input_is_one_line_and_nonzero_exit(start_node, tmp_path: Path) -> None:
    garbage_identity = tmp_path / "garbage.key"
    garbage_identity.write_bytes(b"not a key")
    cases = {  # name: (args, what the error line must say)
        "bad-maddr": (["--host-maddrs", "not-a-maddr"], "not a valid multiaddr"),
        "announce-port-0": (
            [*LOCAL, "--announce-maddrs", "/ip4/127.0.0.1/tcp/0"],
            "port 0 cannot be announced",
        ),
        "negative-interval": ([*LOCAL, "--status-interval", "-1"], "--status-interval"),
        "unknown-flag": ([*LOCAL, "--no-such-flag"], "unrecognized arguments"),
        "garbage-identity": ([*LOCAL, "--identity-path", str(garbage_identity)], "not a hivemind/libp2p RSA"),
        "dir-identity": ([*LOCAL, "--identity-path", str(tmp_path)], "is a directory"),
    }
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases["port-in-use"] = (["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}"], f"port {port}")
        # All at once: each one spends seconds importing torch before it can judge its flags.
        nodes = {name: start_node(*args, name=name) for name, (args, _) in cases.items()}
        for name, node in nodes.items():
            assert node.proc.wait(timeout=NODE_READY_TIMEOUT_S) != 0, name

    for name, node in nodes.items():
        _assert_one_line_error(node.stderr(), cases[name][1], case=name)
        assert not node.maddrs_file.exists(), name


def _assert_one_line_error(stderr: str, message: str, *, case: str) -> None:
    assert "Traceback" not in stderr, (case, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, (case, stderr)
    assert lines[0].startswith("diloco-bootstrap: error:") and message in lines[0], (case, lines[0])
