"""k DiLoCo replicas in one process, averaged exactly in memory: for research, and to check the networked swarm.

Replica i trains like a networked peer started with `--data-shard i/k` and the same other flags, so both
produce the same global parameters round after round (fp32, no compression).

    python -m peer.simulate --replicas 4 --max-rounds 10 --inner-steps 50 --json
    python -m peer.simulate --mode compare --replicas 4 --plot loss.png   # DiLoCo against both baselines

The experiment modes and ablation knobs live in peer.experiments; this module keeps the reference loop.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from dataclasses import dataclass, replace

import torch

from peer.cli import build_parser, config_from_args
from peer.config import RunConfig
from peer.data import Tokenizer, data_seed, eval_batches, load_corpus, train_batches
from peer.inner import build_inner_optimizer, evaluate, inner_lr, inner_step
from peer.model import build_model, load_model_config
from peer.outer import AveragingResult, OuterOptimizer, average_contributions


class InMemoryAverager:
    """The exact averager: the same canonical-order weighted mean the networked reducers compute."""

    def average_round(
        self, pseudo_grads: list[list[torch.Tensor]], *, tokens: list[int], order_keys: list[bytes]
    ) -> AveragingResult:
        averaged = [
            average_contributions([grads[j] for grads in pseudo_grads], tokens, order_keys)
            for j in range(len(pseudo_grads[0]))
        ]
        return AveragingResult(averaged=averaged, group_size=len(pseudo_grads), tokens=sum(tokens))


@dataclass
class Replica:
    """One simulated peer: its local model, inner optimizer, data stream and order key."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: object
    order_key: bytes


def make_replicas(
    config: RunConfig, base_model: torch.nn.Module, train_tokens: torch.Tensor, k: int
) -> list[Replica]:
    replicas = []
    for i in range(k):
        stream_id = f"{i}/{k}"
        seed = data_seed(config.seed, stream_id)
        model = copy.deepcopy(base_model)
        batches = train_batches(
            train_tokens,
            batch_size=config.data.batch_size,
            seq_len=config.data.seq_len,
            seed=seed,
            shard=(i, k),
        )
        replicas.append(
            Replica(model, build_inner_optimizer(model, config.inner), batches, seed.to_bytes(8, "big"))
        )
    return replicas


def train_inner_steps_(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches,
    *,
    config: RunConfig,
    first_global_step: int,
    num_steps: int,
    total_steps: int,
) -> list[float]:
    """num_steps inner steps of one replica on the swarm's schedule (global step = round x H + step)."""
    losses = []
    for step in range(num_steps):
        lr = inner_lr(first_global_step + step, config=config.inner, total_steps=total_steps)
        losses.append(inner_step(model, optimizer, next(batches), lr=lr, grad_clip=config.inner.grad_clip))
    return losses


def simulate(config: RunConfig, *, num_replicas: int, on_round=None) -> list[dict]:
    """Run config.max_rounds DiLoCo rounds with k replicas; returns one record per round."""
    if config.max_rounds < 1:
        raise ValueError("the simulation needs --max-rounds of at least 1")
    if num_replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {num_replicas}")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    tokenizer = Tokenizer(config.data.tokenizer)
    model_config = load_model_config(
        config.model.name, vocab_size=tokenizer.vocab_size, max_seq_len=config.data.seq_len
    )
    base_model = build_model(model_config, seed=config.seed)
    corpus = load_corpus(config.data, tokenizer)
    held_out = eval_batches(
        corpus.eval,
        batch_size=config.data.batch_size,
        seq_len=config.data.seq_len,
        num_batches=config.eval_batches,
    )
    outer = OuterOptimizer(list(base_model.parameters()), config.outer)
    replicas = make_replicas(config, base_model, corpus.train, num_replicas)
    averager = InMemoryAverager()
    H, tokens_per_step = config.inner.steps, config.data.batch_size * config.data.seq_len
    records = []
    for round_index in range(config.max_rounds):
        losses, pseudo_grads = [], []
        for replica in replicas:
            params = list(replica.model.parameters())
            outer.copy_to_(params)
            losses += train_inner_steps_(
                replica.model,
                replica.optimizer,
                replica.batches,
                config=config,
                first_global_step=round_index * H,
                num_steps=H,
                total_steps=config.total_inner_steps,
            )
            pseudo_grads.append(outer.pseudo_gradient(params))
        result = averager.average_round(
            pseudo_grads,
            tokens=[H * tokens_per_step] * num_replicas,
            order_keys=[r.order_key for r in replicas],
        )
        outer.step_(result.averaged)
        record = {
            "round": round_index + 1,
            "loss": sum(losses) / len(losses),
            "group_size": result.group_size,
            "tokens": (round_index + 1) * H * tokens_per_step * num_replicas,
            "global_params_sha256": outer.params_hash(),
        }
        if config.eval_every and (round_index + 1) % config.eval_every == 0 and held_out:
            outer.copy_to_(list(replicas[0].model.parameters()))
            record["eval_loss"] = evaluate(replicas[0].model, held_out, torch.device("cpu"))
        records.append(record)
        if on_round is not None:
            on_round(record)
    return records


