"""The small summary a peer publishes to the DHT after each round for monitors (peer/monitor.py): built from the
round's metrics record by a pure function, published through a MetricsSink."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from peer.records import (
    MAX_COUNT,
    MAX_GROUP_SIZE,
    MAX_LOSS,
    MAX_ROUND,
    MAX_TOKENS_PER_S,
    REACHABILITY,
    SUMMARY_HISTORY_ROUNDS,
    RoundLoss,
    SummaryRecord,
)

logger = logging.getLogger(__name__)


class SummaryPublisher:
    """Builds this peer's summary record from each round's metrics and hands it to `publish` (the swarm stores it
    in the DHT). A failed publication is a warning: monitors are never worth a failed round."""

    def __init__(
        self,
        publish: Callable[[SummaryRecord], None],
        *,
        device: str,
        reachability: str = "unknown",
        max_rounds: int = 0,
    ):
        self.publish, self.device, self.max_rounds = publish, device, max_rounds
        self.reachability = reachability
        """Set by the swarm once its reachability check has an answer."""
        self.last: SummaryRecord | None = None

    def log_round(self, record: dict) -> None:
        try:
            self.last = build_summary(
                record,
                previous=self.last,
                device=self.device,
                reachability=self.reachability,
                max_rounds=self.max_rounds,
            )
            self.publish(self.last)
        except Exception as e:  # the DHT may be busy or shutting down
            logger.warning(f"could not publish the round summary: {e!r}")


def build_summary(
    record: dict,
    *,
    previous: SummaryRecord | None,
    device: str,
    reachability: str,
    max_rounds: int,
) -> SummaryRecord:
    """The DHT summary after a round, from that round's metrics record (see README "Metrics") and the summary
    after the previous one (running totals and the short loss history). Our own values are clamped into the
    schema's bounds rather than refused: a peer with an absurd loss still shows up in the monitor."""
    round_index = _clamp_int(record["round"], MAX_ROUND)
    loss = _loss_or_none(record.get("loss"))
    eval_loss = _loss_or_none(record.get("eval_loss"))
    point = RoundLoss(
        round=round_index,
        loss=loss,
        eval_loss=eval_loss,
        tokens=_clamp_int(record.get("round_tokens", 0), MAX_COUNT),
    )
    recent = [*(previous.recent if previous else []), point][-SUMMARY_HISTORY_ROUNDS:]
    tokens_per_s = float(record.get("tokens_per_s") or 0.0)
    return SummaryRecord(
        peer_id=record["peer_id"],
        round=round_index,
        loss=loss,
        eval_loss=eval_loss if eval_loss is not None else (previous.eval_loss if previous else None),
        tokens=_clamp_int(record.get("tokens", 0), MAX_COUNT),
        tokens_per_s=min(tokens_per_s, MAX_TOKENS_PER_S) if tokens_per_s > 0 else 0.0,  # also maps NaN to 0
        bytes_sent=_clamp_int(
            (previous.bytes_sent if previous else 0) + _clamp_int(record.get("bytes_sent"), MAX_COUNT),
            MAX_COUNT,
        ),
        bytes_received=_clamp_int(
            (previous.bytes_received if previous else 0)
            + _clamp_int(record.get("bytes_received"), MAX_COUNT),
            MAX_COUNT,
        ),
        group_size=_clamp_int(record.get("group_size", 0), MAX_GROUP_SIZE),
        device="".join(ch for ch in device if " " <= ch <= "~")[:64],
        reachability=reachability if reachability in REACHABILITY else "unknown",
        last_hash=record["global_params_sha256"],
        failed_rounds=_clamp_int(record.get("failed_rounds", 0), MAX_COUNT),
        resyncs=_clamp_int(record.get("resyncs", 0), MAX_COUNT),
        max_rounds=_clamp_int(max_rounds, MAX_ROUND),
        recent=recent,
    )


def _clamp_int(value, upper: int) -> int:
    return min(max(int(value or 0), 0), upper)


def _loss_or_none(value) -> float | None:
    if value is None or not math.isfinite(value) or not 0.0 <= value <= MAX_LOSS:
        return None
    return float(value)


def device_kind(device) -> str:
    """'cpu', or 'cuda' and the GPU's name, for a torch.device."""
    if device.type != "cuda":
        return device.type
    import torch  # only the training process calls this

    return f"cuda {torch.cuda.get_device_name(device)}"
