"""The peer's training loop: join the swarm, then repeat rounds of H inner steps, all-reduce and outer step."""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from peer import checkpoint
from peer.config import RunConfig, fingerprint, fingerprint_settings
from peer.data import Tokenizer, data_seed, eval_batches, load_corpus, train_batches
from peer.faults import FaultPlan
from peer.inner import build_inner_optimizer, evaluate, inner_lr, inner_step, schedule_step
from peer.metrics import JsonlMetrics, summary_line
from peer.model import architecture, build_model, count_parameters, load_model_config
from peer.outer import AveragingResult, OuterOptimizer, all_finite, tensors_sha256
from peer.swarm import JOIN_MARGIN_S, RoundProgress, ScheduledStep, Swarm, SwarmView

logger = logging.getLogger(__name__)


@dataclass
class SwarmPosition:
    """Where this peer is in the swarm's schedule."""

    round: int = 0
    """Outer steps completed (the round being trained is round + 1 in metrics)."""
    inner_step: int = 0
    """Inner steps done in the current round."""


RESYNC_RETRY_S = 2.0  # pause before retrying a failed state download
CHECK_PERIOD_S = 0.5  # how often the inner phase reads the swarm's progress (DHT lookups cost milliseconds)


@dataclass
class InnerPhase:
    """What one inner phase produced."""

    losses: list[float]
    tokens: int
    tokens_per_s: float
    scheduled: ScheduledStep | None = None
    """This round's all-reduce, if its matchmaking was started during the inner phase."""
    resynced: bool = False
    """The peer adopted the swarm's state during the phase (--overlap): nothing to contribute this round."""


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


@dataclass
class PendingAverage:
    """A round's all-reduce running in the background (--overlap)."""

    stats: RoundStats
    snapshot: list[torch.Tensor]
    """The local parameters whose pseudo-gradient is being averaged."""
    result: AveragingResult | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between inner steps and while waiting for the all-reduce."""

    def __init__(self):
        self.event = threading.Event()
        self.pid = os.getpid()
        self.install()

    def install(self) -> None:
        """(Re)install the handlers; hivemind sets SIGINT to ignored when it starts its averager."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if os.getpid() != self.pid:  # a forked hivemind process inherited this handler
            # Ctrl+C, and a SIGTERM sent to the whole process group (systemd, `timeout`, kill -- -PGID), reach the
            # children too: while the peer's main process lives, it shuts them down gracefully (and SIGKILLs any
            # that hang), so they ignore the signal; an orphaned child obeys SIGTERM
            if signum == signal.SIGTERM and os.getppid() != self.pid:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self.event.is_set():
            raise KeyboardInterrupt  # a second Ctrl+C: leave now
        logger.info(f"received {signal.Signals(signum).name}: finishing the current step and leaving")
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    return torch.device(name)