SIM_FLAGS_HELP = """
simulation flags (python -m peer.simulate; every flag above sets the shared model/data/optimizer settings):
  --mode MODE             diloco (default), data-parallel, single, or compare (all three, same settings)
  --replicas K            simulated peers; data-parallel uses K x --batch-size (default 2)
  --shards S              contiguous (default: replica i = --data-shard i/K, non-i.i.d. works) or iid
  --outer-optimizer O     nesterov (default: --outer-lr/--outer-momentum) or adam (lr = --outer-lr)
  --pool K:R[,K:R...]     changing compute pool: K replicas for R rounds, then ... (replaces --max-rounds)
  --drop-prob P           each replica's pseudo-gradient is lost with probability P per round
  --warm-start-steps N    N data-parallel steps before DiLoCo (in the same token budget)
  --speeds S1,S2,...      simulated relative speed per replica (for idle time; default all 1)
  --round-tokens N        simulated heterogeneous rounds: a round ends after N swarm-wide tokens
  --compression C         (the peer flag above) none, fp16 or int8: pseudo-gradients and their average are
                          encoded and decoded as in the networked all-reduce
  --overlap-delay-steps D overlapped outer step: a round's average is applied D inner steps into the next
                          round, keeping each replica's progress since (0..--inner-steps; -1 = off, default)
  --eval-every-steps N    evaluate every N steps per replica (default 100)
  --eval-windows N        held-out windows of --seq-len tokens per evaluation (default 128)
  --data-parallel-lr LR   compare mode: inner lr of the data-parallel baseline (default --inner-lr)
  --single-lr LR          compare mode: inner lr of the single-peer baseline (default --inner-lr)
  --plot PATH             write a loss-vs-tokens PNG (matplotlib)
  --json                  print the results as one JSON document (keys in docs/RESULTS.md)
"""


def sim_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--mode", default="diloco")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--shards", default="contiguous")
    parser.add_argument("--outer-optimizer", default="nesterov")
    parser.add_argument("--pool", default="")
    parser.add_argument("--drop-prob", type=float, default=0.0)
    parser.add_argument("--warm-start-steps", type=int, default=0)
    parser.add_argument("--speeds", default="")
    parser.add_argument("--round-tokens", type=int, default=0)
    parser.add_argument("--overlap-delay-steps", type=int, default=-1)
    parser.add_argument("--eval-every-steps", type=int, default=100)
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--data-parallel-lr", type=float, default=None)
    parser.add_argument("--single-lr", type=float, default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--json", action="store_true")
    return parser


def experiment_runs(own: argparse.Namespace, rest: list[str]) -> list[tuple[RunConfig, object]]:
    """Parsed flags -> [(RunConfig, ExperimentConfig)], one per mode to run (three for --mode compare)."""
    from peer import experiments

    config, _ = config_from_args(rest)
    config = replace(config, device="cpu")
    pool = experiments.parse_pool(own.pool) if own.pool else ()
    if pool:
        config = replace(config, max_rounds=sum(r for _, r in pool))
    if config.max_rounds < 1:
        raise ValueError("the simulation needs --max-rounds of at least 1 (or --pool)")
    try:
        speeds = tuple(float(s) for s in own.speeds.split(",")) if own.speeds else ()
    except ValueError:
        raise ValueError(f"--speeds must be comma-separated numbers, got {own.speeds!r}") from None
    runs = []
    for mode in experiments.MODES if own.mode == "compare" else (own.mode,):
        lr = {"data-parallel": own.data_parallel_lr, "single": own.single_lr}.get(mode)
        run_config = replace(config, inner=replace(config.inner, lr=lr)) if lr else config
        exp = experiments.ExperimentConfig(
            mode=mode,
            replicas=own.replicas,
            shards=own.shards,
            outer_optimizer=own.outer_optimizer,
            pool=pool,
            drop_prob=own.drop_prob,
            warm_start_steps=own.warm_start_steps,
            speeds=speeds,
            round_tokens=own.round_tokens,
            compression=config.outer.compression,  # the peer's own --compression flag
            overlap_delay_steps=own.overlap_delay_steps,
            eval_every_steps=own.eval_every_steps,
            eval_windows=own.eval_windows,
        )
        runs.append((run_config, exp))
    return runs


def main(argv: list[str] | None = None) -> int:
    from peer import experiments  # experiments imports this module: keep the import one-way at load time

    own, rest = sim_parser().parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        build_parser().print_help()
        print(SIM_FLAGS_HELP)
        return 0
    if own.plot and importlib.util.find_spec("matplotlib") is None:  # say so before a long run, not after
        print(
            "error: --plot needs matplotlib: pip install matplotlib (or the project's dev extra)",
            file=sys.stderr,
        )
        return 2
    try:
        runs = experiment_runs(own, rest)
        results = {}
        for run_config, exp in runs:
            on_eval = (
                None if own.json else lambda p, m=exp.mode: print(json.dumps({"mode": m, **p}), flush=True)
            )
            results[exp.mode] = experiments.run_experiment(run_config, exp, on_eval=on_eval)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if own.plot:
        experiments.plot_loss_vs_tokens(
            {f"{m} (k={r['replicas']})": r["curve"] for m, r in results.items()}, own.plot
        )
    if own.json:
        print(json.dumps(results if own.mode == "compare" else results[own.mode], indent=1))
    else:
        for mode, r in results.items():
            print(
                f"{mode:14s} tokens {r['tokens']:>9d}  held-out loss {r['final_eval_loss']:.4f}  "
                f"perplexity {r['final_perplexity']:.2f}  syncs {r['num_syncs']}  {r['wall_s']:.0f}s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
