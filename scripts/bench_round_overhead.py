"""The swarm's fixed cost per round: from "every peer's pseudo-gradient is ready" to "every peer applied the outer
step and published its hashes", per step, beside the transfer itself (issue #13 item 2).

    python scripts/bench_round_overhead.py --peers 2,4 --rounds 8      # tiny model on 127.0.0.1
    python scripts/bench_round_overhead.py --analyze RUN_DIR           # only read a finished run's metrics

Runs scripts/local_swarm.py (a bootstrap node and k peers that all do the same H inner steps, so they are ready at
about the same moment), then reads every peer's `stage_at` marks (README "Metrics"; wall-clock times, all peers on
this machine share one clock). Per round, the swarm-wide moment of each step is the last peer's:

    ready     every pseudo-gradient computed          (max pseudo_grad_ready)
    start     the last peer's transfer began          (max transfer_started)   ready -> start: matchmaking/wait
    end       the last peer's transfer ended          (max transfer_ended)     start -> end: the transfer
    averaged  every peer has the average in hand      (max averaged)           end -> averaged: hand-back
    applied   every peer applied the outer step       (max outer_applied)
    agreed    every peer published its hashes         (max agreed)
              (they are compared during the next inner phase, off this path; after a failed all-reduce, here)

fixed cost = (agreed - ready) - (end - start). The first round is left out (newcomers' warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swarm_procs import read_records  # noqa: E402

STEPS = ("pseudo_grad_ready", "transfer_started", "transfer_ended", "averaged", "outer_applied", "agreed")
SPANS = (  # (column, from step, to step)
    ("wait", "pseudo_grad_ready", "transfer_started"),
    ("transfer", "transfer_started", "transfer_ended"),
    ("hand-back", "transfer_ended", "averaged"),
    ("outer", "averaged", "outer_applied"),
    ("agree", "outer_applied", "agreed"),
)


def round_spans(records_by_peer: dict[str, list[dict]]) -> list[dict[str, float]]:
    """Per round that every peer completed with a successful all-reduce: the swarm-wide span of each step."""
    by_round: dict[int, list[dict]] = {}
    for records in records_by_peer.values():
        for r in records:
            by_round.setdefault(r["round"], []).append(r)
    spans = []
    for round_number in sorted(by_round)[1:]:
        group = by_round[round_number]
        if len(group) != len(records_by_peer) or any(r.get("failed") for r in group):
            continue
        marks = [r.get("stage_at") or {} for r in group]
        if not all(all(step in m for step in STEPS) for m in marks):
            continue
        last = {step: max(m[step] for m in marks) for step in STEPS}
        row = {name: max(0.0, last[b] - last[a]) for name, a, b in SPANS}
        row["total"] = last["agreed"] - last["pseudo_grad_ready"]
        row["fixed"] = row["total"] - row["transfer"]
        spans.append(row)
    return spans


def analyze(run_dir: Path) -> list[dict[str, float]]:
    return round_spans({path.stem: read_records(path) for path in sorted(run_dir.glob("peer*.jsonl"))})


def table_row(k: int, spans: list[dict[str, float]]) -> str:
    if not spans:
        return f"{k:>3} | no complete rounds"
    med = {key: statistics.median(s[key] for s in spans) for key in spans[0]}
    worst = max(s["fixed"] for s in spans)
    cols = " ".join(f"{med[name]:>9.3f}" for name, _, _ in SPANS)
    return f"{k:>3} {len(spans):>6} | {cols} | {med['total']:>7.3f} {med['fixed']:>7.3f} {worst:>7.3f}"


def header() -> str:
    cols = " ".join(f"{name:>9}" for name, _, _ in SPANS)
    return f"  k rounds | {cols} |   total   fixed  fixed max\n" + "-" * (24 + 10 * len(SPANS) + 8)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", default="2,4", help="comma-separated swarm sizes (default 2,4)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--analyze", type=Path, help="only read the metrics of a finished run directory")
    parser.add_argument("--json", action="store_true", help="also print the per-round spans as JSON")
    args, extra = parser.parse_known_args()
    if args.analyze:
        if not args.analyze.is_dir():
            parser.error(f"--analyze: {args.analyze} is not a directory")
        spans = analyze(args.analyze)
        print("seconds, median over rounds (fixed max: the worst round)\n" + header())
        print(table_row(len(list(args.analyze.glob("peer*.jsonl"))), spans))
        return 0
    try:
        sizes = [int(k) for k in args.peers.split(",")]
    except ValueError:
        parser.error(f"--peers must be comma-separated integers, got {args.peers!r}")
    rows = []
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    for k in sizes:
        run_dir = Path(tempfile.mkdtemp(prefix=f"round-overhead-k{k}-"))
        argv = [
            sys.executable,
            str(Path(__file__).with_name("local_swarm.py")),
            "--peers", str(k),
            "--rounds", str(args.rounds),
            "--inner-steps", str(args.inner_steps),
            "--run-dir", str(run_dir),
            *extra,
        ]  # fmt: skip
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(
                f"k={k}: the swarm failed ({done.stderr.strip()[-300:]}); logs in {run_dir}", file=sys.stderr
            )
            return 1
        spans = analyze(run_dir)
        rows.append(table_row(k, spans))
        if args.json:
            print(json.dumps({"peers": k, "spans": spans}))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(
        "seconds, median over rounds (fixed max: the worst round); fixed = total - transfer; target < 0.3 s"
    )
    print(header())
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
