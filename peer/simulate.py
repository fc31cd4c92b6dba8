"""k DiLoCo replicas in one process, averaged exactly in memory: for research, and to check the networked swarm.

Replica i trains like a networked peer started with `--data-shard i/k` and the same other flags, so both
produce the same global parameters round after round (fp32, no compression).

    python -m peer.simulate --replicas 4 --max-rounds 10 --inner-steps 50 --json
"""

from __future__ import annotations

import argparse
import copy
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
            for step in range(H):
                lr = inner_lr(
                    round_index * H + step, config=config.inner, total_steps=config.total_inner_steps
                )
                losses.append(
                    inner_step(
                        replica.model,
                        replica.optimizer,
                        next(replica.batches),
                        lr=lr,
                        grad_clip=config.inner.grad_clip,
                    )
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    own, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        build_parser().print_help()
        print(
            "\nsimulation flags:\n  --replicas K   number of simulated peers (default 2)\n"
            "  --json         print the per-round records as one JSON document at the end"
        )
        return 0
    try:
        config, _ = config_from_args(rest)
        config = replace(config, device="cpu")
        records = simulate(
            config,
            num_replicas=own.replicas,
            on_round=None if own.json else lambda r: print(json.dumps(r), flush=True),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if own.json:
        print(json.dumps({"replicas": own.replicas, "rounds": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
