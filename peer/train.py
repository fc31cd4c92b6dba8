"""The peer's training loop: join the swarm, then repeat rounds of H inner steps, all-reduce, outer step and agreement.

One round, in the order it happens, is `Peer.train_one_round`; the decisions it acts on are in peer/rounds.py and
everything it asks of the swarm goes through the `SwarmNetwork` interface (peer/network.py).
"""

from __future__ import annotations

import collections
import logging
import os
import time

import torch

from peer import checkpoint, coordination, rounds
from peer.agreement import Agreement
from peer.config import RunConfig
from peer.data import data_seed
from peer.device import (
    autocast_dtype,
    configure_,
    flops_per_token,
    reset_peak_memory_,
    resolve_device,
    round_utilization,
)
from peer.faults import FaultPlan
from peer.inner import evaluate
from peer.inner_phase import CHECK_PERIOD_S, InnerPhase, LocalTrainer
from peer.metrics import JsonlMetrics, MetricsSinks, RoundStats, round_record, summary_line
from peer.model import count_parameters
from peer.network import NetworkFactory, ScheduledAveraging, SwarmNetwork
from peer.outer import AveragingResult, all_finite
from peer.overlap import PendingAverage, start_in_background
from peer.robust import pseudo_gradient_bound, within_bound
from peer.run_settings import encode as encode_run_values
from peer.run_settings import run_values
from peer.signals import StopFlag
from peer.state import ReplicatedState
from peer.summary import SummaryPublisher, device_kind
from peer.workload import build_workload

logger = logging.getLogger(__name__)

RESYNC_RETRY_S = 2.0  # pause before retrying a failed state download


