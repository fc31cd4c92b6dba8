"""CLI of the bootstrap node: parse flags, start the DHT, print how to join, log status until a signal.

Run as `python -m dht_bootstrap` or `diloco-bootstrap`. Imports nothing from the `peer` package but
peer/preflight.py (checks of what the user typed, standard library only, shared with the peer CLI), the reachability
check it answers (peer/reachability.py, via dht_bootstrap/node.py) and the swarm monitor (peer/monitor.py), imported
only when --dashboard-port is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from peer import preflight

if TYPE_CHECKING:
    from hivemind.utils.multiaddr import Multiaddr

    from dht_bootstrap.node import BootstrapConfig, BootstrapNode

# dht_bootstrap.node imports hivemind, which imports torch: seconds. It is imported in main() only
# after the signal handlers are installed, so that Ctrl+C or SIGTERM during that time still exits 0.

logger = logging.getLogger("dht_bootstrap")

PROG = "diloco-bootstrap"
DEFAULT_HOST_MADDRS = ("/ip4/0.0.0.0/tcp/31337",)


class _OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (not the usage block) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineArgumentParser(
        prog=PROG,
        description="Run a hivemind DHT bootstrap node that DiLoCo swarm peers join through. "
        "It only helps peers find each other; the swarm keeps training if it goes away.",
    )
    parser.add_argument(
        "--host-maddrs",
        nargs="+",
        default=list(DEFAULT_HOST_MADDRS),
        metavar="MADDR",
        help="multiaddrs to listen on (default: %(default)s, i.e. all interfaces, TCP port 31337; "
        "use /ip4/127.0.0.1/tcp/0 for a local test on a free port)",
    )
    parser.add_argument(
        "--announce-maddrs",
        nargs="+",
        default=[],
        metavar="MADDR",
        help="public multiaddrs to advertise to peers, e.g. /ip4/203.0.113.7/tcp/31337 when the node is "
        "behind NAT or port forwarding (default: the addresses it listens on)",
    )
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        default=[],
        metavar="MADDR",
        help="join the DHT of another bootstrap node (or any live peer) instead of starting a new one, e.g. a second "
        "node for redundancy: peers may then join through either (default: start a new DHT)",
    )
    parser.add_argument(
        "--identity-path",
        type=Path,
        default=None,
        metavar="PATH",
        help="private key file; created on first start and reused afterwards so that the node's peer id, "
        "and hence the --initial-peers peers use, survives restarts (default: a new identity every start)",
    )
    parser.add_argument(
        "--maddrs-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="once the node is ready, write its multiaddrs here, one per line (written atomically; "
        "removed at start and at clean shutdown)",
    )
    parser.add_argument(
        "--status-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between status log lines (default: %(default)s)",
    )
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve the swarm dashboard (live peers, loss, hash agreement; JSON at /api/status) on this TCP "
        "port, the same page as `python -m peer.monitor` (default: no dashboard)",
    )
    parser.add_argument(
        "--dashboard-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address the dashboard listens on (default: %(default)s, every interface; 127.0.0.1: this machine)",
    )
    parser.add_argument(
        "--dashboard-run-id",
        default="diloco",
        metavar="RUN_ID",
        help="the run (the peers' --run-id) the dashboard shows (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level for this node and hivemind (default: %(default)s)",
    )
    return parser


class _PeerIdFilter(logging.Filter):
    """Adds the short peer id to every record, '-' until it is known."""

    short_peer_id = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.peer = self.short_peer_id
        return True


def _setup_logging(level: str) -> _PeerIdFilter:
    peer_filter = _PeerIdFilter()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(peer_filter)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [bootstrap %(peer)s] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    # hivemind logs through its own handler; only its level is ours to set.
    logging.getLogger("hivemind").setLevel(level)
    return peer_filter


class _StopSignal:
    """Turns SIGINT/SIGTERM into a stop request.

    Until `needs_cleanup` is set (just before the DHT starts) there is nothing to clean up, so a
    signal exits at once: importing hivemind and torch alone takes seconds on a loaded machine.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.needs_cleanup = False

    def is_set(self) -> bool:
        return self.event.is_set()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        # The DHT runs in a forked process, which would inherit `_handle` and then ignore the SIGTERM
        # hivemind sends it when a graceful shutdown times out. Give forked children the defaults back.
        main_pid = os.getpid()

        def restore_defaults_in_child() -> None:
            if os.getpid() != main_pid:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)

        os.register_at_fork(after_in_child=restore_defaults_in_child)

    def _handle(self, signum: int, _frame) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        self.event.set()
        if not self.needs_cleanup:
            raise SystemExit(0)


def _connect_addresses(node: BootstrapNode) -> list[Multiaddr]:
    """The multiaddrs to tell peers: announced ones as given, else the non-loopback ones."""
    from dht_bootstrap.node import is_loopback

    maddrs = node.visible_maddrs()
    if node.config.announce_maddrs:
        return maddrs
    public = [maddr for maddr in maddrs if not is_loopback(maddr)]
    if public:
        return public
    logger.warning(
        "this node is only reachable on loopback addresses; peers on other machines cannot join. "
        "Listen on /ip4/0.0.0.0/tcp/PORT and pass --announce-maddrs /ip4/PUBLIC_IP/tcp/PORT"
    )
    return maddrs


