"""One attacking peer among four honest ones, for every attack of tests/attacker.py, against clean runs of the same
honest peers: what the attacker costs them.

    python scripts/bench_attacks.py [--rounds 6] [--attacks votes weight ...] [--aggregation trimmed-mean]
                                    [--out docs/results/bench_attacks.json]

Every run is a bootstrap node and four honest peers on 127.0.0.1 (tiny model, embedded data, 20 inner steps per round,
protection on: it has no switch), each training `--data-shard i/5` for i = 0..3, plus a fifth member on shard 4/5:
  clean-4   no fifth member: what the four honest peers reach alone
  clean-5   an honest fifth peer: what they reach with one more peer that does honest work
  KIND      the attacker (python -m tests.attacker --attack KIND) as the fifth member; where it trains, it trains
            honestly on shard 4/5, so an attack that changes nothing gives clean-5's hashes bit for bit
Every member waits until all are live, so each run starts at round 0 together; all follow the same learning-rate
schedule (--total-steps: the attacker runs until stopped). A clean run in which a round failed or missed a member
(it happens under a heavy load) is no reference and is run once more.

Per run: the rounds every honest peer applied; failed rounds; the round time (the median gap between an honest
peer's rounds; against the clean run with as many members, a slowdown the attack and the machine's load both cause);
the longest stall (the longest time an honest peer went without applying a round, from the start of its first round,
in seconds and in the run's own round times, so that a load that slows every round is no stall); whether an
honest peer crashed; whether one held a poisoned state (one the honest majority never held, a non-finite or the
all-zero one; a peer that failed a round holds the state the majority held before it, which is stale, not poisoned,
and repaired by its next resync); the held-out loss after the last round (median over honest peers) against both
clean runs; which clean run's final state it ended on, bit for bit. Targets (issue 11): no crash, no stall over two round times,
no poisoned state, a loss at most 1% above clean-4's: the honest peers are no worse off than without the attacker
(an attacker that trains honestly helps them, as much as clean-5 shows).

With no attacker, protection must change nothing: clean-5's hashes are compared round by round with the in-process
simulation of the same five shards (peer/simulate.py, which never clamps a value nor caps a weight). Equal hashes mean
that no clamp or cap changed a single bit of the clean run.

Each peer's data order is fixed by its shard, so the clean runs are reproducible; timings are not (a shared CPU: the
load is printed with every run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO))
from swarm_procs import Child, read_records, start_bootstrap, wait_for_file  # noqa: E402

from peer.config import AGGREGATIONS  # noqa: E402
from tests.attacker import ATTACKS  # noqa: E402

NUM_HONEST = 4
NUM_SHARDS = NUM_HONEST + 1
SEED = 7
INNER_STEPS = (
    20  # rounds of a few seconds: long enough that matchmaking is not most of a round, as in real runs
)
PEER_ARGS = [
    "--model", "tiny", "--inner-steps", str(INNER_STEPS), "--batch-size", "4", "--seq-len", "64",
    "--warmup-steps", "5", "--inner-lr", "1e-3", "--matchmaking-s", "2", "--num-threads", "1",
    "--progress-period-s", "1", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--seed", str(SEED),
]  # fmt: skip
MAX_STALL_ROUNDS = 2.0  # targets of issue 11
MAX_LOSS_RATIO = 1.01
CLEAN_TRIES = 2  # a reference run in which a round failed under the machine's load is run once more


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} CPUs"


def peer_argv(module: str, name: str, run_dir: Path, maddrs: list[str], *extra: str) -> list[str]:
    return [
        sys.executable, "-m", module, *PEER_ARGS, *extra, "--initial-peers", *maddrs,
        "--metrics-file", str(run_dir / f"{name}.jsonl"), "--maddrs-file", str(run_dir / f"{name}.maddrs"),
    ]  # fmt: skip


def run_swarm(scenario: str, *, rounds: int, timeout_s: float, env: dict) -> dict:
    """One run: returns the honest peers' records and exit codes, and where its logs are."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-attacks-{scenario}-"))
    members = NUM_HONEST + (scenario != "clean-4")
    # the attacker runs until stopped (no --max-rounds): the schedule's horizon is given to everyone explicitly
    common = [
        "--wait-for-peers",
        str(members),
        "--eval-every",
        str(rounds),
        "--total-steps",
        str(rounds * INNER_STEPS),
    ]
    children = [start_bootstrap(run_dir, env)]
    honest: list[Child] = []
    started = time.monotonic()
    try:
        maddrs = wait_for_file(run_dir / "bootstrap.maddrs", children[0], timeout_s=120)
        for i in range(NUM_HONEST):
            name = f"honest{i}"
            argv = peer_argv("peer", name, run_dir, maddrs, *common, "--max-rounds", str(rounds))
            honest.append(Child(name, [*argv, "--data-shard", f"{i}/{NUM_SHARDS}"], run_dir, env))
        children += honest
        if scenario != "clean-4":
            fifth = ["--data-shard", f"{NUM_HONEST}/{NUM_SHARDS}", *common]
            if scenario == "clean-5":
                argv = peer_argv("peer", "fifth", run_dir, maddrs, *fifth, "--max-rounds", str(rounds))
            else:  # the attacker runs until stopped
                # it gives up on its own failed all-reduces soon (the lying reducer's hangs), to attack again
                argv = peer_argv(
                    "tests.attacker", "fifth", run_dir, maddrs, *fifth, "--allreduce-timeout-s", "20"
                )
                argv += ["--attack", scenario]
            children.append(Child("fifth", argv, run_dir, env))
        deadline = time.monotonic() + timeout_s
        while any(child.proc.poll() is None for child in honest) and time.monotonic() < deadline:
            time.sleep(0.5)
        return {
            "records": {child.name: read_records(run_dir / f"{child.name}.jsonl") for child in honest},
            "exit_codes": {child.name: child.proc.poll() for child in honest},
            "wall_s": time.monotonic() - started,
            "run_dir": str(run_dir),
        }
    finally:
        for child in children:
            child.stop(grace_s=10)


