"""The peer's training loop: join the swarm, then repeat rounds of H inner steps, all-reduce and outer step."""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from peer import checkpoint
from peer.config import RunConfig, fingerprint, fingerprint_settings
from peer.data import Tokenizer, data_seed, eval_batches, load_corpus, train_batches
from peer.faults import FaultPlan
from peer.inner import build_inner_optimizer, evaluate, inner_lr, inner_step
from peer.metrics import JsonlMetrics, summary_line
from peer.model import architecture, build_model, count_parameters, load_model_config
from peer.outer import AveragingResult, OuterOptimizer, all_finite, tensors_sha256
from peer.swarm import Swarm, SwarmView

logger = logging.getLogger(__name__)


@dataclass
class SwarmPosition:
    """Where this peer is in the swarm's schedule."""

    round: int = 0
    """Outer steps completed (the round being trained is round + 1 in metrics)."""
    inner_step: int = 0
    """Inner steps done in the current round."""


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
        if os.getpid() != self.pid:
            return  # a forked hivemind process: the main process shuts it down
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
        self.total_tokens = self.rounds_done = self.failed_rounds = self.resyncs = 0
        self.log: logging.LoggerAdapter = logging.LoggerAdapter(logger, {"peer": "-"})
        if config.resume:
            self._resume_from_checkpoint()

    # ---- state shared with other peers -------------------------------------------------------------------
    def state_for_peers(self) -> tuple[dict, list[torch.Tensor]]:
        """What a newcomer or a resyncing peer downloads from us (runs on hivemind's thread)."""
        with self.state_lock:
            metadata = {
                "round": self.position.round,
                "inner_step": self.position.inner_step,
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
    def inner_phase(self) -> tuple[list[float], float]:
        """Inner AdamW steps from the current schedule position to H; returns (losses, tokens per second)."""
        config, H = self.config, self.config.inner.steps
        round_index, first_step = self.position.round, self.position.inner_step
        tokens_per_step = config.data.batch_size * config.data.seq_len
        started = time.perf_counter()
        losses: list[float] = []
        bar = tqdm(
            range(first_step, H),
            desc=f"[{self.swarm.short_id}] round {round_index + 1}",
            leave=False,
            disable=None,
            dynamic_ncols=True,
        )
        for step in bar:
            if self.stop:
                break
            lr = inner_lr(round_index * H + step, config=config.inner, total_steps=config.total_inner_steps)
            step_started = time.perf_counter()
            batch = next(self.batches).to(self.device)
            self.batches_drawn += 1
            losses.append(
                inner_step(self.model, self.inner_opt, batch, lr=lr, grad_clip=config.inner.grad_clip)
            )
            with self.state_lock:
                self.position.inner_step = step + 1
            if self.faults:
                self.faults.after_inner_step(time.perf_counter() - step_started)
            elapsed = time.perf_counter() - started
            self.swarm.report_progress(
                round_index=round_index,
                inner_step=step + 1,
                tokens_per_s=len(losses) * tokens_per_step / elapsed,
                eta=swarm_time() + (H - step - 1) * elapsed / len(losses),
                now=step == first_step,
            )
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            self.log.debug(f"round {round_index + 1} step {step + 1}/{H} loss {losses[-1]:.4f} lr {lr:.2e}")
        bar.close()
        elapsed = time.perf_counter() - started
        return losses, len(losses) * tokens_per_step / max(elapsed, 1e-9)

    def outer_phase(self, round_tokens: int) -> AveragingResult | None:
        """All-reduce the pseudo-gradients and apply the replicated outer step; None if the all-reduce failed."""
        round_index = self.position.round
        pseudo_grads = self.outer.pseudo_gradient(self.params)
        self.swarm.report_progress(
            round_index=round_index,
            inner_step=self.config.inner.steps,
            tokens_per_s=0.0,
            eta=swarm_time(),
            now=True,
        )
        result = None
        if all_finite(pseudo_grads) and round_tokens > 0:  # I6: never contribute a non-finite update
            result = self.swarm.average(
                pseudo_grads,
                round_index=round_index,
                tokens=round_tokens,
                order_key=self.order_key,
                should_stop=lambda: bool(self.stop),
                straggler_wait_s=self.straggler_wait_s(),
                during_allreduce=(lambda: self.faults.during_allreduce(round_index + 1))
                if self.faults
                else None,
            )
        else:
            self.log.warning(
                f"round {round_index + 1}: local update is not finite or empty; not contributing"
            )
        if result is None and self.stop:
            return None  # leaving mid-all-reduce: this round did not happen for us
        with self.state_lock:
            if result is not None:
                self.outer.step_(result.averaged)
            self.position.round, self.position.inner_step = round_index + 1, 0
            if self.faults:
                self.faults.after_outer_step(self.position.round, self.outer.global_params)
        self.outer.copy_to_(self.params)
        return result

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
        """Inner phase, outer phase, agreement check, metrics; False if stopped mid-round."""
        config, H = self.config, self.config.inner.steps
        round_index = self.position.round
        inner_started = time.perf_counter()
        losses, tokens_per_s = self.inner_phase()
        if self.stop:
            return False
        inner_s = time.perf_counter() - inner_started
        if len(losses) == H:  # only full inner phases say how long a round takes
            self.recent_inner_s.append(inner_s)
        forked = self.forked_from_swarm()
        if forked is not None:  # never contribute an update computed on a forked model
            self.resync(forked, reason="before averaging: our parameters differ from the majority")
            return True
        round_tokens = len(losses) * config.data.batch_size * config.data.seq_len
        self.total_tokens += round_tokens
        outer_started, inner_ended_at = time.perf_counter(), time.time()
        result = self.outer_phase(round_tokens)
        if result is None and self.stop:
            return False
        allreduce_s = time.perf_counter() - outer_started
        self.failed_rounds += result is None
        resynced = self.check_agreement(result)
        self.rounds_done += 1
        record = {
            "round": self.position.round,
            "peer_id": str(self.swarm.peer_id),
            "fingerprint": self.fingerprint,
            "loss": sum(losses) / max(1, len(losses)),
            "group_size": result.group_size if result else 0,
            "global_params_sha256": self.outer.params_hash(),
            "tokens": self.total_tokens,
            "round_tokens": round_tokens,
            "num_params": count_parameters(self.model),
            "tokens_per_s": tokens_per_s,
            "inner_s": inner_s,
            "allreduce_s": allreduce_s,
            "lr": inner_lr(
                round_index * H + H - 1, config=config.inner, total_steps=config.total_inner_steps
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
        record["sync_wait_s"] = max(0.0, started_at - inner_ended_at) if started_at else None
        if config.eval_every and self.position.round % config.eval_every == 0 and self.held_out:
            record["eval_loss"] = evaluate(self.model, self.held_out, self.device)
        self.metrics.log_round(record)
        self.log.info(summary_line(record))
        return True

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
            while not self.stop and (config.max_rounds == 0 or self.rounds_done < config.max_rounds):
                if not self.train_one_round():
                    break
                if config.checkpoint_dir and self.position.round % config.checkpoint_every == 0:
                    self.save_checkpoint("periodic")
        except KeyboardInterrupt:
            self.log.warning("interrupted twice: leaving without waiting")
        finally:
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