def run(config: BootstrapConfig, *, stop: _StopSignal, peer_filter: _PeerIdFilter) -> int:
    """Start the node, announce it, log status until `stop` is set; return the exit status."""
    from dht_bootstrap.node import BootstrapNode, write_maddrs_file

    stop.needs_cleanup = True
    node = BootstrapNode.start(config, should_stop=stop.is_set)
    if node is None:
        return 0
    dashboard = None
    try:
        peer_filter.short_peer_id = str(node.peer_id)[-6:]
        maddrs = _connect_addresses(node)
        logger.info("DHT ready, peer id %s; peers join with the line printed on stdout", node.peer_id)
        # The one line meant for people and scripts: what to pass to every peer.
        print("--initial-peers " + " ".join(str(maddr) for maddr in maddrs), flush=True)
        if config.maddrs_file is not None:
            write_maddrs_file(config.maddrs_file, maddrs)
            logger.info("wrote %d multiaddrs to %s", len(maddrs), config.maddrs_file)

        if config.dashboard_port is not None:
            dashboard = _start_dashboard(node)

        next_status_at = time.monotonic() + config.status_interval_s
        while not stop.event.wait(timeout=max(0.0, min(1.0, next_status_at - time.monotonic()))):
            if not node.is_alive():
                logger.error("the DHT process exited unexpectedly (exit code %s)", node.dht.exitcode)
                return 1
            if time.monotonic() >= next_status_at:
                _log_status(node)
                next_status_at += config.status_interval_s
        return 0
    finally:
        started = time.monotonic()
        if dashboard is not None:
            dashboard.stop()
        node.shutdown()
        logger.info("stopped in %.1f s after %.0f s of uptime", time.monotonic() - started, node.uptime_s)


def _start_dashboard(node: BootstrapNode):
    """The swarm monitor and its web page on this node's DHT. Imported here, only with --dashboard-port: without it
    the bootstrap node imports nothing from the peer package."""
    from dht_bootstrap.node import BootstrapError

    try:
        from peer.monitor import Dashboard, MonitorConfig, MonitorError, dashboard_url
    except ImportError as e:
        raise BootstrapError(f"--dashboard-port needs the peer package and its dependencies ({e})") from None
    config = node.config
    monitor_config = MonitorConfig(
        run_id=config.dashboard_run_id, host=config.dashboard_host, port=config.dashboard_port
    )
    try:
        dashboard = Dashboard(node.dht, config=monitor_config, lock=node.dht_lock)
        port = dashboard.start()
    except MonitorError as e:
        raise BootstrapError(str(e)) from None
    logger.info(
        "dashboard of run %s: %s", config.dashboard_run_id, dashboard_url(config.dashboard_host, port)
    )
    return dashboard


def _log_status(node: BootstrapNode) -> None:
    try:
        status = node.status()
    except Exception as e:  # a slow or dying DHT process is a warning, not a crash
        logger.warning("could not read the DHT status: %s", e or type(e).__name__)
        return
    logger.info(
        "up %s | routing table %d peers | %d connected | %d records stored",
        _format_duration(node.uptime_s),
        status.num_routing_table_peers,
        status.num_connected_peers,
        status.num_stored_records,
    )


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    peer_filter = _setup_logging(args.log_level)
    stop = _StopSignal()
    stop.install()

    # hivemind's default torch sharing strategy ("file_system") starts a torch_shm_manager process on
    # its first shared tensor; a signal that arrives during that handshake leaves torch spinning
    # forever (seen with torch 2.13). Shared fds need no manager process, and the node shares little.
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    try:  # before importing hivemind and torch (seconds): a typo is reported at once
        preflight.check_bootstrap(
            host_maddrs=args.host_maddrs,
            announce_maddrs=args.announce_maddrs,
            initial_peers=args.initial_peers,
            identity_path=args.identity_path,
            maddrs_file=args.maddrs_file,
            dashboard_host=args.dashboard_host,
            dashboard_port=args.dashboard_port,
        )
    except preflight.PreflightError as e:
        if e.exit_code == 2:
            parser.error(str(e))
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    from dht_bootstrap.node import BootstrapConfig, BootstrapError

    try:
        config = BootstrapConfig(
            host_maddrs=tuple(args.host_maddrs),
            announce_maddrs=tuple(args.announce_maddrs),
            initial_peers=tuple(args.initial_peers),
            identity_path=args.identity_path,
            maddrs_file=args.maddrs_file,
            status_interval_s=args.status_interval,
            dashboard_port=args.dashboard_port,
            dashboard_host=args.dashboard_host,
            dashboard_run_id=args.dashboard_run_id,
        )
    except ValueError as e:
        parser.error(str(e))

    try:
        return run(config, stop=stop, peer_filter=peer_filter)
    except BootstrapError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
