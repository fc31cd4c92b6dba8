"""Local demo: a bootstrap node and N peers on 127.0.0.1 train the tiny model on the embedded corpus.

    python scripts/local_swarm.py --peers 3 --rounds 8

Shows one line per round and peer, stops after the last round and prints a summary: loss at the start and
end, whether all peers agreed bit for bit on every round, and bytes sent compared with data-parallel training.
Extra flags after `--` go to every peer (for example `-- --compression fp16`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from swarm_procs import Child, read_records, start_bootstrap, wait_for_file  # noqa: E402


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", type=int, default=3, help="number of peers (default 3)")
    parser.add_argument("--rounds", type=int, default=8, help="outer rounds to train (default 8)")
    parser.add_argument("--inner-steps", type=int, default=20, help="H, inner steps per round (default 20)")
    parser.add_argument("--model", default="tiny", help="model preset (default tiny)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--run-dir", help="where logs and metrics go (default: a new temporary directory)")
    parser.add_argument(
        "--timeout-s", type=float, default=1800, help="give up after this long (default 1800)"
    )
    args, extra = parser.parse_known_args()
    if extra and extra[0] == "--":
        extra = extra[1:]
    if args.peers < 1 or args.rounds < 1 or args.inner_steps < 1:
        parser.error("--peers, --rounds and --inner-steps must be at least 1")
    return args, extra


def summarize(records: dict[str, list[dict]], *, rounds: int, inner_steps: int, num_peers: int) -> str:
    by_round: dict[int, set[str]] = {}
    for peer_records in records.values():
        for r in peer_records:
            by_round.setdefault(r["round"], set()).add(r["global_params_sha256"])
    agreed = [rnd for rnd, hashes in sorted(by_round.items()) if len(hashes) == 1]
    first = [recs[0] for recs in records.values() if recs]
    last = [recs[-1] for recs in records.values() if recs]
    evals = [(r["round"], r["eval_loss"]) for recs in records.values() for r in recs if "eval_loss" in r]
    num_params = max(r.get("num_params", 0) for r in last)
    sent = sum(r.get("bytes_sent", 0) for recs in records.values() for r in recs) / max(1, len(records))
    k = num_peers
    # data-parallel: a bandwidth-optimal all-reduce of fp32 gradients after every one of the same steps
    dp_bytes = rounds * inner_steps * 2 * (k - 1) / k * num_params * 4
    lines = [
        f"rounds completed: {min(len(r) for r in records.values())} of {rounds} by each of {len(records)} peers",
        f"train loss: {sum(r['loss'] for r in first) / len(first):.3f} (round 1) -> "
        f"{sum(r['loss'] for r in last) / len(last):.3f} (round {last[0]['round']})",
    ]
    if evals:
        evals.sort()
        lines.append(
            f"held-out loss: {evals[0][1]:.3f} (round {evals[0][0]}) -> {evals[-1][1]:.3f} "
            f"(round {evals[-1][0]})"
        )
    lines.append(
        f"all peers agreed bit for bit: {len(agreed)} of {len(by_round)} rounds"
        + ("" if len(agreed) == len(by_round) else f" (disagreed: {sorted(set(by_round) - set(agreed))})")
    )
    if k > 1 and sent:
        lines.append(
            f"bytes sent per peer: {sent / 1e6:.1f} MB measured; data-parallel training would send "
            f"{dp_bytes / 1e6:.1f} MB for the same steps ({dp_bytes / sent:.0f}x more)"
        )
    return "\n".join(lines)


def main() -> int:
    args, extra = parse_args()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="diloco-demo-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.peers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    peer_args = [
        "--model",
        args.model,
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
        "--eval-every",
        str(max(1, args.rounds // 4)),
        "--host-maddrs",
        "/ip4/127.0.0.1/tcp/0",
        "--matchmaking-s",
        "2",
        "--wait-for-peers",
        str(args.peers),
        "--num-threads",
        str(threads),
        *extra,
    ]
    children: list[Child] = []
    print(f"run directory: {run_dir}", flush=True)
    try:
        bootstrap = start_bootstrap(run_dir, env)
        children.append(bootstrap)
        maddrs = wait_for_file(run_dir / "bootstrap.maddrs", bootstrap, 120)
        print(f"bootstrap node up: {maddrs[0]}", flush=True)
        peers = {}
        for i in range(args.peers):
            name = f"peer{i}"
            argv = [
                sys.executable,
                "-m",
                "peer",
                "--initial-peers",
                *maddrs,
                *peer_args,
                "--metrics-file",
                str(run_dir / f"{name}.jsonl"),
            ]
            peers[name] = Child(name, argv, run_dir, env)
            children.append(peers[name])
        print(
            f"started {args.peers} peers; each trains {args.inner_steps} inner steps per round "
            f"(logs in {run_dir})",
            flush=True,
        )
        shown: dict[str, int] = dict.fromkeys(peers, 0)
        deadline = time.monotonic() + args.timeout_s
        while time.monotonic() < deadline:
            for name in peers:
                records = read_records(run_dir / f"{name}.jsonl")
                for r in records[shown[name] :]:
                    ev = f" eval {r['eval_loss']:.3f}" if "eval_loss" in r else ""
                    print(
                        f"{name} round {r['round']:>3} | loss {r['loss']:.3f}{ev} | peers {r['group_size']} | "
                        f"{r['tokens_per_s']:.0f} tok/s | allreduce {r['allreduce_s']:.2f}s | "
                        f"hash {r['global_params_sha256'][:12]}",
                        flush=True,
                    )
                shown[name] = len(records)
            if all(child.proc.poll() is not None for child in peers.values()):
                break
            time.sleep(0.5)
        else:
            print(f"timed out after {args.timeout_s:.0f}s", file=sys.stderr)
        records = {name: read_records(run_dir / f"{name}.jsonl") for name in peers}
        failed = [name for name, child in peers.items() if child.proc.poll() not in (0, None)]
        if failed or not all(records.values()):
            print(
                f"peers failed: {failed or [n for n, r in records.items() if not r]}; see logs in {run_dir}",
                file=sys.stderr,
            )
            return 1
        print("\n=== summary ===")
        print(summarize(records, rounds=args.rounds, inner_steps=args.inner_steps, num_peers=args.peers))
        return 0
    except KeyboardInterrupt:
        print("interrupted; stopping the swarm", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):
            child.stop()


if __name__ == "__main__":
    sys.exit(main())
