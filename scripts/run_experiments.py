"""The full convergence experiment set of docs/RESULTS.md: baselines with LR sweeps, DiLoCo and the paper's
ablations at small scale, simulated heterogeneous rounds. Each experiment is a `python -m peer.simulate`
command line; results go to one JSON file each (finished ones are skipped on a rerun), then a summary.

    nice -n 19 python scripts/run_experiments.py --jobs 2            # about an hour on 2 CPU cores
    python scripts/run_experiments.py --only main,h-                  # a subset (name prefixes)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

from peer import experiments
from peer.simulate import experiment_runs, sim_parser

ROOT = Path(__file__).resolve().parent.parent
# Shared by every run: the tiny preset, 2 sequences of 64 tokens per replica step, 500 steps per replica
# (DiLoCo: 10 rounds of H=50). Sized so the whole set is about half an hour of CPU time.
COMMON = (
    "--model tiny --seq-len 64 --batch-size 2 --warmup-steps 50 --num-threads 1 "
    "--eval-every-steps 100 --eval-windows 128 --seed 0"
)
STEPS = 500
LRS = (1e-3, 2e-3, 4e-3)


def diloco(H: int = 50, k: int = 4, extra: str = "") -> str:
    return f"--mode diloco --replicas {k} --shards iid --inner-steps {H} --max-rounds {STEPS // H} {extra}"


def sweep_experiments() -> dict[str, str]:
    """Stage 1: each baseline's inner learning-rate sweep (DiLoCo's inner lr is the single peer's best)."""
    runs = {}
    for lr in LRS:
        runs[f"lr-single-{lr:g}"] = f"--mode single --inner-steps {STEPS} --max-rounds 1 --inner-lr {lr}"
        runs[f"lr-dp4-{lr:g}"] = (
            f"--mode data-parallel --replicas 4 --inner-steps {STEPS} --max-rounds 1 --inner-lr {lr}"
        )
    return runs


def main_experiments(lr: float) -> dict[str, str]:
    """Stage 2: everything else, at the chosen inner lr."""
    d = f"--inner-lr {lr}"
    runs = {  # in order of importance: whatever the time allows, the core comparisons come first
        "main": diloco(extra=d),
        # outer optimizer: plain averaging (SGD lr 1, no momentum) against Nesterov 0.7/0.9 (main)
        "outer-avg": diloco(extra=f"{d} --outer-lr 1.0 --outer-momentum 0"),
        # H at fixed tokens (main is H=50)
        **{f"h-{H}": diloco(H=H, extra=d) for H in (10, 100, 250)},
        # number of replicas at fixed steps per replica (main is k=4)
        **{f"k-{k}": diloco(k=k, extra=d) for k in (1, 2, 8)},
        # non-i.i.d.: replica i trains on the i-th contiguous quarter of the corpus (works in order)
        "non-iid": diloco(extra=f"{d}").replace("--shards iid", "--shards contiguous"),
        "outer-adam-0.003": diloco(extra=f"{d} --outer-optimizer adam --outer-lr 0.003"),
        # outer lr x momentum around the paper's 0.7/0.9
        "outer-1.0-0.5": diloco(extra=f"{d} --outer-lr 1.0 --outer-momentum 0.5"),
        "outer-0.5-0.9": diloco(extra=f"{d} --outer-lr 0.5 --outer-momentum 0.9"),
        # the paper's warm start: 100 data-parallel steps, then 8 DiLoCo rounds (same tokens)
        "warm-start": (
            f"--mode diloco --replicas 4 --shards iid --inner-steps 50 --max-rounds 8 "
            f"--warm-start-steps 100 {d}"
        ),
        # simulated heterogeneous rounds: one replica 2x slower, a round = the swarm's 4 x 50 steps
        # (fixed H with the same speeds trains exactly like "main"; only its simulated clock differs)
        "hetero-tokens-2x": diloco(extra=f"{d} --speeds 1,1,1,0.5 --round-tokens {4 * 50 * 2 * 64}"),
        # dropped outer updates
        "drop-0.3": diloco(extra=f"{d} --drop-prob 0.3"),
        # changing compute pool, same total compute as k=4 for 10 rounds
        "pool-up": f"--mode diloco --shards iid --inner-steps 50 --pool 2:5,6:5 {d}",
        "pool-down": f"--mode diloco --shards iid --inner-steps 50 --pool 6:5,2:5 {d}",
        "hetero-tokens-4x": diloco(extra=f"{d} --speeds 1,1,1,0.25 --round-tokens {4 * 50 * 2 * 64}"),
        "outer-0.7-0.5": diloco(extra=f"{d} --outer-lr 0.7 --outer-momentum 0.5"),
    }
    return runs


def _run_one(item: tuple[str, str, str]) -> tuple[str, float]:
    name, flags, out_dir = item
    own, rest = sim_parser().parse_known_args(f"{COMMON} {flags}".split())
    ((config, exp),) = experiment_runs(own, rest)
    result = experiments.run_experiment(config, exp)
    result["command"] = f"python -m peer.simulate {COMMON} {flags}"
    path = Path(out_dir) / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"{name:22s} loss {result['final_eval_loss']:.4f}  {result['wall_s']:.0f}s", flush=True)
    return name, result["wall_s"]


def _run_all(runs: dict[str, str], out_dir: Path, jobs: int) -> None:
    todo = [(n, f, str(out_dir)) for n, f in runs.items() if not (out_dir / f"{n}.json").exists()]
    if not todo:
        return
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for _ in pool.imap(_run_one, todo):  # in order: the most important experiments first
            pass


def _load(out_dir: Path, name: str) -> dict:
    return json.loads((out_dir / f"{name}.json").read_text())


def best_lr(out_dir: Path, prefix: str) -> float:
    scores = {lr: _load(out_dir, f"{prefix}-{lr:g}")["final_eval_loss"] for lr in LRS}
    return min(scores, key=scores.get)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "results"), help="one JSON per experiment")
    parser.add_argument("--jobs", type=int, default=2, help="experiments run in parallel (1 thread each)")
    parser.add_argument("--only", default="", help="comma-separated name prefixes to run (default: all)")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    wanted = tuple(p for p in args.only.split(",") if p)

    def pick(runs: dict[str, str]) -> dict[str, str]:
        return {n: f for n, f in runs.items() if not wanted or n.startswith(wanted)}

    _run_all(pick(sweep_experiments()), out_dir, args.jobs)
    lr, dp_lr = best_lr(out_dir, "lr-single"), best_lr(out_dir, "lr-dp4")
    print(f"chosen inner lr: single/DiLoCo {lr:g}, data-parallel {dp_lr:g}", flush=True)
    _run_all(pick(main_experiments(lr)), out_dir, args.jobs)
    elapsed = time.perf_counter() - started
    total = sum(json.loads(p.read_text())["wall_s"] for p in out_dir.glob("*.json") if p.stem != "summary")
    summary = {
        "elapsed_s_this_invocation": elapsed,
        "sum_of_run_wall_s": total,
        "inner_lr": lr,
        "dp_lr": dp_lr,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