def write_maddrs_file(path: str, maddrs: list[str]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as file:
        file.write("\n".join(maddrs) + "\n")
    os.replace(tmp, path)


class Peer:
    """One swarm member: builds the model, data and swarm membership, then trains round after round."""

    def __init__(self, config: RunConfig, stop: StopFlag):
        self.config, self.stop = config, stop
        self.device = resolve_device(config.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        tokenizer = Tokenizer(config.data.tokenizer)
        model_config = load_model_config(
            config.model.name, vocab_size=tokenizer.vocab_size, max_seq_len=config.data.seq_len
        )
        self.model = build_model(model_config, seed=config.seed)
        self.settings = fingerprint_settings(
            config, model_arch=architecture(model_config), tokenizer_id=tokenizer.id
        )
        self.fingerprint = fingerprint(self.settings)
        self.corpus = load_corpus(config.data, tokenizer)
        self.params = list(self.model.parameters())
        self.outer = OuterOptimizer(self.params, config.outer)
        self.position = SwarmPosition()
        self.state_lock = threading.Lock()  # the outer state is also read by hivemind's thread for donors
        self.inner_opt_state: dict | None = None
        self.batches_drawn = 0  # so that a resumed peer continues its data stream exactly
        self.recent_inner_s: collections.deque[float] = collections.deque(maxlen=5)
        self.faults = FaultPlan.parse(config.test_fault)
        self.total_tokens = self.rounds_done = self.rounds_started = self.failed_rounds = self.resyncs = 0
        self.pending: PendingAverage | None = None
        self.log: logging.LoggerAdapter = logging.LoggerAdapter(logger, {"peer": "-"})
        if config.resume:
            self._resume_from_checkpoint()

    # ---- state shared with other peers -------------------------------------------------------------------
    def state_for_peers(self) -> tuple[dict, list[torch.Tensor]]:
        """What a newcomer or a resyncing peer downloads from us (runs on hivemind's thread)."""
        with self.state_lock:
            metadata = {
                "round": self.position.round,
                "inner_step": self.position.inner_step if self.pending is None else 0,
                "fingerprint": self.fingerprint,
                "params_sha256": self.outer.params_hash(),
            }
            return metadata, [t.clone() for t in self.outer.state_tensors()]

    def load_swarm_state(self, donors: list[bytes], *, min_round: int) -> bool:
        """Replace our global state with a donor's (verified against its hash); True on success."""
        downloaded = self.swarm.download_state(donors)
        if downloaded is None:
            return False
        metadata, tensors = downloaded
        if metadata.get("fingerprint") != self.fingerprint or metadata.get("round", -1) < min_round:
            self.log.warning(f"donor state is not usable: {metadata}")
            return False
        if tensors_sha256(tensors[: len(self.outer.global_params)]) != metadata["params_sha256"]:
            self.log.warning("downloaded state does not match its hash; discarded")
            return False
        with self.state_lock:
            self.outer.load_state_tensors_(tensors)
            self.position.round = metadata["round"]
            self.position.inner_step = min(metadata["inner_step"], self.config.inner.steps - 1)
        self.outer.copy_to_(self.params)
        return True

    # ---- start ---------------------------------------------------------------------------------------------
    def join_swarm(self) -> None:
        config = self.config
        self.swarm = Swarm(
            config,
            settings=self.settings,
            fingerprint=self.fingerprint,
            averaged_tensors=[torch.zeros_like(p) for p in self.outer.global_params],
            state_provider=self.state_for_peers,
        )
        self.stop.install()
        self.log = logging.LoggerAdapter(logger, {"peer": self.swarm.short_id})
        maddrs = self.swarm.visible_maddrs()
        if config.swarm.maddrs_file:
            write_maddrs_file(config.swarm.maddrs_file, maddrs)
        if not config.swarm.initial_peers:
            print(f"Started a new swarm. Others join with: --initial-peers {' '.join(maddrs)}", flush=True)
        self.log.info(
            f"peer {self.swarm.peer_id} | run {config.swarm.run_id} fingerprint {self.fingerprint} | "
            f"model {config.model.name} {count_parameters(self.model) / 1e6:.2f}M params | device {self.device}"
        )
        if config.swarm.wait_for_peers > 1 and self.swarm.latest_view() is None:
            live = self.swarm.wait_for_peers(
                config.swarm.wait_for_peers,
                timeout_s=config.swarm.state_timeout_s,
                should_stop=lambda: bool(self.stop),
            )
            self.log.info(f"{live} peers live; starting")
        # I4: a newcomer (or a peer resuming behind the swarm) starts from the swarm's current state
        view = self.swarm.latest_view()
        if view is not None and view.majority_hash is not None and view.round_index >= self.position.round:
            if self.load_swarm_state(view.donors, min_round=view.round_index):
                self.log.info(
                    f"joined the swarm at round {self.position.round}, inner step {self.position.inner_step}"
                )
            else:
                self.log.warning("could not download the swarm's state; starting from our own")

    def prepare_training(self) -> None:
        config = self.config
        self.model.to(self.device)
        self.outer.copy_to_(self.params)
        self.inner_opt = build_inner_optimizer(self.model, config.inner)
        if self.inner_opt_state is not None:
            self.inner_opt.load_state_dict(self.inner_opt_state)
        stream_id = config.data.data_shard or str(self.swarm.peer_id)
        seed = data_seed(config.seed, stream_id)
        self.order_key = seed.to_bytes(8, "big")  # this peer's place in the canonical summation order
        self.batches = train_batches(
            self.corpus.train,
            skip=self.batches_drawn,
            batch_size=config.data.batch_size,
            seq_len=config.data.seq_len,
            seed=seed,
            shard=config.data.shard,
        )
        self.held_out = eval_batches(
            self.corpus.eval,
            batch_size=config.data.batch_size,
            seq_len=config.data.seq_len,
            num_batches=config.eval_batches,
        )
        self.metrics = JsonlMetrics(config.metrics_file)

    # ---- one round -----------------------------------------------------------------------------------------
    @property
    def training_round(self) -> int:
        """The round whose inner steps run now: with an all-reduce in flight (--overlap), the one after it."""
        return self.position.round + (1 if self.pending is not None else 0)

    def inner_phase(self, round_index: int) -> InnerPhase:
        """Inner AdamW steps until the round ends: H steps, or with --round-tokens until the swarm has processed
        the budget. Meanwhile: apply a finished background all-reduce (--overlap) and schedule this round's
        matchmaking so that the group is ready when the inner steps end."""
        config, H = self.config, self.config.inner.steps
        budget = config.inner.round_tokens
        tokens_per_step = config.data.batch_size * config.data.seq_len
        first_step = self.position.inner_step
        phase = InnerPhase(losses=[], tokens=0, tokens_per_s=0.0)
        started = time.perf_counter()
        next_check = started + CHECK_PERIOD_S
        bar = tqdm(desc=f"[{self.swarm.short_id}] round {round_index + 1}", leave=False, disable=None)
        step = first_step
        while not self.stop and (step < H if not budget else phase.tokens < budget):
            lr = inner_lr(
                schedule_step(round_index, step, steps_per_round=H),
                config=config.inner,
                total_steps=config.total_inner_steps,
            )
            step_started = time.perf_counter()
            batch = next(self.batches).to(self.device)
            self.batches_drawn += 1
            phase.losses.append(
                inner_step(self.model, self.inner_opt, batch, lr=lr, grad_clip=config.inner.grad_clip)
            )
            step += 1
            phase.tokens += tokens_per_step
            with self.state_lock:
                self.position.inner_step = step
            if self.faults:
                self.faults.after_inner_step(time.perf_counter() - step_started)
            now = time.perf_counter()
            phase.tokens_per_s = phase.tokens / (now - started)
            steps_left = H - step if not budget else max(0, budget - phase.tokens) // tokens_per_step
            self.swarm.report_progress(
                round_index=round_index,
                inner_step=step,
                tokens=phase.tokens,
                done=False,
                tokens_per_s=phase.tokens_per_s,
                eta=swarm_time() + steps_left * (now - started) / len(phase.losses),
                now=step == first_step + 1,
            )
            bar.update()
            bar.set_postfix(loss=f"{phase.losses[-1]:.3f}")
            if self.pending is not None and self.pending.finished.is_set():
                resyncs = self.resyncs
                self.finish_pending()
                if self.resyncs != resyncs:  # the swarm's state replaced ours: this round's steps are void
                    phase.resynced = True
                    break
            if now >= next_check:
                next_check = now + CHECK_PERIOD_S
                if self.watch_round_end(round_index, phase):
                    break
        bar.close()
        self.swarm.report_progress(
            round_index=round_index,
            inner_step=step,
            tokens=phase.tokens,
            done=True,
            tokens_per_s=phase.tokens_per_s,
            eta=swarm_time(),
            now=True,
        )
        return phase

    def watch_round_end(self, round_index: int, phase: InnerPhase) -> bool:
        """Pre-schedule this round's matchmaking once its end is near; True to end the inner phase now: with
        --round-tokens when the swarm reached the budget (or another peer ended the round), and whenever our
        global parameters turn out to differ from the swarm's (train_one_round then resyncs us)."""
        progress = self.swarm.round_progress(round_index, straggler_wait_s=self.straggler_wait_s())
        if phase.scheduled is None and self.should_schedule(progress):
            if self.forked_from_swarm() is not None:
                return True  # never join a group with a forked model: leaving it later would fail the group
            # Every peer of the round must start matchmaking before the group forms: the first to schedule
            # leaves the others time to see its record (progress_period_s) and everyone adopts its time.
            scheduled_time = progress.scheduled_time or max(
                progress.end_eta, swarm_time() + self.schedule_slack_s(progress)
            )
            phase.scheduled = self.swarm.schedule_averaging(
                round_index,
                scheduled_time=scheduled_time,
                order_key=self.order_key,
                how="adopted" if progress.scheduled_time else "own",
            )
        return bool(self.config.inner.round_tokens) and progress.closed

    def should_schedule(self, progress: RoundProgress) -> bool:
        """Start this round's matchmaking now? Only without --overlap (there the all-reduce runs behind the next
        round's compute anyway, and the robust way, waiting until every peer is done, costs nothing), only
        once every live peer has reached the round, and only if we will be done by the group's time."""
        swarm, now = self.config.swarm, swarm_time()
        if self.config.outer.overlap or progress.peers < 2 or not progress.all_in_round:
            return False
        my_eta = self.swarm.my_eta()
        if progress.scheduled_time and self.config.inner.round_tokens:  # the round ends for all at once
            return progress.scheduled_time > now + JOIN_MARGIN_S
        if progress.scheduled_time:  # another peer chose the group's time: join if we can make it
            return (
                progress.scheduled_time > now + JOIN_MARGIN_S
                and my_eta <= progress.scheduled_time + swarm.chunk_timeout_s / 2
            )
        return progress.end_eta - now <= self.schedule_slack_s(progress) + 2 * CHECK_PERIOD_S

    def schedule_slack_s(self, progress: RoundProgress) -> float:
        """How far ahead of its group time the first peer starts matchmaking: long enough for hivemind to match,
        and for every other peer of the round to see the chosen time (after its current inner step and the
        next progress publication) and still join."""
        swarm = self.config.swarm
        return swarm.matchmaking_s + swarm.progress_period_s + progress.slowest_step_s + JOIN_MARGIN_S

    def pseudo_gradient_or_none(self, round_index: int, tokens: int) -> list[torch.Tensor] | None:
        pseudo_grads = self.outer.pseudo_gradient(self.params)
        if all_finite(pseudo_grads) and tokens > 0:  # I6: never contribute a non-finite update
            return pseudo_grads
        self.log.warning(f"round {round_index + 1}: local update is not finite or empty; not contributing")
        return None

    def average(self, stats: RoundStats, pseudo_grads, scheduled) -> AveragingResult | None:
        round_index = stats.round_index
        if pseudo_grads is None:
            if scheduled is not None:
                scheduled.control.cancel()
            return None
        return self.swarm.average(
            pseudo_grads,
            round_index=round_index,
            tokens=stats.tokens,
            order_key=self.order_key,
            should_stop=lambda: bool(self.stop),
            straggler_wait_s=self.straggler_wait_s(),
            scheduled=scheduled,
            during_allreduce=(lambda: self.faults.during_allreduce(round_index + 1)) if self.faults else None,
        )

    def apply_outer_step(self, round_index: int, result: AveragingResult | None, snapshot=None) -> None:
        """The replicated outer step; the local model restarts from the new global parameters (plus, with
        --overlap, the progress it made since `snapshot`, the parameters whose update was averaged)."""
        with self.state_lock:
            if result is not None:
                self.outer.step_(result.averaged)
            self.position.round = round_index + 1
            if snapshot is None:
                self.position.inner_step = 0
            if self.faults:
                self.faults.after_outer_step(self.position.round, self.outer.global_params)
        if snapshot is None:
            self.outer.copy_to_(self.params)
        else:
            self.outer.rebase_(self.params, snapshot)

    def straggler_wait_s(self) -> float:
        """How long to wait for slower peers: the flag, or one median inner phase of ours (at least 10 s)."""
        if self.config.swarm.straggler_wait_s > 0:
            return self.config.swarm.straggler_wait_s
        recent = sorted(self.recent_inner_s)
        return max(10.0, recent[len(recent) // 2]) if recent else 60.0

    def check_agreement(self, result: AveragingResult | None) -> bool:
        """Publish our hash; if the majority of this round's peers holds another one, adopt their state (I3).
        Returns True if we resynced."""
        round_index, params_hash = self.position.round, self.outer.params_hash()
        self.swarm.publish_hash(round_index, params_hash)
        swarm = self.config.swarm
        if result is not None:  # the group published (or is publishing) its hashes right now
            expected, timeout_s = result.group_size, swarm.matchmaking_s
        else:  # we failed; the others may still be finishing their all-reduce
            expected = len(self.swarm.live_peers())
            timeout_s = min(swarm.allreduce_timeout_s, 4 * swarm.matchmaking_s + 5)
        view = self.swarm.view_of_round(round_index, expected=expected, timeout_s=timeout_s)
        if view.majority_hash in (None, params_hash) or not view.donors:
            return False
        return self.resync(view, reason=f"our hash {params_hash[:10]} differs from the majority")

    def resync(self, view: SwarmView, *, reason: str) -> bool:
        self.log.warning(
            f"round {view.round_index}: {reason} {view.majority_hash[:10]} ({view.num_records} peers); "
            "downloading their state"
        )
        if not self.load_swarm_state(view.donors, min_round=view.round_index):
            self.log.warning(f"round {view.round_index}: resync failed; will retry")
            return False
        self.resyncs += 1
        self.swarm.publish_hash(self.position.round, self.outer.params_hash())
        return True

    def forked_from_swarm(self) -> SwarmView | None:
        """The swarm's view of our current round if the majority holds other global parameters than ours."""
        view = self.swarm.view_of_round(self.position.round, expected=1, timeout_s=0.0)
        if view.majority_hash in (None, self.outer.params_hash()) or not view.donors:
            return None
        return view

    def train_one_round(self) -> bool:
        """Inner phase, all-reduce, outer step, agreement check, metrics; False if stopped mid-round.
        With --overlap the all-reduce and outer step are handed to a background thread instead."""
        config = self.config
        round_index = self.training_round
        inner_started, inner_started_at = time.perf_counter(), time.time()
        phase = self.inner_phase(round_index)
        inner_s = time.perf_counter() - inner_started
        if self.pending is not None and not self.stop and not phase.resynced:
            resyncs = self.resyncs
            self.finish_pending(wait=True)  # at most one all-reduce in flight
            phase.resynced = self.resyncs != resyncs
        if self.stop or phase.resynced:
            if phase.scheduled is not None:
                phase.scheduled.control.cancel()
            return not self.stop
        if config.inner.round_tokens or len(phase.losses) == config.inner.steps:
            self.recent_inner_s.append(inner_s)  # only full inner phases say how long a round takes
        forked = self.forked_from_swarm()
        if forked is not None:  # never contribute an update computed on a forked model
            if phase.scheduled is not None:
                phase.scheduled.control.cancel()
            if not self.resync(forked, reason="before averaging: our parameters differ from the majority"):
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
        )
        pseudo_grads = self.pseudo_gradient_or_none(round_index, phase.tokens)
        if config.outer.overlap:
            self.start_background_average(stats, pseudo_grads, phase.scheduled)
            return True
        result = self.average(stats, pseudo_grads, phase.scheduled)
        if result is None and self.stop:
            return False  # leaving mid-all-reduce: this round did not happen for us
        self.apply_outer_step(round_index, result)
        stats.allreduce_s = time.perf_counter() - stats.outer_started
        self.log_round(stats, result, resynced=self.check_agreement(result))
        if self.faults:
            self.faults.after_round(self.position.round)
        return True

    # ---- overlapped all-reduce (--overlap) ------------------------------------------------------------------
    def start_background_average(self, stats: RoundStats, pseudo_grads, scheduled) -> None:
        pending = PendingAverage(stats=stats, snapshot=[p.detach().clone() for p in self.params])

        def work():
            try:
                pending.result = self.average(stats, pseudo_grads, scheduled)
            except Exception as e:  # the round fails; the agreement check repairs us
                self.log.warning(f"round {stats.round_index + 1}: background all-reduce failed: {e!r}")
            finally:
                pending.finished.set()

        with self.state_lock:
            self.pending = pending
            self.position.inner_step = 0  # the next round's inner steps start now
        pending.thread = threading.Thread(target=work, name="averaging", daemon=True)
        pending.thread.start()

    def finish_pending(self, *, wait: bool = False) -> None:
        """Apply the background all-reduce's outer step (waiting for it if `wait`), then publish our hash."""
        pending = self.pending
        while wait and not pending.finished.wait(timeout=0.25) and not self.stop:
            pass
        if not pending.finished.is_set():
            return
        self.pending = None
        if pending.result is None and self.stop:
            return  # leaving mid-all-reduce: this round did not happen for us
        stats = pending.stats
        self.apply_outer_step(stats.round_index, pending.result, snapshot=pending.snapshot)
        stats.allreduce_s = time.perf_counter() - stats.outer_started
        if pending.result is not None:
            # the swarm's hashes of this round are checked before our next contribution (forked_from_swarm)
            self.swarm.publish_hash(self.position.round, self.outer.params_hash())
            resynced = False
        else:  # we missed the round; if the others did not, adopt their state now rather than a round later
            resynced = self.check_agreement(None)
        self.log_round(stats, pending.result, resynced=resynced)

    def wait_for_pending(self) -> None:
        if self.pending is not None:
            self.finish_pending(wait=True)
        if self.pending is not None:  # stopped while the all-reduce ran: let it cancel itself
            self.pending.thread.join(timeout=10.0)

    # ---- metrics -------------------------------------------------------------------------------------------
    def log_round(self, stats: RoundStats, result: AveragingResult | None, *, resynced: bool) -> None:
        config, H = self.config, self.config.inner.steps
        self.failed_rounds += result is None
        self.rounds_done += 1
        record = {
            "round": self.position.round,
            "peer_id": str(self.swarm.peer_id),
            "fingerprint": self.fingerprint,
            "loss": sum(stats.losses) / max(1, len(stats.losses)),
            "group_size": result.group_size if result else 0,
            "global_params_sha256": self.outer.params_hash(),
            "tokens": self.total_tokens,
            "round_tokens": stats.tokens,
            "inner_steps": len(stats.losses),
            "num_params": count_parameters(self.model),
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
            "failed_rounds": self.failed_rounds,
            "resynced": resynced,
            "resyncs": self.resyncs,
            "time": time.time(),
            "bytes_sent": 0,
            "bytes_received": 0,
            **(result.info if result else {}),
        }
        # time from our last inner step to the start of the data transfer (waiting for peers, matchmaking)
        started_at = record.pop("transfer_started_at", None)
        record["sync_wait_s"] = max(0.0, started_at - stats.inner_ended_at) if started_at else None
        if config.eval_every and self.position.round % config.eval_every == 0 and self.held_out:
            record["eval_loss"] = self.evaluate_global()
        self.metrics.log_round(record)
        self.log.info(summary_line(record))

    def evaluate_global(self) -> float:
        """Held-out loss of the global parameters (with --overlap the local model is ahead of them)."""
        if self.pending is None and not self.config.outer.overlap:
            return evaluate(self.model, self.held_out, self.device)
        local = [p.detach().clone() for p in self.params]
        self.outer.copy_to_(self.params)
        try:
            return evaluate(self.model, self.held_out, self.device)
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, local, strict=True):
                    p.copy_(saved)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _resume_from_checkpoint(self) -> None:
        saved = checkpoint.load_latest_checkpoint(self.config.checkpoint_dir)
        if saved is None:
            logger.info("no checkpoint to resume from; starting fresh")
            return
        if saved.get("fingerprint") != self.fingerprint:
            raise checkpoint.CheckpointError(
                f"the checkpoint in {self.config.checkpoint_dir} belongs to another run or model "
                f"(fingerprint {saved.get('fingerprint')}, ours {self.fingerprint})"
            )
        self.outer.load_state_tensors_(saved["outer_state"])
        self.position.round = saved["round"]
        self.inner_opt_state = saved.get("inner_optimizer")
        self.batches_drawn = saved.get("batches_drawn", 0)
        logger.info(f"resumed from checkpoint at round {self.position.round}")

    def save_checkpoint(self, reason: str) -> None:
        with self.state_lock:
            state = {
                "round": self.position.round,
                "outer_state": [t.clone() for t in self.outer.state_tensors()],
                "inner_optimizer": self.inner_opt.state_dict(),
                "config": self.config.to_dict(),
                "fingerprint": self.fingerprint,
                "params_sha256": self.outer.params_hash(),
                "batches_drawn": self.batches_drawn,
            }
        path = checkpoint.save_checkpoint(
            self.config.checkpoint_dir,
            state,
            round_index=self.position.round,
            keep=self.config.keep_checkpoints,
        )
        self.log.info(f"checkpoint ({reason}): {path}")

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> int:
        config = self.config
        try:
            self.join_swarm()
            self.prepare_training()
            last_checkpoint = self.position.round
            while not self.stop and (config.max_rounds == 0 or self.rounds_started < config.max_rounds):
                if not self.train_one_round():
                    break
                if (
                    config.checkpoint_dir
                    and self.position.round != last_checkpoint
                    and self.position.round % config.checkpoint_every == 0
                ):
                    self.save_checkpoint("periodic")
                    last_checkpoint = self.position.round
            self.wait_for_pending()
        except KeyboardInterrupt:
            self.log.warning("interrupted twice: leaving without waiting")
        finally:
            self.wait_for_pending()
            if config.checkpoint_dir and hasattr(self, "inner_opt") and self.rounds_done > 0:
                self.save_checkpoint("shutdown")
            if hasattr(self, "swarm"):
                self.swarm.shutdown()
        self.log.info(
            f"left the swarm after {self.rounds_done} rounds ({self.failed_rounds} failed, {self.resyncs} resyncs)"
        )
        return 0


def run(config: RunConfig) -> int:
    """Train until max_rounds or a stop signal; returns the process exit code."""
    return Peer(config, StopFlag()).run()


def swarm_time() -> float:
    """The clock used in DHT records (hivemind's DHT time)."""
    from hivemind.utils.timed_storage import get_dht_time  # train.py only needs hivemind's clock

    return get_dht_time()