def model_hashes() -> tuple[str, str]:
    """The hashes of the run's initial global parameters and of the all-zero model (what the votes attack serves)."""
    from peer.model import build_model, load_model_config
    from peer.outer import tensors_sha256

    model = build_model(load_model_config("tiny", vocab_size=8192, max_seq_len=64), seed=SEED)
    params = [p.detach() for p in model.parameters()]
    return tensors_sha256(params), tensors_sha256([p * 0 for p in params])


def summarize(run: dict, *, rounds: int, initial_hash: str, zero_hash: str) -> dict:
    """The figures of one run (round times in seconds; compared with the clean runs in report())."""
    records = run["records"]
    by_round: dict[int, dict[str, str]] = {}
    for name, recs in records.items():
        for r in recs:
            by_round.setdefault(r["round"], {})[name] = r["global_params_sha256"]
    # A peer that failed a round still holds a state the honest majority held before (stale, repaired by the next
    # resync); a state the honest majority never held, or a non-finite or all-zero one, is a poisoned one.
    agreed, poisoned, stale = {initial_hash}, set(), 0
    for _, hashes in sorted(by_round.items()):
        values = list(hashes.values())
        majority = max(set(values), key=values.count)
        if values.count(majority) * 2 > len(values):
            agreed.add(majority)
        for name, h in hashes.items():
            stale += h != majority and h in agreed
            if h not in agreed or h == zero_hash:
                poisoned.add(name)
    stalls, gaps = [], []
    for recs in records.values():
        # from the start of its first round, so that failing the first rounds counts as a stall too
        applied = [recs[0]["inner_started_at"], *(r["time"] for r in recs if not r["failed"])] if recs else []
        stalls += [b - a for a, b in zip(applied, applied[1:], strict=False)]
        gaps += [b["time"] - a["time"] for a, b in zip(recs, recs[1:], strict=False)]
    finals = [recs[-1] for recs in records.values() if recs]
    evals = [r["eval_loss"] for r in finals if r["round"] == rounds and "eval_loss" in r]
    losses = [r["loss"] for recs in records.values() for r in recs]
    if not all(map(math.isfinite, [*losses, *evals])):
        poisoned.add("non-finite")
    return {
        "rounds_recorded": min((len(recs) for recs in records.values()), default=0),
        "rounds_applied": min((sum(not r["failed"] for r in recs) for recs in records.values()), default=0),
        "failed_rounds": sum(r["failed"] for recs in records.values() for r in recs),
        "crashed": sorted(
            name
            for name, code in run["exit_codes"].items()
            if code not in (0, None) or (code is not None and len(records[name]) < rounds)
        ),
        "unfinished": sorted(name for name, code in run["exit_codes"].items() if code is None),
        "poisoned": sorted(poisoned),
        "stale_records": stale,
        "final_hash": max(
            (r["global_params_sha256"] for r in finals), key=[r["global_params_sha256"] for r in finals].count
        )
        if finals
        else None,
        "group_sizes": sorted({r["group_size"] for recs in records.values() for r in recs}),
        "longest_stall_s": max(stalls, default=math.inf),
        "median_round_s": statistics.median(gaps) if gaps else math.nan,
        "eval_loss": statistics.median(evals) if evals else math.nan,
        "hashes_by_round": {str(k): v for k, v in sorted(by_round.items())},
        "wall_s": run["wall_s"],
        "run_dir": run["run_dir"],
        "load": run["load"],
    }


def is_clean(summary: dict, *, rounds: int, members: int) -> bool:
    """A reference run: every honest peer applied every round with every member in the group."""
    return (
        summary["rounds_applied"] == rounds and summary["group_sizes"] == [members] and not summary["crashed"]
    )


def simulated_hashes(rounds: int) -> list[str]:
    from peer.cli import config_from_args
    from peer.simulate import simulate

    config, _ = config_from_args([*PEER_ARGS, "--max-rounds", str(rounds), "--eval-every", "0"])
    return [r["global_params_sha256"] for r in simulate(config, num_replicas=NUM_SHARDS)]


