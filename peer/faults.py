"""Test-only fault injection (hidden flag --test-fault), so fault tests do not depend on timing luck.

kill-in-allreduce:R   SIGKILL this peer's whole process group once round R's all-reduce is running
corrupt:R             perturb the global parameters right after round R's outer step (a forked replica)
slow:F                make every inner step F times slower
pause-after-round:R   stall for PAUSE_S seconds once round R is logged (a peer still busy with its outer step
                      while the others already finished the next round's inner steps)
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch

KINDS = ("kill-in-allreduce", "corrupt", "slow", "pause-after-round")
PAUSE_S = 4.0


@dataclass(frozen=True)
class FaultPlan:
    kind: str
    value: float

    @classmethod
    def parse(cls, text: str | None) -> FaultPlan | None:
        if not text:
            return None
        kind, _, value = text.partition(":")
        if kind not in KINDS or not value:
            raise ValueError(
                f"--test-fault must be one of {', '.join(k + ':N' for k in KINDS)}, got {text!r}"
            )
        return cls(kind, float(value))

    def after_inner_step(self, step_s: float) -> None:
        if self.kind == "slow":
            time.sleep(step_s * (self.value - 1))

    def after_round(self, round_number: int) -> None:
        if self.kind == "pause-after-round" and round_number == int(self.value):
            time.sleep(PAUSE_S)

    def during_allreduce(self, round_number: int) -> None:
        if self.kind == "kill-in-allreduce" and round_number == int(self.value):
            os.killpg(os.getpgid(0), signal.SIGKILL)  # like a power cut: the averager and daemon die too

    @torch.no_grad()
    def after_outer_step(self, round_number: int, global_params: list[torch.Tensor]) -> None:
        if self.kind == "corrupt" and round_number == int(self.value):
            global_params[0].add_(1e-3)