def write_maddrs_file(path: str, maddrs: list[str]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as file:
        file.write("\n".join(maddrs) + "\n")
    os.replace(tmp, path)


def hivemind_network(config: RunConfig, **kwargs) -> SwarmNetwork:
    from peer.swarm import Swarm  # hivemind takes seconds to import; tests with a fake network never do

    return Swarm(config, **kwargs)


class Peer:
    """One swarm member: builds the model, data and swarm membership, then trains round after round."""

    def __init__(
        self,
        config: RunConfig,
        stop: StopFlag,
        *,
        network_factory: NetworkFactory = hivemind_network,
        run_settings: dict | None = None,
    ):
        self.config, self.stop, self.network_factory = config, stop, network_factory
        # the run's settings this peer publishes for newcomers: the run's own version if it joined one
        self.run_settings = run_settings if run_settings is not None else run_values(config)
        if not encode_run_values(self.run_settings):
            logger.warning(
                "the run's settings are too long to publish (a path over 1024 characters?): newcomers "
                "will need them on their command line"
            )
            self.run_settings = None
        self.device = resolve_device(config.device)
        configure_(self.device)
        workload = build_workload(config)
        self.model, self.corpus, self.held_out = workload.model, workload.corpus, workload.held_out
        self.settings, self.fingerprint = workload.settings, workload.fingerprint
        self.autocast_dtype = autocast_dtype(config.precision, self.device)
        self.flops_per_token = flops_per_token(self.model, seq_len=config.data.seq_len)
        self.params = list(self.model.parameters())
        self.state = ReplicatedState(self.params, config.outer, fingerprint=self.fingerprint)
        self.resumed: dict = {}  # the inner optimizer and data position of a resumed checkpoint
        self.recent_inner_s: collections.deque[float] = collections.deque(maxlen=5)
        self.faults = FaultPlan.parse(config.test_fault)
        self.total_tokens = self.rounds_done = self.rounds_started = self.failed_rounds = 0
        self.resyncs_logged = 0  # the agreement's resync count when the last round record was written
        self.pending: PendingAverage | None = None
        self.log: logging.LoggerAdapter = logging.LoggerAdapter(logger, {"peer": "-"})
        if config.resume:
            self.resume_from_checkpoint()

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> int:
        config = self.config
        try:
            self.join_swarm()
            self.prepare_training()
            last_checkpoint = self.state.round
            while not self.stop and (config.max_rounds == 0 or self.rounds_started < config.max_rounds):
                if not self.train_one_round():
                    break
                if self.state.round != last_checkpoint and self.checkpoint_due():
                    self.save_checkpoint("periodic")
                    last_checkpoint = self.state.round
            self.wait_for_pending()
        except KeyboardInterrupt:
            self.log.warning("interrupted twice: leaving without waiting")
        finally:
            self.wait_for_pending()
            if config.checkpoint_dir and hasattr(self, "trainer") and self.rounds_done > 0:
                self.save_checkpoint("shutdown")
            if hasattr(self, "network"):
                self.network.shutdown()
        self.log.info(
            f"left the swarm after {self.rounds_done} rounds ({self.failed_rounds} failed, "
            f"{self.agreement.resyncs if hasattr(self, 'agreement') else 0} resyncs)"
        )
        return 0

    def train_one_round(self) -> bool:
        """Inner phase, pseudo-gradient, all-reduce, outer step, agreement check, metrics; False if stopped
        mid-round. With --overlap the all-reduce and outer step are handed to a background thread instead."""
        round_index = self.training_round
        inner_started, inner_started_at = time.perf_counter(), time.time()
        reset_peak_memory_(self.device)
        # 1. inner phase (meanwhile: matchmaking is scheduled, a finished background all-reduce is applied)
        phase = self.inner_phase(round_index)
        inner_s = time.perf_counter() - inner_started
        if self.pending is not None and not self.stop and not phase.resynced:
            phase.resynced = self.finish_pending(wait=True)  # at most one all-reduce in flight
        if self.stop or phase.resynced:
            self.cancel(phase.scheduled)
            return not self.stop
        if self.config.inner.round_tokens or len(phase.losses) == self.config.inner.steps:
            self.recent_inner_s.append(inner_s)  # only full inner phases say how long a round takes
        # 2. never contribute an update computed on a forked model
        forked = self.agreement.forked_view(settle=True)
        if forked is not None:
            self.cancel(phase.scheduled)
            if not self.agreement.resync(
                forked, reason="before averaging: our parameters differ from the majority"
            ):
                self.stop.event.wait(RESYNC_RETRY_S)  # the donors may be busy; do not hammer them
            return True
        self.total_tokens += phase.tokens
        self.rounds_started += 1
        stats = RoundStats(
            round_index=round_index,
            losses=phase.losses,
            tokens=phase.tokens,
            tokens_per_s=phase.tokens_per_s,
            inner_s=inner_s,
            inner_started_at=inner_started_at,
            inner_ended_at=time.time(),
            outer_started=time.perf_counter(),
            utilization=round_utilization(
                self.device,
                tokens_per_s=phase.tokens_per_s,
                flops_per_token=self.flops_per_token,
                dtype=self.autocast_dtype,
            ),
        )
        # 3. pseudo-gradient (I6: never a non-finite one)
        pseudo_grads = self.pseudo_gradient_or_none(round_index, phase.tokens)
        stats.mark("pseudo_grad_ready")
        if self.config.outer.overlap:
            self.start_background_average(stats, pseudo_grads, phase.scheduled)
            return True
        # 4. all-reduce with the round's live peers
        result = self.average(stats, pseudo_grads, phase.scheduled)
        if result is None and self.stop:
            return False  # leaving mid-all-reduce: this round did not happen for us
        stats.mark("averaged")
        # 5. the replicated outer step
        self.apply_outer_step(round_index, result)
        stats.allreduce_s = time.perf_counter() - stats.outer_started
        stats.mark("outer_applied")
        # 6. agreement: publish our hash (compared with the group's during the next inner phase); after a failed
        # all-reduce, adopt the majority's state now if the others applied the round (I3)
        self.agreement.check_round(result)
        stats.mark("agreed")
        # 7. metrics
        self.log_round(stats, result)
        if self.faults:
            self.faults.after_round(self.state.round)
        return True

    # ---- start ---------------------------------------------------------------------------------------------
    def join_swarm(self) -> None:
        config = self.config
        self.network = self.network_factory(
            config,
            settings=self.settings,
            fingerprint=self.fingerprint,
            averaged_tensors=[torch.zeros_like(p) for p in self.state.outer.global_params],
            state_provider=self.state.for_donation,
            run_settings=self.run_settings,
        )
        self.stop.install()
        self.log = logging.LoggerAdapter(logger, {"peer": self.network.short_id})
        self.agreement = Agreement(
            self.network,
            self.state,
            local_params=self.params,
            swarm=config.swarm,
            inner_steps=config.inner.steps,
            log=self.log,
        )
        maddrs = self.network.visible_maddrs()
        if config.swarm.maddrs_file:
            write_maddrs_file(config.swarm.maddrs_file, maddrs)
        if not config.swarm.initial_peers:
            print(f"Started a new swarm. Others join with: --initial-peers {' '.join(maddrs)}", flush=True)
        self.log.info(
            f"peer {self.network.peer_id} | run {config.swarm.run_id} fingerprint {self.fingerprint} | "
            f"model {config.model.name} {count_parameters(self.model) / 1e6:.2f}M params | device {self.device}"
        )
        if config.swarm.wait_for_peers > 1 and coordination.joining_view(self.network) is None:
            live = coordination.wait_for_peers(
                self.network,
                config.swarm.wait_for_peers,
                timeout_s=config.swarm.state_timeout_s,
                should_stop=lambda: bool(self.stop),
            )
            self.log.info(f"{live} peers live; starting")
        self.agreement.adopt_swarm_state_on_join(
            overlap=config.outer.overlap, should_stop=lambda: bool(self.stop)
        )

    def prepare_training(self) -> None:
        config = self.config
        self.model.to(self.device)
        self.state.outer.copy_to_(self.params)
        stream_id = config.data.data_shard or self.network.peer_id
        seed = data_seed(config.seed, stream_id)
        self.order_key = seed.to_bytes(8, "big")  # this peer's place in the canonical summation order
        batches = self.corpus.train_stream(
            seed=seed, batch_size=config.data.batch_size, seq_len=config.data.seq_len, shard=config.data.shard
        )
        if self.resumed.get("data_position"):
            batches.load_state_dict(self.resumed["data_position"])  # continue the stream where it stopped
        self.trainer = LocalTrainer(
            self.model,
            batches,
            config=config,
            device=self.device,
            faults=self.faults,
            optimizer_state=self.resumed.get("inner_optimizer"),
        )
        self.metrics = MetricsSinks(
            JsonlMetrics(config.metrics_file),
            SummaryPublisher(  # a small signed summary per round in the DHT, for monitors (peer/monitor.py)
                self.network.publish_summary,
                device=device_kind(self.device),
                reachability=self.network.reachability,
                max_rounds=config.max_rounds,
            ),
            *([self.wandb_sink()] if config.wandb_project else []),
        )

    def wandb_sink(self):
        from peer.wandb_sink import WandbMetrics  # lazy: wandb is an optional extra

        config = self.config
        return WandbMetrics(
            config.wandb_project,
            run_id=config.swarm.run_id,
            peer_id=self.network.peer_id,
            config=config.to_dict(),
        )

    # ---- 1. the inner phase ----------------------------------------------------------------------------------
    @property
    def training_round(self) -> int:
        """The round whose inner steps run now: with an all-reduce in flight (--overlap), the one after it."""
        return self.state.round + (1 if self.pending is not None else 0)

    def inner_phase(self, round_index: int) -> InnerPhase:
        """Inner AdamW steps until the round ends. Meanwhile: apply a finished background all-reduce (--overlap) and
        schedule this round's matchmaking so that the group is ready when the inner steps end."""
        return self.trainer.run_phase(
            round_index,
            first_step=self.state.inner_step,
            network=self.network,
            should_stop=lambda: bool(self.stop),
            on_step=self.state.set_inner_step,
            between_steps=self.apply_finished_average,
            every_check=lambda phase: self.watch_round_end(round_index, phase),
        )

    def apply_finished_average(self, phase: InnerPhase) -> bool:
        """--overlap: apply the previous round's average once it arrived; True if the swarm's state then replaced
        ours (this round's steps are void)."""
        if self.pending is not None and self.pending.finished.is_set() and self.finish_pending():
            phase.resynced = True
        return phase.resynced

    def watch_round_end(self, round_index: int, phase: InnerPhase) -> bool:
        """Pre-schedule this round's matchmaking once its end is near; True to end the inner phase now: with
        --round-tokens when the swarm reached the budget (or another peer ended the round), and whenever our global
        parameters turn out to differ from the swarm's (train_one_round then resyncs us)."""
        timing = rounds.Timing.of(self.config)
        now = self.network.time()
        progress = rounds.round_progress(
            self.network.live_peers(),
            me=self.network.my_key(),
            round_index=round_index,
            now=now,
            timing=timing,
            straggler_wait_s=self.straggler_wait_s(),
            tokens_per_step=self.config.data.batch_size * self.config.data.seq_len,
        )
        if not self.agreement.settled and self.agreement.forked_view() is not None:
            return True  # the round we just averaged left us forked: stop training on it (train_one_round resyncs)
        my_eta = self.network.my_progress().eta
        if phase.scheduled is None and rounds.should_schedule(
            progress, now=now, my_eta=my_eta, timing=timing, check_period_s=CHECK_PERIOD_S
        ):
            if self.agreement.forked_view() is not None:
                return True  # never join a group with a forked model: leaving it later would fail the group
            # Every peer of the round must start matchmaking before the group forms: the first to schedule leaves
            # the others time to see its record (progress_period_s) and everyone adopts its time.
            group_time, how = rounds.scheduled_group_time(progress, now=self.network.time(), timing=timing)
            phase.scheduled = self.network.schedule_averaging(
                round_index,
                scheduled_time=group_time,
                order_key=self.order_key,
                how=how,
                value_bound=pseudo_gradient_bound(self.state.outer.global_params, self.config),
                expected_peers=progress.peers,
            )
        phase.check_every_s = rounds.check_period_s(progress, now=now, timing=timing, base_s=CHECK_PERIOD_S)
        return bool(timing.round_tokens) and progress.closed

    def straggler_wait_s(self) -> float:
        return rounds.straggler_wait_s(self.config.swarm.straggler_wait_s, self.recent_inner_s)

    # ---- 3.-5. pseudo-gradient, all-reduce, outer step --------------------------------------------------------
    def pseudo_gradient_or_none(self, round_index: int, tokens: int) -> list[torch.Tensor] | None:
        pseudo_grads = self.state.outer.pseudo_gradient(self.params)
        if all_finite(pseudo_grads) and tokens > 0:
            return pseudo_grads
        if (
            tokens > 0
        ):  # diverged: the inner AdamW moments are poisoned too; restart them with the global parameters
            self.trainer.restart_optimizer()
        self.log.warning(f"round {round_index + 1}: local update is not finite or empty; not contributing")
        return None

    def average(self, stats: RoundStats, pseudo_grads, scheduled) -> AveragingResult | None:
        round_index = stats.round_index
        if pseudo_grads is None:
            self.cancel(scheduled)
            return None
        bound = pseudo_gradient_bound(self.state.outer.global_params, self.config)
        result = coordination.average_round(
            self.network,
            pseudo_grads,
            round_index=round_index,
            tokens=stats.tokens,
            order_key=self.order_key,
            scheduled=scheduled,
            timing=rounds.Timing.of(self.config),
            straggler_wait_s=self.straggler_wait_s(),
            value_bound=bound,
            should_stop=lambda: bool(self.stop),
            during_allreduce=(lambda: self.faults.during_allreduce(round_index + 1)) if self.faults else None,
        )
        if result is not None and not all(within_bound(t, bound) for t in result.averaged):
            # the all-reduce checks every part it receives; this guards the outer step itself (I6, I8)
            self.log.warning(
                f"round {round_index + 1}: the average is not finite or beyond the bound; not applied"
            )
            return None
        return result

    @staticmethod
    def cancel(scheduled: ScheduledAveraging | None) -> None:
        if scheduled is not None:
            scheduled.cancel()

    def apply_outer_step(self, round_index: int, result: AveragingResult | None, snapshot=None) -> None:
        """The replicated outer step; the local model restarts from the new global parameters (plus, with --overlap,
        the progress it made since `snapshot`, the parameters whose update was averaged)."""
        state = self.state
        with state.lock:
            if result is not None:
                state.outer.step_(result.averaged)
            state.round = round_index + 1
            state.averaging_in_background = False
            if snapshot is None:
                state.inner_step = 0
            if self.faults:
                self.faults.after_outer_step(state.round, state.outer.global_params)
                state.outer.changed()  # the fault may have modified the parameters behind the optimizer's back
        if snapshot is None:
            state.outer.copy_to_(self.params)
        else:
            state.outer.rebase_(self.params, snapshot)

    # ---- the overlapped all-reduce (--overlap) -----------------------------------------------------------------
    def start_background_average(self, stats: RoundStats, pseudo_grads, scheduled) -> None:
        pending = start_in_background(
            lambda: self.average(stats, pseudo_grads, scheduled),
            stats=stats,
            params=self.params,
            log=self.log,
        )
        with self.state.lock:
            self.pending = pending
            self.state.averaging_in_background = True
            self.state.inner_step = 0  # the next round's inner steps start now

    def finish_pending(self, *, wait: bool = False) -> bool:
        """Apply the background all-reduce's outer step (waiting for it if `wait`) and publish our hash; True if we
        then resynced to the swarm's state."""
        pending = self.pending
        if wait:
            pending.wait(should_stop=lambda: bool(self.stop))
        if not pending.finished.is_set():
            return False
        self.pending = None
        if pending.result is None and self.stop:
            return False  # leaving mid-all-reduce: this round did not happen for us
        stats = pending.stats
        self.apply_outer_step(stats.round_index, pending.result, snapshot=pending.snapshot)
        stats.allreduce_s = time.perf_counter() - stats.outer_started
        stats.mark("outer_applied")
        # publish our hash; after a missed round adopt the others' state now rather than a round later
        resynced = self.agreement.check_round(pending.result)
        stats.mark("agreed")
        self.log_round(stats, pending.result)
        return resynced

    def wait_for_pending(self) -> None:
        if self.pending is not None:
            self.finish_pending(wait=True)
        if self.pending is not None:  # stopped while the all-reduce ran: let it cancel itself
            self.pending.thread.join(timeout=10.0)

    # ---- 7. metrics, evaluation, checkpoints --------------------------------------------------------------------
    def log_round(self, stats: RoundStats, result: AveragingResult | None) -> None:
        config = self.config
        self.failed_rounds += result is None
        # a resync happens after a failed all-reduce, or when the next round finds the last one left us forked
        resynced, self.resyncs_logged = self.agreement.resyncs > self.resyncs_logged, self.agreement.resyncs
        self.rounds_done += 1
        record = round_record(
            stats,
            result,
            config=config,
            round_number=self.state.round,
            peer_id=self.network.peer_id,
            fingerprint=self.fingerprint,
            params_sha256=self.state.params_hash(),
            total_tokens=self.total_tokens,
            num_params=count_parameters(self.model),
            counters={
                "failed_rounds": self.failed_rounds,
                "resynced": resynced,
                "resyncs": self.agreement.resyncs,
            },
        )
        if config.eval_every and self.state.round % config.eval_every == 0 and self.held_out:
            record["eval_loss"] = self.evaluate_global()
        self.metrics.log_round(record)
        self.log.info(summary_line(record))

    def evaluate_global(self) -> float:
        """Held-out loss of the global parameters (with --overlap the local model is ahead of them)."""
        if self.pending is None and not self.config.outer.overlap:
            return evaluate(self.model, self.held_out, self.device, autocast_dtype=self.autocast_dtype)
        local = [p.detach().clone() for p in self.params]
        self.state.outer.copy_to_(self.params)
        try:
            return evaluate(self.model, self.held_out, self.device, autocast_dtype=self.autocast_dtype)
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, local, strict=True):
                    p.copy_(saved)

    def checkpoint_due(self) -> bool:
        return bool(self.config.checkpoint_dir) and self.state.round % self.config.checkpoint_every == 0

    def resume_from_checkpoint(self) -> None:
        saved = checkpoint.load_latest_checkpoint(self.config.checkpoint_dir)
        if saved is None:
            logger.info("no checkpoint to resume from; starting fresh")
            return
        if saved.get("fingerprint") != self.fingerprint:
            raise checkpoint.CheckpointError(
                f"the checkpoint in {self.config.checkpoint_dir} belongs to another run or model "
                f"(fingerprint {saved.get('fingerprint')}, ours {self.fingerprint})"
            )
        self.state.outer.load_state_tensors_(saved["outer_state"])
        self.state.round = saved["round"]
        self.resumed = saved
        logger.info(f"resumed from checkpoint at round {self.state.round}")

    def save_checkpoint(self, reason: str) -> None:
        with self.state.lock:
            state = {
                "round": self.state.round,
                "outer_state": [t.clone() for t in self.state.outer.state_tensors()],
                "inner_optimizer": self.trainer.optimizer.state_dict(),
                "config": self.config.to_dict(),
                "fingerprint": self.fingerprint,
                "params_sha256": self.state.outer.params_hash(),
                "data_position": self.trainer.batches.state_dict(),
                "param_names": [name for name, _ in self.model.named_parameters()],
                "model_config": self.model.config.to_dict(),  # what peer.export rebuilds the model from
            }
        path = checkpoint.save_checkpoint(
            self.config.checkpoint_dir, state, round_index=self.state.round, keep=self.config.keep_checkpoints
        )
        self.log.info(f"checkpoint ({reason}): {path}")


def run(config: RunConfig, *, run_settings: dict | None = None) -> int:
    """Train until max_rounds or a stop signal; returns the process exit code. `run_settings`: the run's settings to
    publish when this peer adopted them from the run (peer/run_settings.py), else this config's."""
    return Peer(config, StopFlag(), run_settings=run_settings).run()
