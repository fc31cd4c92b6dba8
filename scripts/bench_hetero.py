"""Heterogeneous peers with real processes: one of 3 peers is F times slower (hidden flag --test-fault slow:F).

For each slowdown F, two runs of a bootstrap node + 3 peers on 127.0.0.1 (tiny model, the embedded corpus):
  fixed-H       every peer does H inner steps per round; the fast peers wait for the slow one
  round-tokens  --round-tokens = 3 x H x batch x seq (the same nominal tokens per round): a round ends when the
                swarm has processed that many tokens, so fast peers do more steps and the slow peer fewer

Per run: wall time, swarm tokens, held-out loss (every round; all peers hold the same global parameters, so
they report the same value), the loss of both settings compared at equal swarm tokens, the time to reach a
target held-out loss (the worse of the two settings' losses at equal tokens), and the compute idle fraction
per peer: 1 - (time in inner steps) / (wall time), from the start of round 2's inner phase to the start of the
last round's (round 1 includes start-up, and whole cycles are measured).

    python scripts/bench_hetero.py                      # F = 2 and 4, 5 rounds of H = 20 (about 12 minutes)
    python scripts/bench_hetero.py --slowdowns 2 --rounds 4 --json

Every peer runs with one torch thread. All children run in their own sessions and are killed on exit,
Ctrl+C, SIGTERM and errors; every wait is bounded (--run-timeout-s per run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swarm_procs import Child, read_records, start_bootstrap, wait_for_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("fixed-H", "round-tokens")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--slowdowns", default="2,4", help="comma-separated slowdowns F of the slow peer (default 2,4)"
    )
    p.add_argument("--peers", type=int, default=3, help="peers per swarm, one of them slow (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="outer rounds per run, at least 3 (default 5)")
    p.add_argument("--inner-steps", type=int, default=20, help="H of the fixed-H setting (default 20)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per inner step (default 4)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--seed", type=int, default=0, help="model seed, the same in every run (default 0)")
    p.add_argument("--matchmaking-s", type=float, default=2.0, help="peer --matchmaking-s (default 2)")
    p.add_argument(
        "--straggler-wait-s",
        type=float,
        default=300.0,
        help="peer --straggler-wait-s: long, so that with fixed H the fast peers really wait for the slow "
        "one instead of leaving it behind (default 300)",
    )
    p.add_argument("--run-timeout-s", type=float, default=300.0, help="give up on one run after this long")
    p.add_argument("--run-dir", help="where logs and metrics go (default: a new temporary directory)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument(
        "--reanalyze",
        action="store_true",
        help="start no swarm: summarize the metrics already in --run-dir (from an earlier run with the same flags)",
    )
    args = p.parse_args()
    try:
        args.slowdowns = [float(s) for s in args.slowdowns.split(",") if s.strip()]
    except ValueError:
        p.error(f"--slowdowns must be comma-separated numbers, got {args.slowdowns!r}")
    if not args.slowdowns or any(f < 1 for f in args.slowdowns):
        p.error("--slowdowns must be numbers >= 1")
    if args.reanalyze and not args.run_dir:
        p.error("--reanalyze needs --run-dir")
    if args.peers < 2 or args.rounds < 3 or args.inner_steps < 1:
        p.error("need --peers >= 2, --rounds >= 3 and --inner-steps >= 1")
    return args


def code_state() -> dict:
    """The commit measured and a hash of any uncommitted changes to the peer (None outside a git checkout)."""

    def git(*argv: str) -> str | None:
        try:
            out = subprocess.run(["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit, diff = git("rev-parse", "HEAD"), git("diff", "HEAD", "--", "peer", "dht_bootstrap")
    return {
        "commit": commit.strip() if commit else None,
        "uncommitted_peer_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


# ---- running one swarm ---------------------------------------------------------------------------------------
def peer_flags(args: argparse.Namespace, setting: str) -> list[str]:
    flags = [
        "--model",
        "tiny",
        "--inner-steps",
        str(args.inner_steps),
        "--max-rounds",
        str(args.rounds),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--inner-lr",
        "1e-3",
        "--warmup-steps",
        str(args.inner_steps),
        "--seed",
        str(args.seed),
        "--eval-every",
        "1",
        "--host-maddrs",
        "/ip4/127.0.0.1/tcp/0",
        "--matchmaking-s",
        str(args.matchmaking_s),
        "--straggler-wait-s",
        str(args.straggler_wait_s),
        "--progress-period-s",
        "1",
        "--wait-for-peers",
        str(args.peers),
        "--num-threads",
        "1",
    ]
    if setting == "round-tokens":
        flags += ["--round-tokens", str(args.peers * args.inner_steps * args.batch_size * args.seq_len)]
    return flags


def run_swarm(
    args: argparse.Namespace, setting: str, slowdown: float, run_dir: Path
) -> dict[str, list[dict]]:
    """Bootstrap node + peers (peer0 is the slow one) until every peer has done --rounds rounds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    children: list[Child] = []
    try:
        bootstrap = start_bootstrap(run_dir, env)
        children.append(bootstrap)
        maddrs = wait_for_file(run_dir / "bootstrap.maddrs", bootstrap, 120)
        peers: dict[str, Child] = {}
        for i in range(args.peers):
            name = f"peer{i}"
            fault = ["--test-fault", f"slow:{slowdown:g}"] if i == 0 and slowdown != 1 else []
            argv = [
                sys.executable,
                "-m",
                "peer",
                "--initial-peers",
                *maddrs,
                *peer_flags(args, setting),
                *fault,
                "--metrics-file",
                str(run_dir / f"{name}.jsonl"),
            ]
            peers[name] = Child(name, argv, run_dir, env)
            children.append(peers[name])
        deadline = time.monotonic() + args.run_timeout_s
        while any(c.proc.poll() is None for c in peers.values()):
            if time.monotonic() > deadline:
                done = {n: len(read_records(run_dir / f"{n}.jsonl")) for n in peers}
                raise RuntimeError(
                    f"{setting} F={slowdown:g}: not finished after {args.run_timeout_s:.0f}s "
                    f"(rounds per peer: {done}); see logs in {run_dir}"
                )
            time.sleep(0.5)
        bad = {n: c.proc.returncode for n, c in peers.items() if c.proc.returncode != 0}
        if bad:
            raise RuntimeError(f"{setting} F={slowdown:g}: peers exited with {bad}; see logs in {run_dir}")
        return {n: read_records(run_dir / f"{n}.jsonl") for n in peers}
    finally:
        for child in reversed(children):
            child.stop(grace_s=10)


