"""The overlapped outer step (--overlap): round r's all-reduce runs in a background thread while round r+1 trains.

When the average arrives the loop applies the outer step and rebases the local model onto the new global
parameters (`OuterOptimizer.rebase_`), keeping the progress made since `snapshot`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from peer.outer import AveragingResult

logger = logging.getLogger(__name__)


@dataclass
class PendingAverage:
    """A round's all-reduce running in the background."""

    stats: Any
    """The round's measurements (train.RoundStats), logged once its outer step is applied."""
    snapshot: list[torch.Tensor]
    """The local parameters whose pseudo-gradient is being averaged."""
    result: AveragingResult | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def wait(self, should_stop: Callable[[], bool]) -> bool:
        """Wait until the all-reduce finished or should_stop(); True if it finished."""
        while not self.finished.wait(timeout=0.25) and not should_stop():
            pass
        return self.finished.is_set()


def start_in_background(
    average: Callable[[], AveragingResult | None],
    *,
    stats: Any,
    params: list[torch.Tensor],
    log: logging.LoggerAdapter,
) -> PendingAverage:
    """Run `average()` in a thread; its result (None: failed) lands in the returned PendingAverage."""
    pending = PendingAverage(stats=stats, snapshot=[p.detach().clone() for p in params])

    def work() -> None:
        try:
            pending.result = average()
        except Exception as e:  # the round fails; the agreement check repairs us
            log.warning(f"round {stats.round_index + 1}: background all-reduce failed: {e!r}")
        finally:
            pending.finished.set()

    pending.thread = threading.Thread(target=work, name="averaging", daemon=True)
    pending.thread.start()
    return pending
