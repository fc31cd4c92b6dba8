"""Convergence experiments in one process: DiLoCo variants (peer.replicas: ablations, simulated heterogeneous
peers) and the data-parallel and single-peer baselines, all evaluated on the same held-out windows at equal
tokens.

`python -m peer.simulate --mode ...` is the command line; docs/RESULTS.md lists the JSON keys.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict

from peer.config import RunConfig
from peer.data import data_seed, train_batches
from peer.inner import build_inner_optimizer, evaluate, inner_lr, inner_step, inner_step_options
from peer.replicas import CPU, MODES, ExperimentConfig, parse_pool, run_replicas
from peer.workload import Workload, build_workload

__all__ = [  # ExperimentConfig, MODES and parse_pool live with the loop; experiments is where callers find them
    "MODES",
    "ExperimentConfig",
    "experiment_workload",
    "parse_pool",
    "plot_loss_vs_tokens",
    "run_diloco",
    "run_experiment",
    "run_plain",
]

# The experiments evaluate 32 held-out windows per forward pass: the same windows in every mode, efficiently.
EVAL_BATCH_SIZE = 32


def experiment_workload(config: RunConfig, exp: ExperimentConfig) -> Workload:
    """The run's workload with exp.eval_windows held-out windows in batches of EVAL_BATCH_SIZE."""
    return build_workload(
        config,
        eval_batch_size=EVAL_BATCH_SIZE,
        num_eval_batches=math.ceil(exp.eval_windows / EVAL_BATCH_SIZE),
        in_memory=True,
    )


def _finish(result: dict, curve: list[dict], started: float) -> dict:
    final = curve[-1]
    result.update(
        final_eval_loss=final["eval_loss"],
        final_perplexity=math.exp(final["eval_loss"]),
        best_eval_loss=min(point["eval_loss"] for point in curve),
        tokens=final["tokens"],
        steps=final["step"],
        curve=curve,
        wall_s=time.perf_counter() - started,
    )
    return result


def run_plain(
    config: RunConfig,
    exp: ExperimentConfig,
    workload: Workload | None = None,
    *,
    on_eval: Callable | None = None,
) -> dict:
    """The baselines: one model, AdamW every step, batch k x B (data-parallel) or B (single)."""
    started = time.perf_counter()
    workload = workload or experiment_workload(config, exp)
    multiplier = exp.replicas if exp.mode == "data-parallel" else 1
    batch_size = config.data.batch_size * multiplier
    num_steps = config.total_inner_steps
    model = copy.deepcopy(workload.model)
    optimizer = build_inner_optimizer(model, config.inner)
    batches = train_batches(
        workload.corpus.train,
        batch_size=batch_size,
        seq_len=config.data.seq_len,
        seed=data_seed(config.seed, exp.mode),
    )
    curve = []
    for step in range(num_steps):
        lr = inner_lr(step, config=config.inner, total_steps=num_steps)
        inner_step(model, optimizer, next(batches), lr=lr, **inner_step_options(config, CPU))
        if (step + 1) % exp.eval_every_steps == 0 or step + 1 == num_steps:
            point = {
                "step": step + 1,
                "tokens": (step + 1) * batch_size * config.data.seq_len,
                "eval_loss": evaluate(model, workload.held_out, CPU),
            }
            curve.append(point)
            if on_eval is not None:
                on_eval(point)
    result = {
        "mode": exp.mode,
        "replicas": multiplier,
        "inner_steps": 1,
        "num_syncs": num_steps if exp.mode == "data-parallel" else 0,
        "config": config.to_dict(),
        "experiment": asdict(exp),
    }
    return _finish(result, curve, started)


def run_diloco(
    config: RunConfig,
    exp: ExperimentConfig,
    workload: Workload | None = None,
    *,
    on_eval: Callable | None = None,
) -> dict:
    """DiLoCo with k replicas (peer.replicas.run_replicas) and the experiment's knobs, as a result document."""
    started = time.perf_counter()
    workload = workload or experiment_workload(config, exp)
    run = run_replicas(config, exp, workload, on_eval=on_eval)
    result = {
        "mode": "diloco",
        "replicas": exp.max_replicas,
        "inner_steps": config.inner.steps,
        "num_syncs": len(run.rounds),
        "num_dropped": run.num_dropped,
        "sim_time": run.sim_time,
        "idle_fraction": run.idle_time / max(1e-12, run.sim_time * exp.max_replicas),
        "global_params_sha256": run.outer.params_hash(),
        "rounds": run.rounds,
        "config": config.to_dict(),
        "experiment": asdict(exp),
    }
    return _finish(result, run.curve, started)


def run_experiment(config: RunConfig, exp: ExperimentConfig, *, on_eval: Callable | None = None) -> dict:
    if exp.mode == "diloco":
        return run_diloco(config, exp, on_eval=on_eval)
    return run_plain(config, exp, on_eval=on_eval)


def plot_loss_vs_tokens(curves: dict[str, list[dict]], path: str, *, title: str = "") -> None:
    """One line per run: held-out loss against tokens processed by the whole swarm."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "--plot needs matplotlib: pip install matplotlib (or the project's dev extra)"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        axes.plot(
            [p["tokens"] for p in curve], [p["eval_loss"] for p in curve], marker="o", ms=3, label=label
        )
    axes.set_xlabel("tokens processed (all replicas)")
    axes.set_ylabel("held-out loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