# ---- reading the metrics -------------------------------------------------------------------------------------
def idle_fraction(records: list[dict]) -> float:
    """1 - inner time / wall time over whole cycles, from round 2's inner start to the last round's."""
    measured = records[1:-1]
    wall_s = records[-1]["inner_started_at"] - records[1]["inner_started_at"]
    return 1.0 - sum(r["inner_s"] for r in measured) / wall_s


def swarm_curve(records: dict[str, list[dict]]) -> list[dict]:
    """Per round: swarm tokens (sum of every peer's cumulative tokens), held-out loss, and when the first peer
    had it (all peers of a round hold the same global parameters)."""
    rounds = sorted({r["round"] for recs in records.values() for r in recs})
    t0 = min(recs[0]["inner_started_at"] for recs in records.values())
    curve = []
    for rnd in rounds:
        at = [r for recs in records.values() for r in recs if r["round"] == rnd]
        # a peer without a record for this round (resynced) still holds the tokens of its latest record
        tokens = sum(
            max((r["tokens"] for r in recs if r["round"] <= rnd), default=0) for recs in records.values()
        )
        evals = [r["eval_loss"] for r in at if r.get("eval_loss") is not None]
        curve.append(
            {
                "round": rnd,
                "swarm_tokens": tokens,
                "eval_loss": statistics.mean(evals) if evals else None,
                "eval_loss_spread": (max(evals) - min(evals)) if evals else None,
                "time_s": min(r["time"] for r in at) - t0,
                "group_sizes": sorted(r["group_size"] for r in at),
                "inner_steps": {
                    n: r["inner_steps"] for n, recs in records.items() for r in recs if r["round"] == rnd
                },
            }
        )
    return curve


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x over points sorted by x; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if points and x == points[-1][0]:
        return points[-1][1]
    return None


