"""The peer's training loop: join the swarm, then repeat rounds of H inner steps, all-reduce and outer step."""

from __future__ import annotations

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
from peer.inner import build_inner_optimizer, evaluate, inner_lr, inner_step
from peer.metrics import JsonlMetrics, summary_line
from peer.model import architecture, build_model, count_parameters, load_model_config
from peer.outer import OuterOptimizer, all_finite, tensors_sha256
from peer.swarm import Swarm

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


def run(config: RunConfig) -> int:
    """Train until max_rounds or a stop signal; returns the process exit code."""
    stop = StopFlag()
    device = resolve_device(config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    tokenizer = Tokenizer(config.data.tokenizer)
    model_config = load_model_config(
        config.model.name, vocab_size=tokenizer.vocab_size, max_seq_len=config.data.seq_len
    )
    model = build_model(model_config, seed=config.seed)
    settings = fingerprint_settings(config, model_arch=architecture(model_config), tokenizer_id=tokenizer.id)
    run_fingerprint = fingerprint(settings)
    corpus = load_corpus(config.data, tokenizer)
    params = list(model.parameters())
    outer = OuterOptimizer(params, config.outer)
    position = SwarmPosition()
    state_lock = threading.Lock()
    inner_opt_state: dict | None = None

    if config.resume:
        saved = checkpoint.load_latest_checkpoint(config.checkpoint_dir)
        if saved is not None:
            outer.load_state_tensors_(saved["outer_state"])
            position.round = saved["round"]
            inner_opt_state = saved.get("inner_optimizer")
            logger.info(f"resumed from checkpoint at round {position.round}")

    def state_for_peers() -> tuple[dict, list[torch.Tensor]]:
        """What a newcomer or a resyncing peer downloads from us (runs on hivemind's thread)."""
        with state_lock:
            metadata = {
                "round": position.round,
                "inner_step": position.inner_step,
                "fingerprint": run_fingerprint,
                "params_sha256": outer.params_hash(),
            }
            return metadata, [t.clone() for t in outer.state_tensors()]

    swarm = Swarm(
        config,
        settings=settings,
        fingerprint=run_fingerprint,
        averaged_tensors=[torch.zeros_like(p) for p in outer.global_params],
        state_provider=state_for_peers,
    )
    stop.install()
    log = logging.LoggerAdapter(logger, {"peer": swarm.short_id})
    maddrs = swarm.visible_maddrs()
    if config.swarm.maddrs_file:
        write_maddrs_file(config.swarm.maddrs_file, maddrs)
    if not config.swarm.initial_peers:
        print(f"Started a new swarm. Others join with: --initial-peers {' '.join(maddrs)}", flush=True)
    log.info(
        f"peer {swarm.peer_id} | run {config.swarm.run_id} fingerprint {run_fingerprint} | "
        f"model {config.model.name} {count_parameters(model) / 1e6:.2f}M params | device {device}"
    )

    def load_swarm_state(donors: list[bytes], *, min_round: int) -> bool:
        """Replace our global state with a donor's (verified by its hash); True on success."""
        downloaded = swarm.download_state(donors)
        if downloaded is None:
            return False
        metadata, tensors = downloaded
        if metadata.get("fingerprint") != run_fingerprint or metadata.get("round", -1) < min_round:
            log.warning(f"donor state is not usable: {metadata}")
            return False
        if tensors_sha256(tensors[: len(outer.global_params)]) != metadata["params_sha256"]:
            log.warning("downloaded state does not match its hash; discarded")
            return False
        with state_lock:
            outer.load_state_tensors_(tensors)
            position.round, position.inner_step = (
                metadata["round"],
                min(metadata["inner_step"], config.inner.steps - 1),
            )
        return True

    if config.swarm.wait_for_peers > 1 and swarm.latest_view() is None:
        live = swarm.wait_for_peers(
            config.swarm.wait_for_peers,
            timeout_s=config.swarm.state_timeout_s,
            should_stop=lambda: bool(stop),
        )
        log.info(f"{live} peers live; starting")

    # I4: a newcomer (or a peer resuming behind the swarm) starts from the swarm's current state
    view = swarm.latest_view()
    if view is not None and view.majority_hash is not None and view.round_index >= position.round:
        if load_swarm_state(view.donors, min_round=view.round_index):
            log.info(f"joined the swarm at round {position.round}, inner step {position.inner_step}")
        else:
            log.warning("could not download the swarm's state; starting from our own")

    model.to(device)
    outer.copy_to_(params)
    inner_opt = build_inner_optimizer(model, config.inner)
    if inner_opt_state is not None:
        inner_opt.load_state_dict(inner_opt_state)
    stream_id = config.data.data_shard or str(swarm.peer_id)
    seed = data_seed(config.seed, stream_id)
    order_key = seed.to_bytes(8, "big")
    batches = train_batches(
        corpus.train,
        batch_size=config.data.batch_size,
        seq_len=config.data.seq_len,
        seed=seed,
        shard=config.data.shard,
    )
    held_out = eval_batches(
        corpus.eval,
        batch_size=config.data.batch_size,
        seq_len=config.data.seq_len,
        num_batches=config.eval_batches,
    )
    metrics = JsonlMetrics(config.metrics_file)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    total_tokens, rounds_done, failed_rounds, resyncs = 0, 0, 0, 0
    tokens_per_s = 0.0
    H = config.inner.steps

    def save(reason: str) -> None:
        if not config.checkpoint_dir:
            return
        with state_lock:
            state = {
                "round": position.round,
                "outer_state": [t.clone() for t in outer.state_tensors()],
                "inner_optimizer": inner_opt.state_dict(),
                "config": config.to_dict(),
                "fingerprint": run_fingerprint,
                "params_sha256": outer.params_hash(),
            }
        path = checkpoint.save_checkpoint(
            config.checkpoint_dir, state, round_index=position.round, keep=config.keep_checkpoints
        )
        log.info(f"checkpoint ({reason}): {path}")

    try:
        while not stop and (config.max_rounds == 0 or rounds_done < config.max_rounds):
            # ---- inner phase: H local AdamW steps from the global parameters ----
            round_index, first_step = position.round, position.inner_step
            inner_started = time.perf_counter()
            losses = []
            bar = tqdm(
                range(first_step, H),
                desc=f"[{swarm.short_id}] round {round_index + 1}",
                leave=False,
                disable=None,
                dynamic_ncols=True,
            )
            for step in bar:
                if stop:
                    break
                lr = inner_lr(
                    round_index * H + step, config=config.inner, total_steps=config.total_inner_steps
                )
                loss = inner_step(
                    model, inner_opt, next(batches).to(device), lr=lr, grad_clip=config.inner.grad_clip
                )
                losses.append(loss)
                with state_lock:
                    position.inner_step = step + 1
                elapsed = time.perf_counter() - inner_started
                tokens_per_s = len(losses) * tokens_per_step / max(elapsed, 1e-9)
                eta = swarm_time() + (H - step - 1) * elapsed / len(losses)
                swarm.report_progress(
                    round_index=round_index,
                    inner_step=step + 1,
                    tokens_per_s=tokens_per_s,
                    eta=eta,
                    now=step == first_step,
                )
                bar.set_postfix(loss=f"{loss:.3f}")
                log.debug(f"round {round_index + 1} step {step + 1}/{H} loss {loss:.4f} lr {lr:.2e}")
            bar.close()
            if stop:
                break
            inner_s = time.perf_counter() - inner_started
            round_tokens = len(losses) * tokens_per_step
            total_tokens += round_tokens

            # ---- all-reduce of pseudo-gradients, then the replicated outer step ----
            pseudo_grads = outer.pseudo_gradient(params)
            swarm.report_progress(
                round_index=round_index, inner_step=H, tokens_per_s=tokens_per_s, eta=swarm_time(), now=True
            )
            allreduce_started = time.perf_counter()
            result = None
            if all_finite(pseudo_grads) and round_tokens > 0:  # I6: never contribute a non-finite update
                result = swarm.average(
                    pseudo_grads,
                    round_index=round_index,
                    tokens=round_tokens,
                    order_key=order_key,
                    should_stop=lambda: bool(stop),
                )
            else:
                log.warning(f"round {round_index + 1}: local update is not finite; not contributing")
            allreduce_s = time.perf_counter() - allreduce_started
            with state_lock:
                if result is not None:
                    outer.step_(result.averaged)
                position.round, position.inner_step = round_index + 1, 0
            failed_rounds += result is None
            outer.copy_to_(params)

            # ---- agreement check (I1/I3): adopt the majority's state if ours differs ----
            params_hash = outer.params_hash()
            swarm.publish_hash(position.round, params_hash)
            view = swarm.view_of_round(
                position.round,
                expected=result.group_size if result else 2,
                timeout_s=config.swarm.matchmaking_s,
            )
            resynced = False
            if view.majority_hash not in (None, params_hash) and view.donors:
                log.warning(
                    f"round {position.round}: our hash {params_hash[:10]} differs from the majority "
                    f"{view.majority_hash[:10]} ({view.num_records} peers); downloading their state"
                )
                resynced = load_swarm_state(view.donors, min_round=position.round)
                if resynced:
                    resyncs += 1
                    outer.copy_to_(params)
                    params_hash = outer.params_hash()
                    swarm.publish_hash(position.round, params_hash)
            rounds_done += 1

            record = {
                "round": position.round,
                "peer_id": str(swarm.peer_id),
                "fingerprint": run_fingerprint,
                "loss": sum(losses) / max(1, len(losses)),
                "group_size": result.group_size if result else 0,
                "global_params_sha256": params_hash,
                "tokens": total_tokens,
                "round_tokens": round_tokens,
                "tokens_per_s": tokens_per_s,
                "inner_s": inner_s,
                "allreduce_s": allreduce_s,
                "lr": inner_lr(
                    round_index * H + H - 1, config=config.inner, total_steps=config.total_inner_steps
                ),
                "failed": result is None,
                "failed_rounds": failed_rounds,
                "resynced": resynced,
                "resyncs": resyncs,
                "time": time.time(),
                **(result.info if result else {}),
            }
            if config.eval_every and position.round % config.eval_every == 0 and held_out:
                record["eval_loss"] = evaluate(model, held_out, device)
            metrics.log_round(record)
            log.info(summary_line(record))
            if config.checkpoint_dir and position.round % config.checkpoint_every == 0:
                save("periodic")
    except KeyboardInterrupt:
        log.warning("interrupted twice: leaving without waiting")
    finally:
        if config.checkpoint_dir and (rounds_done > 0 or position.inner_step > 0):
            save("shutdown")
        swarm.shutdown()
    log.info(f"left the swarm after {rounds_done} rounds ({failed_rounds} failed, {resyncs} resyncs)")
    return 0


def swarm_time() -> float:
    """The clock used in DHT records (hivemind's DHT time)."""
    from hivemind.utils.timed_storage import get_dht_time  # train.py only needs hivemind's clock

    return get_dht_time()
