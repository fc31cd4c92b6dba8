"""Per-round metrics: one JSON record per line in --metrics-file, and one summary line on the console."""

from __future__ import annotations

import json
import logging
import os
from typing import Protocol

logger = logging.getLogger(__name__)


class MetricsSink(Protocol):
    def log_round(self, record: dict) -> None: ...


class NullMetrics:
    """For tests and the simulation when nothing should be written."""

    def log_round(self, record: dict) -> None:
        pass


class JsonlMetrics:
    """Appends each round's record to a JSONL file (flushed per line, so a killed peer loses nothing)."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log_round(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record, sort_keys=True) + "\n")


def summary_line(record: dict) -> str:
    """The one console line per round."""
    parts = [
        f"round {record['round']}",
        f"loss {record['loss']:.4f}",
        f"peers {record['group_size']}",
        f"{record['tokens_per_s']:.0f} tok/s",
        f"inner {record['inner_s']:.1f}s",
        f"allreduce {record['allreduce_s']:.2f}s",
        f"lr {record['lr']:.2e}",
        f"hash {record['global_params_sha256'][:10]}",
    ]
    if record.get("eval_loss") is not None:
        parts.insert(2, f"eval {record['eval_loss']:.4f}")
    if record.get("resynced"):
        parts.append("RESYNCED")
    if record.get("failed"):
        parts.append("FAILED-ALLREDUCE")
    return " | ".join(parts)
