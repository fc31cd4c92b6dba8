"""The inner phase of a round: local AdamW steps on this peer's data at the swarm's learning-rate schedule, with the
peer's progress reported to the swarm after every step (its record is how others know when the round ends)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from peer import rounds
from peer.config import RunConfig
from peer.data import BatchStream
from peer.faults import FaultPlan
from peer.inner import build_inner_optimizer, inner_lr, inner_step, inner_step_options, schedule_step
from peer.network import ScheduledAveraging, SwarmNetwork

CHECK_PERIOD_S = 0.5  # how often the inner phase reads the swarm's progress near a round's end


@dataclass
class InnerPhase:
    """What one inner phase produced."""

    losses: list[float]
    tokens: int
    tokens_per_s: float
    scheduled: ScheduledAveraging | None = None
    """This round's all-reduce, if its matchmaking was started during the inner phase."""
    resynced: bool = False
    """The peer adopted the swarm's state during the phase (--overlap): nothing to contribute this round."""
    check_every_s: float = CHECK_PERIOD_S
    """How long until the next read of the swarm's progress (`every_check` sets it: rounds.check_period_s)."""


class LocalTrainer:
    """The local model's training: the inner optimizer (kept across rounds, never synced), the data stream and how
    far into it this peer is, and the steps of an inner phase."""

    def __init__(
        self,
        model: torch.nn.Module,
        batches: BatchStream,
        *,
        config: RunConfig,
        device: torch.device,
        faults: FaultPlan | None,
        optimizer_state: dict | None = None,
    ):
        self.model, self.config, self.device, self.faults = model, config, device, faults
        self.batches = batches
        """This peer's training data; its state_dict() is the position a checkpoint saves."""
        self.step_options = inner_step_options(config, device)  # gradient clipping, micro-batches, autocast
        self.optimizer = build_inner_optimizer(model, config.inner)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)

    def restart_optimizer(self) -> None:
        """Fresh AdamW moments (after a diverged round poisoned them)."""
        self.optimizer = build_inner_optimizer(self.model, self.config.inner)

    def run_phase(
        self,
        round_index: int,
        *,
        first_step: int,
        network: SwarmNetwork,
        should_stop: Callable[[], bool],
        on_step: Callable[[int], None],
        between_steps: Callable[[InnerPhase], bool],
        every_check: Callable[[InnerPhase], bool],
    ) -> InnerPhase:
        """Inner steps until the round ends: H steps, or with --round-tokens until `every_check` says the swarm has
        processed the budget. `on_step(step)` records our position; `between_steps` runs after every step and
        `every_check` every phase.check_every_s (which it sets); either ends the phase by returning True."""
        config, H = self.config, self.config.inner.steps
        budget = config.inner.round_tokens
        tokens_per_step = config.data.batch_size * config.data.seq_len
        step = first_step
        phase = InnerPhase(losses=[], tokens=0, tokens_per_s=0.0)
        started = time.perf_counter()
        next_check = started + CHECK_PERIOD_S
        bar = tqdm(desc=f"[{network.short_id}] round {round_index + 1}", leave=False, disable=None)
        while not should_stop() and (step < H if not budget else phase.tokens < budget):
            lr = inner_lr(
                schedule_step(round_index, step, steps_per_round=H),
                config=config.inner,
                total_steps=config.total_inner_steps,
            )
            step_started = time.perf_counter()
            batch = next(self.batches).to(self.device)
            phase.losses.append(inner_step(self.model, self.optimizer, batch, lr=lr, **self.step_options))
            step += 1
            phase.tokens += tokens_per_step
            on_step(step)
            if self.faults:
                self.faults.after_inner_step(time.perf_counter() - step_started)
            now = time.perf_counter()
            phase.tokens_per_s = phase.tokens / (now - started)
            steps_left = H - step if not budget else max(0, budget - phase.tokens) // tokens_per_step
            network.report_progress(
                round_index=round_index,
                inner_step=step,
                tokens=phase.tokens,
                done=False,
                tokens_per_s=phase.tokens_per_s,
                eta=rounds.inner_eta(
                    now=network.time(),
                    steps_done=len(phase.losses),
                    steps_left=steps_left,
                    elapsed_s=now - started,
                ),
                now=step == first_step + 1,
            )
            bar.update()
            bar.set_postfix(loss=f"{phase.losses[-1]:.3f}")
            if between_steps(phase):
                break
            if now >= next_check:
                if every_check(phase):
                    break
                next_check = now + phase.check_every_s
        bar.close()
        network.report_progress(
            round_index=round_index,
            inner_step=step,
            tokens=phase.tokens,
            done=True,
            tokens_per_s=phase.tokens_per_s,
            eta=network.time(),
            now=True,
        )
        return phase
