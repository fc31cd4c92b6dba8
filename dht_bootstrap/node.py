"""The bootstrap node: one long-running hivemind DHT that peers join through, a circuit relay for peers behind NAT,
and a checker that answers peers' reachability checks (peer/reachability.py).

Owns starting and stopping the DHT (and hivemind's p2pd daemon under it), the persistent identity
file, and the multiaddrs it reports. Written against hivemind 1.1.12.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import hivemind
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from peer.preflight import (
    PreflightError,
    check_announce_maddrs,
    check_host_maddrs,
    check_peer_maddrs,
    check_ports_free,
)
from peer.reachability import serve_reachability_checks

logger = logging.getLogger(__name__)

RPC_TIMEOUT_S = 10.0
"""Longest wait for an answer from the DHT process (status, addresses)."""
STOP_DURING_STARTUP_GRACE_S = 3.0
"""After a signal during startup, how long to let the DHT become ready so that it can stop cleanly."""


class BootstrapError(Exception):
    """A problem the user can fix (bad flag, busy port, broken identity file); shown as one line."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BootstrapConfig:
    """Everything the bootstrap node needs to start."""

    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/31337",)
    """Multiaddrs to listen on; 0.0.0.0 means every interface."""
    announce_maddrs: tuple[str, ...] = ()
    """Public multiaddrs to advertise instead of the listening ones (e.g. behind port forwarding)."""
    initial_peers: tuple[str, ...] = ()
    """Multiaddrs of another bootstrap node or peer whose DHT to join; empty starts a new DHT."""
    identity_path: Path | None = None
    """Private key file; created on first start, reused after, so the peer id survives restarts."""
    maddrs_file: Path | None = None
    """Where to write the node's multiaddrs, one per line, once it is ready."""
    status_interval_s: float = 30.0
    """Seconds between status log lines."""
    startup_timeout_s: float = 30.0
    """Give up if the DHT is not ready after this many seconds."""
    shutdown_timeout_s: float = 5.0
    """Grace period for a clean DHT shutdown before its process is terminated."""
    dashboard_port: int | None = None
    """Serve the swarm dashboard (peer/monitor.py) on this TCP port; None: no dashboard."""
    dashboard_host: str = "0.0.0.0"
    """Address the dashboard listens on."""
    dashboard_run_id: str = "diloco"
    """The run the dashboard shows."""

    def __post_init__(self) -> None:
        check_host_maddrs(self.host_maddrs)
        check_announce_maddrs(self.announce_maddrs)
        check_peer_maddrs(self.initial_peers)
        if not self.status_interval_s > 0:
            raise ValueError(f"--status-interval must be > 0 seconds, got {self.status_interval_s}")
        if not self.startup_timeout_s > 0 or not self.shutdown_timeout_s > 0:
            raise ValueError("startup and shutdown timeouts must be > 0 seconds")
        if self.dashboard_port is not None and not 0 <= self.dashboard_port <= 65535:
            raise ValueError(f"--dashboard-port must be in 0..65535, got {self.dashboard_port}")
        if not self.dashboard_run_id or any(ch in self.dashboard_run_id for ch in ". \t\n"):
            raise ValueError(
                f"--dashboard-run-id must be non-empty without dots or spaces, got {self.dashboard_run_id!r}"
            )


def load_or_create_identity(path: Path) -> PeerID:
    """Return the peer id stored in `path`, creating a new RSA key there first if it does not exist.

    hivemind can create the file itself, but it does so non-atomically inside the DHT process (a crash
    mid-write leaves a corrupt key that blocks every later start), so we write it here: temp file,
    fsync, rename. The format is hivemind's own (a libp2p protobuf-wrapped RSA key), read by p2pd.
    """
    if path.is_dir():
        raise BootstrapError(f"--identity-path {path} is a directory; give a file path for the private key")
    if not path.exists():
        if not path.parent.is_dir():
            raise BootstrapError(
                f"--identity-path {path}: directory {path.parent} does not exist; create it first"
            )
        key = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes())
        _write_atomically(path, key.SerializeToString(), mode=0o400)
        logger.info("created a new identity in %s", path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BootstrapError(
            f"--identity-path {path} cannot be read ({e.strerror}); fix its permissions"
        ) from None
    try:
        return PeerID.from_identity(data)
    except Exception:
        raise BootstrapError(
            f"--identity-path {path} is not a hivemind/libp2p RSA private key; "
            "point to another path to create a fresh identity"
        ) from None


def is_loopback(maddr: Multiaddr) -> bool:
    for proto in ("ip4", "ip6"):
        if proto in maddr:
            return ipaddress.ip_address(maddr[proto]).is_loopback
    return False


def write_maddrs_file(path: Path, maddrs: Sequence[Multiaddr]) -> None:
    """Write one multiaddr per line so that a reader sees either no file or the whole list."""
    _write_atomically(path, "".join(f"{maddr}\n" for maddr in maddrs).encode(), mode=0o644)


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp_name)
        raise


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeStatus:
    """A snapshot for the periodic status line."""

    num_routing_table_peers: int
    """DHT peers in the routing table (including replacement candidates)."""
    num_connected_peers: int
    """Peers the p2p daemon currently holds a connection to."""
    num_stored_records: int
    """Unexpired DHT records stored on this node."""


