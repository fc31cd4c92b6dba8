"""CLI of a swarm peer: parse flags (and an optional TOML config file), set up logging, call train.run."""

from __future__ import annotations

import logging
import os
import sys

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


def main(argv: list[str] | None = None) -> int:
    try:
        config, log_level = config_from_args(argv)
        setup_logging(log_level)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # hivemind's default ("file_system") starts torch_shm_manager, which can hang on a signal during startup
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    from peer import train  # imported late: torch, transformers and hivemind take seconds to load
    from peer.checkpoint import CheckpointError
    from peer.swarm import SwarmError

    try:
        return train.run(config)
    except (SwarmError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