def time_to_loss(curve: list[dict], target: float) -> float | None:
    """Wall time when the held-out loss first reaches `target`, interpolated linearly between rounds."""
    points = [(c["time_s"], c["eval_loss"]) for c in curve if c["eval_loss"] is not None]
    for i, (t, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return t
            (t0, l0) = points[i - 1]
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
    return None


def summarize_run(records: dict[str, list[dict]], *, setting: str, slowdown: float, rounds: int) -> dict:
    for name, recs in records.items():
        if len(recs) < 3:
            raise RuntimeError(
                f"{setting} F={slowdown:g}: {name} recorded {len(recs)} rounds, need at least 3"
            )
    curve = swarm_curve(records)
    slow, fast = "peer0", [n for n in records if n != "peer0"]
    all_records = [r for recs in records.values() for r in recs]
    return {
        "setting": setting,
        "slowdown": slowdown,
        "idle_fast": statistics.mean(idle_fraction(records[n]) for n in fast),
        "idle_fast_per_peer": {n: idle_fraction(records[n]) for n in fast},
        "idle_slow": idle_fraction(records[slow]),
        "sync_wait_s_fast_mean": statistics.mean(
            r["sync_wait_s"] for n in fast for r in records[n][1:] if r["sync_wait_s"] is not None
        ),
        # seconds per inner step (median over measured rounds): shows how busy the shared machine was
        "step_s_fast": statistics.median(
            r["inner_s"] / r["inner_steps"] for n in fast for r in records[n][1:-1]
        ),
        "step_s_slow": statistics.median(r["inner_s"] / r["inner_steps"] for r in records[slow][1:-1]),
        "inner_steps_mean": {
            n: statistics.mean(r["inner_steps"] for r in recs[1:]) for n, recs in records.items()
        },
        "wall_s": curve[-1]["time_s"],
        "swarm_tokens": curve[-1]["swarm_tokens"],
        "final_eval_loss": curve[-1]["eval_loss"],
        "rounds_recorded": {n: len(recs) for n, recs in records.items()},
        "rounds_target": rounds,
        "failed_rounds": sum(bool(r["failed"]) for r in all_records),
        "resyncs": max(r["resyncs"] for r in all_records),
        "resynced_records": sum(bool(r["resynced"]) for r in all_records),
        "curve": curve,
    }


def compare(fixed: dict, hetero: dict) -> dict:
    """The two settings at equal swarm tokens (the fewer of their totals), and the time to a target loss both
    reach: the worse of their held-out losses at those tokens."""
    tokens = min(fixed["swarm_tokens"], hetero["swarm_tokens"])
    out = {"slowdown": fixed["slowdown"], "equal_tokens": tokens}
    for run in (fixed, hetero):
        pts = [(c["swarm_tokens"], c["eval_loss"]) for c in run["curve"] if c["eval_loss"] is not None]
        run["eval_loss_at_equal_tokens"] = interpolate(pts, tokens)
        run["wall_s_at_equal_tokens"] = interpolate(
            [(c["swarm_tokens"], c["time_s"]) for c in run["curve"]], tokens
        )
    losses = [fixed["eval_loss_at_equal_tokens"], hetero["eval_loss_at_equal_tokens"]]
    target = max(x for x in losses if x is not None) if any(x is not None for x in losses) else None
    out["target_loss"] = target
    for run in (fixed, hetero):
        run["target_loss"] = target
        run["time_to_target_s"] = time_to_loss(run["curve"], target) if target is not None else None
        # the same in units of the run's own fast-peer step time: a rough correction for the load of the machine
        run["time_to_target_fast_steps"] = (
            run["time_to_target_s"] / run["step_s_fast"] if run["time_to_target_s"] is not None else None
        )
    out["idle_ratio"] = hetero["idle_fast"] / fixed["idle_fast"] if fixed["idle_fast"] > 0 else None
    out["loss_delta_at_equal_tokens"] = (
        hetero["eval_loss_at_equal_tokens"] - fixed["eval_loss_at_equal_tokens"]
        if None not in losses
        else None
    )
    if fixed["time_to_target_s"] and hetero["time_to_target_s"]:
        out["time_to_target_ratio"] = hetero["time_to_target_s"] / fixed["time_to_target_s"]
    return out


# ---- output --------------------------------------------------------------------------------------------------
def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(report: dict) -> str:
    lines = [
        f"{'setting':>13} {'F':>3} | {'idle fast':>9} {'idle slow':>9} | {'step s fast/slow':>16} | "
        f"{'wall s':>6} {'swarm tok':>9} | "
        f"{'loss@eq tok':>11} {'target':>6} {'t->target s':>11} {'(fast steps)':>12} | {'steps/round (slow, fast...)':>27} "
        f"{'failed':>6} {'resyncs':>7}"
    ]
    for run in report["runs"]:
        steps = ", ".join(f"{v:.0f}" for v in run["inner_steps_mean"].values())
        lines.append(
            f"{run['setting']:>13} {run['slowdown']:>3g} | {run['idle_fast']:>9.1%} {run['idle_slow']:>9.1%} | "
            f"{run['step_s_fast']:>7.2f} / {run['step_s_slow']:<6.2f} | "
            f"{run['wall_s']:>6.1f} {run['swarm_tokens']:>9} | {_f(run.get('eval_loss_at_equal_tokens'), '.4f'):>11} "
            f"{_f(run.get('target_loss'), '.3f'):>6} {_f(run.get('time_to_target_s'), '.1f'):>11} "
            f"{_f(run.get('time_to_target_fast_steps'), '.0f'):>12} | "
            f"{steps:>27} {run['failed_rounds']:>6} {run['resyncs']:>7}"
        )
    lines.append("")
    for c in report["comparisons"]:
        lines.append(
            f"F={c['slowdown']:g}: idle(round-tokens)/idle(fixed-H) = {_f(c['idle_ratio'], '.2f')}"
            f"{' (issue target: <= 0.50)' if c['slowdown'] == 2 else ''}; loss(round-tokens) - loss(fixed-H) at {c['equal_tokens']} swarm tokens = "
            f"{_f(c['loss_delta_at_equal_tokens'], '+.4f')}; time to loss {_f(c['target_loss'], '.3f')}: "
            f"ratio {_f(c.get('time_to_target_ratio'), '.2f')}"
        )
    if report.get("benchmark_s"):
        lines.append(f"benchmark wall time: {report['benchmark_s']:.0f}s")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    run_root = Path(args.run_dir or tempfile.mkdtemp(prefix="diloco-hetero-"))
    run_root.mkdir(parents=True, exist_ok=True)

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one SIGTERM is enough; let the cleanup finish
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.monotonic()
    report: dict = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "run_dir")},
        "round_tokens": args.peers * args.inner_steps * args.batch_size * args.seq_len,
        "run_dir": str(run_root),
        "code": code_state(),
        "runs": [],
        "comparisons": [],
    }
    print(f"run directory: {run_root}", file=sys.stderr, flush=True)
    try:
        for slowdown in args.slowdowns:
            pair = {}
            for setting in SETTINGS:
                if not args.reanalyze:
                    print(f"running {setting}, slow peer {slowdown:g}x ...", file=sys.stderr, flush=True)
                t = time.monotonic()
                run_dir = run_root / f"{setting}-{slowdown:g}x"
                if args.reanalyze:
                    records = {p.stem: read_records(p) for p in sorted(run_dir.glob("peer*.jsonl"))}
                else:
                    records = run_swarm(args, setting, slowdown, run_dir)
                pair[setting] = summarize_run(records, setting=setting, slowdown=slowdown, rounds=args.rounds)
                # process start to exit, start-up included
                pair[setting]["run_s"] = None if args.reanalyze else time.monotonic() - t
                if not args.reanalyze:
                    print(
                        f"  done in {time.monotonic() - t:.0f}s: idle (fast peers) {pair[setting]['idle_fast']:.1%}",
                        file=sys.stderr,
                        flush=True,
                    )
            report["comparisons"].append(compare(pair["fixed-H"], pair["round-tokens"]))
            report["runs"] += [pair["fixed-H"], pair["round-tokens"]]
    except KeyboardInterrupt:
        print("interrupted; the swarm was stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report["benchmark_s"] = None if args.reanalyze else time.monotonic() - started
    print(json.dumps(report, indent=1) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
