"""Bad input to the peer and the bootstrap node, as real processes: one clear line on stderr, a non-zero exit, no
traceback, found before any heavy work (the swarm is never joined), and nothing already saved is touched."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peer import preflight
from tests.integration.harness import child_env

EXIT_TIMEOUT_S = 180.0  # the tokenizer and dataset cases import torch first: slow on a loaded 2-core machine
FAKE_PEER_ID = "QmSoLPppuBtQSGwKDZT2M73ULpjvfd3aZ6ha4oFGL1KrGM"  # a well-formed id nobody on 127.0.0.1 has
LOCAL = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
ONE_ROUND = ["--max-rounds", "1"]


@dataclass
class Case:
    """One bad command line and what its one error line must say."""

    args: list[str]
    says: list[str]
    exit_code: int = 1
    env: dict = field(default_factory=dict)


def closed_port() -> int:
    """A port nobody listens on (bound and released: connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def busy_port() -> Iterator[int]:
    """A port held the way p2pd holds its listening port: with SO_REUSEPORT, which a second p2pd would share."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def run_all(module: str, cases: dict[str, Case], workdir: Path) -> dict[str, tuple[int, str]]:
    """Start every case at once (each spends its first second importing), return {name: (exit code, stderr)}."""
    procs = {}
    for name, case in cases.items():
        stderr_path = workdir / f"{name}.stderr"
        with stderr_path.open("wb") as stderr:
            procs[name] = (
                subprocess.Popen(
                    [sys.executable, "-m", module, *case.args],
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    env={**child_env(), **case.env},
                    start_new_session=True,
                ),
                stderr_path,
            )
    results = {}
    for name, (proc, stderr_path) in procs.items():
        try:
            code = proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{name}: still running after {EXIT_TIMEOUT_S:.0f} s") from None
        results[name] = (code, stderr_path.read_text())
    return results


def assert_one_line_error(name: str, case: Case, code: int, stderr: str, *, prefix: str) -> None:
    assert "Traceback" not in stderr, (name, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, (name, stderr)
    assert lines[0].startswith(prefix), (name, lines[0])
    for fragment in case.says:
        assert fragment in lines[0], (name, fragment, lines[0])
    assert code == case.exit_code, (name, code, lines[0])


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under the folder, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.timeout(300)
def test_peer_bad_input_is_one_line_before_any_heavy_work(tmp_path: Path) -> None:
    # What a previous run saved: every case below passes it, and none may change or add a file in it.
    saved = tmp_path / "saved"
    checkpoints = saved / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "round-000004.pt").write_bytes(b"weights of round 4")
    (checkpoints / "round-000004.sha256").write_text(hashlib.sha256(b"weights of round 4").hexdigest())
    metrics = saved / "metrics.jsonl"
    metrics.write_text('{"round": 4}\n')
    maddrs = saved / "maddrs.txt"
    maddrs.write_text("/ip4/127.0.0.1/tcp/1/p2p/" + FAKE_PEER_ID + "\n")
    keep = ["--checkpoint-dir", str(checkpoints), "--resume", "--metrics-file", str(metrics)]
    before = snapshot(saved)

    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    garbage_tokenizer = tmp_path / "tokenizer.json"
    garbage_tokenizer.write_text("{ this is not json")
    wrong_type = tmp_path / "wrong-type.toml"
    wrong_type.write_text('inner_steps = "fifty"\n')
    not_a_number = tmp_path / "nan.toml"
    not_a_number.write_text("weight_decay = nan\n")
    refused = closed_port()
    hub_down = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}  # never reaches the internet
    unreachable = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{FAKE_PEER_ID}" for port in (refused, closed_port())]
    with busy_port() as port:
        cases = {
            "config-wrong-type": Case(
                ["--config", str(wrong_type), *LOCAL, *keep],
                ["inner_steps must be an integer", "'fifty'"],
                exit_code=2,
            ),
            "config-not-a-number": Case(
                ["--config", str(not_a_number), *LOCAL, *keep],
                ["--weight-decay must be a finite number, got nan"],
                exit_code=2,
            ),
            "flag-infinite": Case(
                [*LOCAL, *keep, "--outer-lr", "inf"],
                ["--outer-lr must be a finite number, got inf"],
                exit_code=2,
            ),
            "maddr-garbage": Case(
                [*LOCAL, *keep, "--initial-peers", "nonsense"],
                ["--initial-peers", "'nonsense' is not a valid multiaddr"],
                exit_code=2,
            ),
            "maddr-no-peer-id": Case(
                [*LOCAL, *keep, "--initial-peers", f"/ip4/127.0.0.1/tcp/{refused}"],
                ["--initial-peers", "must hold an address and the peer id"],
                exit_code=2,
            ),
            "maddr-bad-port": Case(
                ["--host-maddrs", "/ip4/127.0.0.1/tcp/70000", *keep],
                ["--host-maddrs", "not a valid multiaddr", "70000"],
                exit_code=2,
            ),
            "maddr-bad-ip": Case(
                ["--host-maddrs", "/ip4/127.0.0.300/tcp/0", *keep],
                ["--host-maddrs", "not a valid multiaddr"],
                exit_code=2,
            ),
            "maddr-announce-port-0": Case(
                [*LOCAL, *keep, "--announce-maddrs", "/ip4/203.0.113.7/tcp/0"],
                ["--announce-maddrs", "port 0 cannot be announced"],
                exit_code=2,
            ),
            "unreachable-peers": Case(
                [*LOCAL, *keep, "--initial-peers", *unreachable],
                ["none of the --initial-peers answered", *unreachable, "Connection refused", "firewall"],
            ),
            "port-in-use": Case(
                ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", *keep],
                [f"/ip4/127.0.0.1/tcp/{port}", f"port {port}", "Address already in use", "another port"],
            ),
            "address-not-ours": Case(
                ["--host-maddrs", "/ip4/203.0.113.7/tcp/0", *keep],
                ["--host-maddrs", "cannot listen on 203.0.113.7"],
            ),
            "checkpoint-dir-under-a-file": Case(
                [*LOCAL, "--checkpoint-dir", str(a_file / "checkpoints")],
                ["--checkpoint-dir", "Not a directory"],
            ),
            "checkpoint-dir-is-a-file": Case(
                [*LOCAL, "--checkpoint-dir", str(a_file)], ["--checkpoint-dir", "is not a directory"]
            ),
            "metrics-file-is-a-directory": Case(
                [*LOCAL, "--metrics-file", str(tmp_path)], ["--metrics-file", "is a directory"]
            ),
            "metrics-file-under-a-file": Case(
                [*LOCAL, "--metrics-file", str(a_file / "metrics.jsonl")],
                ["--metrics-file", "not a directory"],
            ),
            "maddrs-file-no-directory": Case(
                [*LOCAL, *keep, "--maddrs-file", str(tmp_path / "missing" / "maddrs.txt")],
                ["--maddrs-file", "does not exist"],
            ),
            "tokenizer-missing-file": Case(
                [*LOCAL, *keep, "--tokenizer", str(tmp_path / "missing.json")],
                ["--tokenizer", "no such file"],
            ),
            "tokenizer-garbage": Case(
                [*LOCAL, *keep, "--tokenizer", str(garbage_tokenizer)], ["--tokenizer", "cannot be loaded"]
            ),
            "tokenizer-not-cached-offline": Case(
                [*LOCAL, *keep, "--tokenizer", "no-such-org/no-such-tokenizer"],
                [
                    "--tokenizer no-such-org/no-such-tokenizer",
                    "not in the Hugging Face cache",
                    "cannot be reached",
                ],
                env=hub_down,
            ),
            "dataset-missing-file": Case(
                [*LOCAL, *keep, "--dataset", str(tmp_path / "missing.jsonl")], ["--dataset", "no such file"]
            ),
            "dataset-not-cached-offline": Case(
                [*LOCAL, *keep, "--dataset", "no-such-org/no-such-dataset"],
                ["--dataset no-such-org/no-such-dataset", "cannot be reached", "save_to_disk"],
                env=hub_down,
            ),
        }
        results = run_all("peer", cases, tmp_path)

    for name, case in cases.items():
        assert_one_line_error(name, case, *results[name], prefix="error:")
    assert snapshot(saved) == before, "a run that failed its checks changed what was saved"


@pytest.mark.timeout(300)
def test_bootstrap_and_monitor_bad_input_is_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    unreachable = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{FAKE_PEER_ID}"
    maddrs = ["--maddrs-file", str(tmp_path / "node.maddrs")]
    with busy_port() as port:
        bootstrap = {
            "maddr-garbage": Case(
                [*LOCAL, *maddrs, "--initial-peers", "/ip4/127.0.0.1/tcp"],
                ["--initial-peers", "not a valid multiaddr"],
                exit_code=2,
            ),
            "unreachable-peers": Case(
                [*LOCAL, *maddrs, "--initial-peers", unreachable],
                ["none of the --initial-peers answered", unreachable, "Connection refused"],
            ),
            "maddrs-file-under-a-file": Case(
                [*LOCAL, "--maddrs-file", str(a_file / "node.maddrs")], ["--maddrs-file", "not a directory"]
            ),
            "identity-under-a-file": Case(
                [*LOCAL, *maddrs, "--identity-path", str(a_file / "node.key")],
                ["--identity-path", "not a directory"],
            ),
            "dashboard-port-in-use": Case(
                [*LOCAL, *maddrs, "--dashboard-host", "127.0.0.1", "--dashboard-port", str(port)],
                ["--dashboard-port", f"port {port}", "Address already in use"],
            ),
        }
        monitor = {
            "monitor-maddr-no-peer-id": Case(
                ["--initial-peers", "/ip4/127.0.0.1/tcp/1"],
                ["must hold an address and the peer id"],
                exit_code=2,
            ),
            "monitor-unreachable-peers": Case(
                ["--initial-peers", unreachable, "--port", "0"],
                ["none of the --initial-peers answered", unreachable],
            ),
            "monitor-port-in-use": Case(
                ["--initial-peers", unreachable, "--host", "127.0.0.1", "--port", str(port)],
                ["--port", f"port {port}", "Address already in use"],
            ),
        }
        results = run_all("dht_bootstrap", bootstrap, tmp_path)
        monitor_results = run_all("peer.monitor", monitor, tmp_path)
    for name, case in bootstrap.items():
        assert_one_line_error(name, case, *results[name], prefix="diloco-bootstrap: error:")
    for name, case in monitor.items():
        assert_one_line_error(name, case, *monitor_results[name], prefix="python -m peer.monitor: error:")
    assert not (tmp_path / "node.maddrs").exists()


@pytest.mark.timeout(300)
def test_simulation_bad_input_is_one_line(tmp_path: Path) -> None:
    garbage_tokenizer = tmp_path / "tokenizer.json"
    garbage_tokenizer.write_text("{ this is not json")
    cases = {
        "tokenizer-garbage": Case(
            [*ONE_ROUND, "--tokenizer", str(garbage_tokenizer)], ["--tokenizer", "cannot be loaded"], 2
        ),
        "not-a-number": Case(
            [*ONE_ROUND, "--weight-decay", "nan"], ["--weight-decay must be a finite number, got nan"], 2
        ),
        "dataset-missing": Case(
            [*ONE_ROUND, "--dataset", str(tmp_path / "missing.parquet")], ["--dataset", "no such file"], 2
        ),
    }
    results = run_all("peer.simulate", cases, tmp_path)
    for name, case in cases.items():
        assert_one_line_error(name, case, *results[name], prefix="error:")


# ---- the checks themselves, in this process, against real sockets on 127.0.0.1 --------------------------------
def test_a_port_held_with_so_reuseport_is_busy_and_a_released_one_is_free() -> None:
    with busy_port() as port:
        with pytest.raises(preflight.PreflightError, match=f"port {port}.*Address already in use"):
            preflight.check_ports_free([f"/ip4/127.0.0.1/tcp/{port}"])
        with pytest.raises(preflight.PreflightError, match="Address already in use"):
            preflight.check_ports_free([f"/ip4/0.0.0.0/tcp/{port}"])  # all interfaces include 127.0.0.1
    preflight.check_ports_free(
        [f"/ip4/127.0.0.1/tcp/{port}", "/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/1/quic"]
    )


def test_one_answering_initial_peer_is_enough() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        alive = f"/ip4/127.0.0.1/tcp/{listener.getsockname()[1]}/p2p/{FAKE_PEER_ID}"
        dead = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{FAKE_PEER_ID}"
        preflight.check_reachable([dead, alive])
    with pytest.raises(preflight.PreflightError, match="none of the --initial-peers answered"):
        preflight.check_reachable([dead])
    preflight.check_reachable([])  # a new swarm has nobody to reach


def test_the_hub_probe_says_why_it_is_unreachable(monkeypatch) -> None:
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert "Connection refused" in preflight.hub_unreachable_reason(timeout_s=2.0)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert preflight.hub_unreachable_reason(timeout_s=2.0) is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert preflight.hub_unreachable_reason() == "HF_HUB_OFFLINE is set"
