"""`python -m peer.simulate`: k DiLoCo replicas in one process (peer.replicas), the experiment modes
(peer.experiments), and simulate(), the reference the networked swarm is checked against.

Replica i trains like a networked peer started with `--data-shard i/k` and the same other flags, so both
produce the same global parameters round after round (fp32, no compression).

    python -m peer.simulate --replicas 4 --max-rounds 10 --inner-steps 50 --json
    python -m peer.simulate --mode compare --replicas 4 --plot loss.png   # DiLoCo against both baselines
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import replace

from peer import experiments, preflight
from peer.cli import add_flags, build_parser, config_from_args, flags_of, given_values
from peer.config import RunConfig
from peer.replicas import MODES, ExperimentConfig, run_replicas
from peer.workload import build_workload


def simulate(
    config: RunConfig, *, num_replicas: int, on_round: Callable[[dict], None] | None = None
) -> list[dict]:
    """Run config.max_rounds DiLoCo rounds with k replicas on contiguous shards, like k networked peers with
    `--data-shard i/k`; returns one record per round (round, loss, group_size, tokens, global_params_sha256,
    and every --eval-every rounds eval_loss on the peer's held-out batches)."""
    if config.max_rounds < 1:
        raise ValueError("the simulation needs --max-rounds of at least 1")
    exp = ExperimentConfig(replicas=num_replicas, compression=config.outer.compression)
    workload = build_workload(config, in_memory=True)

    def every_eval_every_rounds(round_index: int, _step: int) -> bool:
        return (
            bool(workload.held_out) and config.eval_every > 0 and (round_index + 1) % config.eval_every == 0
        )

    def report(record: dict) -> None:
        del record["inner_steps"]  # always H per replica here
        if on_round is not None:
            on_round(record)

    run = run_replicas(config, exp, workload, should_evaluate=every_eval_every_rounds, on_round=report)
    return run.rounds


# the simulation's own flags: ExperimentConfig's fields, and what to do with the results
SIM_FLAGS = flags_of(ExperimentConfig)


def sim_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m peer.simulate", add_help=False)
    group = parser.add_argument_group(
        "simulation flags",
        "python -m peer.simulate [peer flags] [simulation flags]; the peer flags set the model, data and "
        "optimizers, and the peer's --compression sets the simulated pseudo-gradient compression.",
    )
    add_flags(group, SIM_FLAGS)
    group.add_argument(
        "--data-parallel-lr",
        type=float,
        metavar="LR",
        help="compare mode: inner lr of the data-parallel baseline (default --inner-lr)",
    )
    group.add_argument(
        "--single-lr",
        type=float,
        metavar="LR",
        help="compare mode: inner lr of the single-peer baseline (default --inner-lr)",
    )
    group.add_argument("--plot", metavar="PATH", help="write a loss-vs-tokens PNG (matplotlib)")
    group.add_argument(
        "--json", action="store_true", help="print the results as one JSON document (keys in docs/RESULTS.md)"
    )
    return parser


def experiment_runs(own: argparse.Namespace, rest: list[str]) -> list[tuple[RunConfig, ExperimentConfig]]:
    """Parsed flags -> [(RunConfig, ExperimentConfig)], one per mode to run (three for --mode compare)."""
    config, _ = config_from_args(rest)
    config = replace(config, device="cpu")
    knobs = given_values(own, SIM_FLAGS)
    if knobs.get("pool"):
        config = replace(config, max_rounds=sum(r for _, r in knobs["pool"]))
    if config.max_rounds < 1:
        raise ValueError("the simulation needs --max-rounds of at least 1 (or --pool)")
    requested = knobs.pop("mode", None)  # None: ExperimentConfig's default
    runs = []
    for mode in MODES if requested == "compare" else (requested,):
        # the peer's own --compression flag sets the simulated compression
        exp = ExperimentConfig(
            **knobs, **({} if mode is None else {"mode": mode}), compression=config.outer.compression
        )
        lr = {"data-parallel": own.data_parallel_lr, "single": own.single_lr}.get(exp.mode)
        runs.append((replace(config, inner=replace(config.inner, lr=lr)) if lr else config, exp))
    return runs


def main(argv: list[str] | None = None) -> int:
    own, rest = sim_parser().parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        build_parser().print_help()
        print()
        print(sim_parser().format_help().split("\n\n", 1)[1])  # without the usage line
        return 0
    if own.plot and importlib.util.find_spec("matplotlib") is None:  # say so before a long run, not after
        print(
            "error: --plot needs matplotlib: pip install matplotlib (or the project's dev extra)",
            file=sys.stderr,
        )
        return 2
    try:
        runs = experiment_runs(own, rest)
        for run_config, _ in runs:
            preflight.check_workload(run_config)  # before any run: a bad tokenizer or a NaN is one line
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
        print(json.dumps(results if own.mode == "compare" else next(iter(results.values())), indent=1))
    else:
        for mode, r in results.items():
            print(
                f"{mode:14s} tokens {r['tokens']:>9d}  held-out loss {r['final_eval_loss']:.4f}  "
                f"perplexity {r['final_perplexity']:.2f}  syncs {r['num_syncs']}  {r['wall_s']:.0f}s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