def report(results: dict[str, dict], *, simulated: list[str] | None) -> list[str]:
    clean4, clean5 = results["clean-4"], results["clean-5"]
    lines = [
        "| run | rounds applied (of recorded) | failed rounds (all peers) | round time (vs clean) | longest stall "
        "| crashed | poisoned | held-out loss | vs clean-4 | vs clean-5 | final state as | group sizes | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, s in results.items():
        clean_round_s = (clean4 if scenario == "clean-4" else clean5)["median_round_s"]
        # a stall is a gap between rounds much longer than the run's own rounds (a loaded machine slows them all)
        stall_rounds = s["longest_stall_s"] / s["median_round_s"]
        vs4, vs5 = s["eval_loss"] / clean4["eval_loss"], s["eval_loss"] / clean5["eval_loss"]
        same = [
            name
            for name, clean in (("clean-4", clean4), ("clean-5", clean5))
            if s["final_hash"] == clean["final_hash"]
        ]
        crashed = s["crashed"] or s["unfinished"]
        why = [
            *(["crash/unfinished"] if crashed else []),
            *(["poisoned"] if s["poisoned"] else []),
            *(["stall"] if not stall_rounds <= MAX_STALL_ROUNDS else []),
            *(["loss"] if not vs4 <= MAX_LOSS_RATIO else []),
        ]
        s["targets_missed"] = why
        lines.append(
            f"| {scenario} | {s['rounds_applied']} ({s['rounds_recorded']}) | {s['failed_rounds']} "
            f"| {s['median_round_s']:.1f}s ({s['median_round_s'] / clean_round_s:.2f}x) "
            f"| {s['longest_stall_s']:.1f}s ({stall_rounds:.2f} rounds) | {', '.join(crashed) or 'no'} "
            f"| {', '.join(s['poisoned']) or 'no'} | {s['eval_loss']:.4f} | {vs4:.4f} | {vs5:.4f} "
            f"| {' '.join(same) or 'neither'} | {'/'.join(map(str, s['group_sizes']))} "
            f"| {'met' if not why else 'MISSED: ' + ', '.join(why)} |"
        )
    if simulated is not None:
        networked = [clean5["hashes_by_round"].get(str(r + 1), {}) for r in range(len(simulated))]
        equal = [set(h.values()) == {sim} for h, sim in zip(networked, simulated, strict=True)]
        clean5["equals_simulation"] = equal
        lines += [
            "",
            f"protection with no attacker: clean-5's hashes equal the unprotected simulation's in {sum(equal)} of "
            f"{len(equal)} rounds ({'no clamp or cap changed a bit' if all(equal) else 'see the JSON'})",
        ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds every honest peer trains (default 6)")
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--timeout-s", type=float, default=300, help="longest time for one run (default 300)")
    parser.add_argument("--out", help="also write every figure here as JSON")
    parser.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default="mean",
        help="the run's --aggregation, for every peer and the simulation (default mean)",
    )
    args = parser.parse_args()
    PEER_ARGS.extend(
        ["--aggregation", args.aggregation]
    )  # every run and the simulation train the same settings
    if args.rounds < 2:
        print("--rounds must be at least 2 (a stall is a gap between two rounds)", file=sys.stderr)
        return 2
    # SIGTERM (and SIGINT, ignored in background jobs) end the run through the `finally`s that stop the swarm
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    began = time.monotonic()
    print(
        f"bench_attacks: {args.rounds} rounds per run, --aggregation {args.aggregation}, {load()}", flush=True
    )
    initial_hash, zero_hash = model_hashes()
    results: dict[str, dict] = {}
    for scenario in ["clean-4", "clean-5", *args.attacks]:
        for attempt in range(1, CLEAN_TRIES + 1):
            before = load()
            run = run_swarm(scenario, rounds=args.rounds, timeout_s=args.timeout_s, env=env)
            run["load"] = f"{before} before, {load()} after"
            summary = summarize(run, rounds=args.rounds, initial_hash=initial_hash, zero_hash=zero_hash)
            summary["attempt"] = attempt
            results[scenario] = summary
            print(
                f"{scenario}: {summary['rounds_applied']} of {summary['rounds_recorded']} rounds applied in "
                f"{run['wall_s']:.0f}s, {run['load']}; logs in {run['run_dir']}",
                flush=True,
            )
            members = NUM_HONEST + (scenario != "clean-4")
            if not scenario.startswith("clean") or is_clean(summary, rounds=args.rounds, members=members):
                break
            print(f"{scenario}: a round failed or missed a member (load): not a reference, running it again")
    started_sim = time.monotonic()
    simulated = simulated_hashes(args.rounds)
    print(f"simulation of the five shards: {time.monotonic() - started_sim:.0f}s", flush=True)
    lines = report(results, simulated=simulated)
    print("\n".join(["", *lines, "", f"total {time.monotonic() - began:.0f}s, {load()}"]), flush=True)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"rounds": args.rounds, "simulated": simulated, "runs": results}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
