"""Global-parameter hashes of a fixed-seed simulation and of a 2-peer networked run, for refactors.

    python scripts/reference_hashes.py [--rounds 3] [--out hashes.json]

A behavior-preserving change must print the same hashes before and after (the networked peers train with
`--data-shard i/2`, so they compute exactly what the simulation's replicas compute).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from swarm_procs import Child, read_records, start_bootstrap, wait_for_file  # noqa: E402

PEER_ARGS = [
    "--model", "tiny", "--inner-steps", "5", "--batch-size", "4", "--seq-len", "64", "--warmup-steps", "5",
    "--inner-lr", "1e-3", "--matchmaking-s", "2", "--num-threads", "1", "--eval-every", "0",
    "--progress-period-s", "1", "--seed", "7",
]  # fmt: skip

VERSIONED = ("torch", "transformers", "tokenizers", "datasets", "hivemind", "numpy")


def simulated_hashes(rounds: int) -> list[str]:
    from peer.cli import config_from_args
    from peer.simulate import simulate

    config, _ = config_from_args([*PEER_ARGS, "--max-rounds", str(rounds)])
    return [r["global_params_sha256"] for r in simulate(config, num_replicas=2)]


def networked_hashes(rounds: int, timeout_s: float) -> list[list[str]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    run_dir = Path(tempfile.mkdtemp(prefix="reference-hashes-"))
    children = [start_bootstrap(run_dir, env)]
    try:
        maddrs = wait_for_file(run_dir / "bootstrap.maddrs", children[0], timeout_s=60)
        for i in range(2):
            argv = [
                sys.executable,
                "-m",
                "peer",
                *PEER_ARGS,
                "--max-rounds",
                str(rounds),
                "--wait-for-peers",
                "2",
            ]
            argv += ["--data-shard", f"{i}/2", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
            argv += ["--metrics-file", str(run_dir / f"peer{i}.jsonl"), "--initial-peers", *maddrs]
            children.append(Child(f"peer{i}", argv, run_dir, env))
        deadline = time.monotonic() + timeout_s
        paths = [run_dir / f"peer{i}.jsonl" for i in range(2)]
        while any(len(read_records(p)) < rounds for p in paths):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the networked run did not finish in {timeout_s:.0f}s; logs in {run_dir}")
            time.sleep(0.5)
        return [[r["global_params_sha256"] for r in read_records(p)] for p in paths]
    finally:
        for child in children:
            child.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--out", help="also write the hashes here as JSON")
    args = parser.parse_args()
    result = {
        "simulation": simulated_hashes(args.rounds),
        "networked": networked_hashes(args.rounds, args.timeout_s),
    }
    result["networked_equals_simulation"] = all(h == result["simulation"] for h in result["networked"])
    # the hashes hold for these versions: a newer transformers or tokenizers (pyproject allows them) may build the
    # tiny model or the tokenizer otherwise, and every hash changes with no change of ours
    result["versions"] = {name: importlib.metadata.version(name) for name in VERSIONED}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result["networked_equals_simulation"] else 1


if __name__ == "__main__":
    sys.exit(main())
