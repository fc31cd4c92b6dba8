"""CLI of a swarm peer: parse flags (and an optional TOML config file), set up logging, check what the user typed
(peer/preflight.py) before anything heavy starts, call train.run."""

from __future__ import annotations

import logging
import os
import sys

from peer import preflight
from peer.cli import build_config, given_settings
from peer.config import RunConfig

logger = logging.getLogger("peer.join")

JOIN_WAIT_S = 5.0
"""How long a peer with --initial-peers looks for its run's published settings before it starts the run itself."""


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


def settle_run_settings(given: dict, config: RunConfig) -> tuple[RunConfig, dict | None]:
    """With --initial-peers: read the settings the run's peers publish and adopt them (peer/run_settings.py); says
    what it adopted. Returns the config to train with and the run settings to publish (None: this config's)."""
    from peer import run_settings
    from peer.run_state import RunNotFound, read_published_settings

    try:
        records = read_published_settings(
            list(config.swarm.initial_peers),
            config.swarm.run_id,
            wait_s=JOIN_WAIT_S,
            swarm_key=config.swarm.swarm_key,
        )
    except RunNotFound as e:
        raise preflight.PreflightError(str(e)) from None
    settled = run_settings.settle(
        given, records, is_local_path=preflight.is_local_spec, exists=preflight.local_path_exists
    )
    for line in settled.lines:
        logger.info(line)
    return settled.config, settled.publish


def main(argv: list[str] | None = None) -> int:
    try:
        given = given_settings(argv)
        config = build_config(given)
        setup_logging(config.log_level)
    except (ValueError, TypeError) as e:
        print(f"error: {preflight.one_line(e)}", file=sys.stderr)
        return 2
    die_with_parent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # hivemind's default ("file_system") starts torch_shm_manager, which can hang on a signal during startup
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    publish = None
    try:
        preflight.check_peer_machine(config)  # cheap checks first
        if config.swarm.initial_peers:  # before the model and data are built: they may be the run's
            config, publish = settle_run_settings(given, config)
        preflight.check_workload(config)  # the last checks load the tokenizer and import torch
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
        return train.run(config, run_settings=publish)
    except (SwarmError, CheckpointError, WandbError, ValueError) as e:
        print(f"error: {preflight.one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