# These run inside the DHT process via DHT.run_coroutine (module-level so they pickle by reference).


async def _read_status(_dht: hivemind.DHT, node: hivemind.DHTNode) -> NodeStatus:
    return NodeStatus(
        num_routing_table_peers=len(node.protocol.routing_table.uid_to_peer_id),
        num_connected_peers=len(await node.p2p.list_peers()),
        num_stored_records=len(node.protocol.storage),
    )


async def _read_peer_id(_dht: hivemind.DHT, node: hivemind.DHTNode) -> PeerID:
    return node.peer_id


async def _read_visible_maddrs(_dht: hivemind.DHT, node: hivemind.DHTNode) -> list[Multiaddr]:
    return await node.get_visible_maddrs()


async def _read_p2pd_pid(_dht: hivemind.DHT, node: hivemind.DHTNode) -> int | None:
    child = getattr(node.p2p, "_child", None)  # private in hivemind 1.1.12; only used as a safety net
    return None if child is None else child.pid


@dataclass(kw_only=True)
class BootstrapNode:
    """A started hivemind DHT plus what we need to report on it and to stop it without leftovers."""

    config: BootstrapConfig
    dht: hivemind.DHT
    peer_id: PeerID
    p2pd_pid: int | None
    started_at: float = field(default_factory=time.monotonic)
    dht_lock: threading.Lock = field(default_factory=threading.Lock)
    """hivemind's DHT pipe is not thread-safe: every call from this process (status, the dashboard) takes it."""

    @classmethod
    def start(cls, config: BootstrapConfig, *, should_stop=lambda: False) -> BootstrapNode | None:
        """Start the DHT; return None if `should_stop()` became true while waiting for it."""
        expected_peer_id = None
        if config.identity_path is not None:
            expected_peer_id = load_or_create_identity(config.identity_path)
            logger.info("identity %s from %s", expected_peer_id, config.identity_path)
        try:
            check_ports_free(config.host_maddrs)  # again: the port may have been taken since the CLI's check
        except PreflightError as e:
            raise BootstrapError(str(e)) from None
        if config.maddrs_file is not None:
            # A stale file from an earlier run must not be mistaken for "this node is ready".
            with suppress(OSError):
                config.maddrs_file.unlink()

        # go-libp2p listens with SO_REUSEPORT by default, so a second node on a busy port starts
        # "fine" and the kernel splits incoming connections between the two. Turn it off for p2pd
        # (it inherits our environment) so that a taken port is an error.
        os.environ["LIBP2P_TCP_REUSEPORT"] = "false"
        dht = hivemind.DHT(
            start=False,
            initial_peers=list(config.initial_peers),
            host_maddrs=list(config.host_maddrs),
            announce_maddrs=list(config.announce_maddrs) or None,
            identity_path=None if config.identity_path is None else str(config.identity_path),
            shutdown_timeout=config.shutdown_timeout_s,
            # peers are told to join here, so it is reachable: say so, which starts libp2p's relay service at once
            # (it waits for AutoNAT to find the node public otherwise) for peers that nobody can dial
            force_reachability="public",
        )
        # Equivalent to start=True, but waits in slices so a signal during startup is honoured
        # and the total wait is bounded.
        dht.run_in_background(await_ready=False)
        deadline = time.monotonic() + config.startup_timeout_s
        stop_requested = False
        try:
            while not _poll_ready(dht):
                if not stop_requested and should_stop():
                    # The DHT process reads shutdown requests only once it is ready, so give it a
                    # moment to get there and stop cleanly with its p2pd, rather than kill it mid-start.
                    stop_requested = True
                    deadline = min(deadline, time.monotonic() + STOP_DURING_STARTUP_GRACE_S)
                if time.monotonic() > deadline or not dht.is_alive():
                    _stop_dht(dht, ready=False, timeout_s=config.shutdown_timeout_s)
                    if stop_requested:
                        return None
                    raise BootstrapError(
                        f"the DHT did not start within {config.startup_timeout_s:.0f} s; "
                        "rerun with --log-level DEBUG to see hivemind's output"
                    )
        except hivemind.p2p.P2PDaemonError as e:
            _stop_dht(dht, ready=False, timeout_s=config.shutdown_timeout_s)
            raise BootstrapError(f"the p2p daemon failed to start: {_one_line(e)}") from None

        peer_id = _call_in_dht(dht, _read_peer_id, RPC_TIMEOUT_S)
        assert expected_peer_id is None or peer_id == expected_peer_id, "p2pd ignored --identity-path"
        p2pd_pid = _call_in_dht(dht, _read_p2pd_pid, RPC_TIMEOUT_S)
        # a lone first peer has nobody else to ask whether it can be dialed
        _call_in_dht(dht, serve_reachability_checks, RPC_TIMEOUT_S)
        node = cls(config=config, dht=dht, peer_id=peer_id, p2pd_pid=p2pd_pid)
        if stop_requested or should_stop():
            node.shutdown()
            return None
        return node

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at

    def is_alive(self) -> bool:
        return self.dht.is_alive()

    def visible_maddrs(self) -> list[Multiaddr]:
        """Multiaddrs (with /p2p/<peer id>) as the daemon reports them: the announced ones if any,
        else the concrete interface addresses it listens on (0.0.0.0 is expanded)."""
        return list(_call_in_dht(self.dht, _read_visible_maddrs, RPC_TIMEOUT_S, lock=self.dht_lock))

    def status(self) -> NodeStatus:
        return _call_in_dht(self.dht, _read_status, RPC_TIMEOUT_S, lock=self.dht_lock)

    def shutdown(self) -> None:
        """Stop the DHT and make sure p2pd is gone; bounded by about shutdown_timeout_s + 3 s."""
        _stop_dht(self.dht, ready=True, timeout_s=self.config.shutdown_timeout_s, p2pd_pid=self.p2pd_pid)
        if self.config.maddrs_file is not None:
            with suppress(OSError):
                self.config.maddrs_file.unlink()


