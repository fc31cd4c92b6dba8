"""Per-round metrics: one JSON record per line in --metrics-file, and one summary line on the console."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Protocol

from peer.config import RunConfig
from peer.inner import inner_lr, schedule_step
from peer.outer import AveragingResult

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


class MetricsSinks:
    """Several sinks behind one: each round's record goes to every one of them, in order."""

    def __init__(self, *sinks: MetricsSink):
        self.sinks = sinks

    def log_round(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log_round(record)


@dataclass
class RoundStats:
    """One round's measurements, logged once its outer step is applied."""

    round_index: int
    losses: list[float]
    tokens: int
    tokens_per_s: float
    inner_s: float
    inner_started_at: float
    inner_ended_at: float
    outer_started: float
    allreduce_s: float = 0.0
    utilization: dict = field(default_factory=dict)
    """peak_memory_bytes and mfu of the inner phase (peer.device.round_utilization)."""
    stage_at: dict[str, float] = field(default_factory=dict)
    """Wall-clock time (time.time()) at which each step after the inner phase ended, by step name; with the other
    peers' records it gives the swarm's fixed cost per round (scripts/bench_round_overhead.py)."""

    def mark(self, stage: str) -> None:
        self.stage_at[stage] = time.time()


def round_record(
    stats: RoundStats,
    result: AveragingResult | None,
    *,
    config: RunConfig,
    round_number: int,
    peer_id: str,
    fingerprint: str,
    params_sha256: str,
    total_tokens: int,
    num_params: int,
    counters: dict,
) -> dict:
    """The JSONL record of one round (README "Metrics" lists the keys)."""
    H = config.inner.steps
    record = {
        "round": round_number,
        "peer_id": peer_id,
        "fingerprint": fingerprint,
        "loss": sum(stats.losses) / max(1, len(stats.losses)),
        "group_size": result.group_size if result else 0,
        "global_params_sha256": params_sha256,
        "tokens": total_tokens,
        "round_tokens": stats.tokens,
        "inner_steps": len(stats.losses),
        "num_params": num_params,
        "tokens_per_s": stats.tokens_per_s,
        "inner_s": stats.inner_s,
        "inner_started_at": stats.inner_started_at,
        "allreduce_s": stats.allreduce_s,
        "overlap": config.outer.overlap,
        "lr": inner_lr(  # the round's last schedule position
            schedule_step(stats.round_index, H - 1, steps_per_round=H),
            config=config.inner,
            total_steps=config.total_inner_steps,
        ),
        "failed": result is None,
        **stats.utilization,
        **counters,
        "time": time.time(),
        "bytes_sent": 0,
        "bytes_received": 0,
        **(result.info if result else {}),
    }
    # time from our last inner step to the start of the data transfer (waiting for peers, matchmaking)
    started_at = record.pop("transfer_started_at", None)
    record["sync_wait_s"] = max(0.0, started_at - stats.inner_ended_at) if started_at else None
    transfer_s = record.get("transfer_s")
    transfer = (
        {"transfer_started": started_at, "transfer_ended": started_at + transfer_s}
        if started_at and transfer_s
        else {}
    )
    record["stage_at"] = {"inner_ended": stats.inner_ended_at, **transfer, **stats.stage_at}
    return record


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
