"""CLI of a swarm peer: parse flags (and an optional TOML config file), set up logging, check what the user typed
(peer/preflight.py) before anything heavy starts, call train.run."""

from __future__ import annotations

import logging
import os
import sys

from peer import preflight
from peer.cli import config_from_args


class _PeerLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.peer = getattr(record, "peer", "-")
        return super().format(record)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PeerLogFormatter("%(asctime)s %(levelname)s [%(peer)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger("peer")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def die_with_parent() -> None:
    """Forked hivemind processes (DHT, averager) get SIGKILL when this peer dies, even by SIGKILL (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def _in_child() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)

    os.register_at_fork(after_in_child=_in_child)


def main(argv: list[str] | None = None) -> int:
    try:
        config, log_level = config_from_args(argv)
        setup_logging(log_level)
    except (ValueError, TypeError) as e:
        print(f"error: {preflight.one_line(e)}", file=sys.stderr)
        return 2
    die_with_parent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # hivemind's default ("file_system") starts torch_shm_manager, which can hang on a signal during startup
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    try:
        preflight.check_peer(config)  # cheap checks first; the last ones load the tokenizer and import torch
    except preflight.PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if preflight.fixed_tcp_ports(config.swarm.host_maddrs):
        # go-libp2p listens with SO_REUSEPORT: a second peer started on this port in the moment since the check
        # above would share it, and the kernel would split connections between the two. Without it, it fails.
        os.environ.setdefault("LIBP2P_TCP_REUSEPORT", "false")
    from peer import train  # imported late: torch, transformers and hivemind take seconds to load
    from peer.checkpoint import CheckpointError
    from peer.swarm import SwarmError
    from peer.wandb_sink import WandbError

    try:
        return train.run(config)
    except (SwarmError, CheckpointError, WandbError, ValueError) as e:
        print(f"error: {preflight.one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