def _call_in_dht(dht: hivemind.DHT, coro_fn, timeout_s: float, *, lock: threading.Lock | None = None):
    """Run `coro_fn(dht, node)` inside the DHT process, waiting at most timeout_s."""
    with lock or contextlib.nullcontext():
        future = dht.run_coroutine(coro_fn, return_future=True)
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeoutError:
        future.cancel()
        raise


def _poll_ready(dht: hivemind.DHT) -> bool:
    try:
        dht.wait_until_ready(timeout=0.2)
    except FutureTimeoutError:
        return False
    return True


def _stop_dht(dht: hivemind.DHT, *, ready: bool, timeout_s: float, p2pd_pid: int | None = None) -> None:
    """Stop the DHT process, then make sure its p2pd is gone too; bounded by about timeout_s + 5 s."""
    # If the DHT process has to be terminated, its p2pd is orphaned (hivemind does not tie p2pd's
    # life to its parent): remember every p2pd it started so that we can kill them afterwards.
    p2pd_pids = set(_p2pd_children(dht.pid)) | ({p2pd_pid} if p2pd_pid is not None else set())
    if dht.is_alive():
        if ready:
            # Sends a shutdown request, joins for timeout_s, then SIGTERMs the process if still alive.
            dht.shutdown()
        else:
            dht.terminate()  # a DHT process that is not ready yet does not read shutdown requests
        dht.join(2.0)
    if dht.is_alive():
        logger.warning("DHT process %s ignored SIGTERM; killing it", dht.pid)
        dht.kill()
        dht.join(1.0)
    for pid in p2pd_pids:
        _kill_leftover_p2pd(pid)


def _p2pd_children(ppid: int | None) -> list[int]:
    if ppid is None:
        return []
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == ppid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
    return [pid for pid in found if _is_running_p2pd(pid)]


def _kill_leftover_p2pd(pid: int) -> None:
    """If the DHT process died without stopping its p2pd (e.g. it was terminated the hard way),
    p2pd is orphaned and would keep the port; kill it. Checks the command line against pid reuse."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _is_running_p2pd(pid):
            return
        logger.warning("p2pd (pid %d) outlived the DHT process; sending %s", pid, sig.name)
        with suppress(OSError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 1.0
        while _is_running_p2pd(pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # not our child, so there is nothing to wait() on; poll /proc
    if _is_running_p2pd(pid):
        logger.warning("p2pd (pid %d) survived SIGKILL", pid)


def _is_running_p2pd(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"p2pd" in cmdline and state != "Z"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
