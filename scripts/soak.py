"""Soak test: a local swarm under churn (joins, graceful leaves, SIGKILLs, a bootstrap restart) for a while.

    python scripts/soak.py --minutes 10 --peers 4
    python scripts/soak.py --minutes 30 --peers 3 --no-churn --cpu-hogs 2   # no faults, a busy CPU: 0 failed rounds?

Reports rounds completed, rounds in which every peer that recorded the round agreed, resyncs, the longest
stall (the longest time between two consecutive rounds being completed anywhere in the swarm), and
whether any peer ended on a different model. Everything runs on 127.0.0.1 and is cleaned up on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from swarm_procs import Child, read_records, start_hogs, stop_hogs, wait_for_file  # noqa: E402

PEER_ARGS = [
    "--model",
    "tiny",
    "--inner-steps",
    "10",
    "--batch-size",
    "4",
    "--seq-len",
    "64",
    "--warmup-steps",
    "10",
    "--inner-lr",
    "1e-3",
    "--host-maddrs",
    "/ip4/127.0.0.1/tcp/0",
    "--matchmaking-s",
    "2",
    "--num-threads",
    "1",
    "--eval-every",
    "0",
    "--chunk-timeout-s",
    "5",
    "--straggler-wait-s",
    "20",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Soak:
    def __init__(self, run_dir: Path, env: dict, seed: int):
        self.run_dir, self.env, self.rng = run_dir, env, random.Random(seed)
        self.port = free_port()
        self.bootstrap: Child | None = None
        self.bootstrap_maddrs: list[str] = []
        self.peers: dict[str, Child] = {}
        self.retired: list[str] = []
        self.count = 0
        self.events: list[str] = []

    def start_bootstrap(self) -> None:
        maddrs = self.run_dir / "bootstrap.maddrs"
        maddrs.unlink(missing_ok=True)
        self.bootstrap = Child(
            "bootstrap",
            [
                sys.executable,
                "-m",
                "dht_bootstrap",
                "--host-maddrs",
                f"/ip4/127.0.0.1/tcp/{self.port}",
                "--identity-path",
                str(self.run_dir / "bootstrap.key"),
                "--maddrs-file",
                str(maddrs),
            ],
            self.run_dir,
            self.env,
            append=True,
        )
        self.bootstrap_maddrs = wait_for_file(maddrs, self.bootstrap, 120)

    def start_peer(self, *extra: str) -> str:
        name = f"peer{self.count}"
        self.count += 1
        initial = list(self.bootstrap_maddrs)
        for other in self.rng.sample(sorted(self.peers), min(2, len(self.peers))):
            path = self.run_dir / f"{other}.maddrs"
            if path.exists():
                initial += path.read_text().split()
        self.peers[name] = Child(
            name,
            [
                sys.executable,
                "-m",
                "peer",
                *PEER_ARGS,
                "--initial-peers",
                *initial,
                *extra,
                "--metrics-file",
                str(self.run_dir / f"{name}.jsonl"),
                "--maddrs-file",
                str(self.run_dir / f"{name}.maddrs"),
            ],
            self.run_dir,
            self.env,
        )
        return name

    def retire(self, name: str, *, graceful: bool) -> None:
        child = self.peers.pop(name)
        if graceful:
            child.stop()
        else:
            child.kill()
        self.retired.append(name)

    def event(self) -> None:
        live = sorted(self.peers)
        choices = ["join"] + (["leave", "kill"] if len(live) > 2 else [])
        kind = self.rng.choice(choices)
        if kind == "join":
            name = self.start_peer()
        else:
            name = self.rng.choice(live)
            self.retire(name, graceful=kind == "leave")
        self.log(f"{kind} {name}")

    def log(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        self.events.append(line)
        print(line, flush=True)

    def records(self) -> dict[str, list[dict]]:
        names = sorted(set(self.peers) | set(self.retired))
        return {name: read_records(self.run_dir / f"{name}.jsonl") for name in names}


def report(records: dict[str, list[dict]], final_peers: list[str]) -> dict:
    by_round: dict[int, dict[str, str]] = {}
    first_seen: dict[int, float] = {}
    for name, recs in records.items():
        for r in recs:
            by_round.setdefault(r["round"], {})[name] = r["global_params_sha256"]
            first_seen[r["round"]] = min(first_seen.get(r["round"], r["time"]), r["time"])
    agreed = [rnd for rnd, hashes in by_round.items() if len(set(hashes.values())) == 1]
    times = [first_seen[r] for r in sorted(first_seen)]
    final_rounds = [records[name][-1]["round"] for name in final_peers if records.get(name)]
    common = min(final_rounds) if final_rounds else None
    final_hashes = {name: by_round.get(common, {}).get(name) for name in final_peers}
    return {
        "rounds_completed": max(by_round) if by_round else 0,
        "rounds_all_agreed": len(agreed),
        "rounds_recorded": len(by_round),
        "disagreeing_rounds": sorted(set(by_round) - set(agreed)),
        "resyncs": sum(recs[-1]["resyncs"] for recs in records.values() if recs),
        "failed_rounds": sum(recs[-1]["failed_rounds"] for recs in records.values() if recs),
        "longest_stall_s": round(
            max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0), 1
        ),
        "peers_started": len(records),
        "final_peers": len(final_peers),
        "final_round_compared": common,
        "any_peer_on_a_different_model": len({h for h in final_hashes.values() if h}) > 1,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to churn (default 10)")
    parser.add_argument("--peers", type=int, default=4, help="peers at the start (default 4, at least 3)")
    parser.add_argument("--event-every-s", type=float, default=30.0, help="seconds between churn events")
    parser.add_argument("--seed", type=int, default=0, help="seed of the event sequence")
    parser.add_argument("--run-dir", help="logs and metrics (default: a new temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--no-churn",
        action="store_true",
        help="no joins, leaves, kills or bootstrap restart: only time passes",
    )
    parser.add_argument(
        "--cpu-hogs", type=int, default=0, help="busy processes competing for the CPU (default 0)"
    )
    args = parser.parse_args()
    if args.peers < 3 or args.minutes <= 0 or args.cpu_hogs < 0:
        parser.error("--peers must be at least 3, --minutes positive and --cpu-hogs not negative")
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="diloco-soak-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    soak = Soak(run_dir, env, args.seed)
    print(f"run directory: {run_dir}", flush=True)
    hogs = start_hogs(args.cpu_hogs)
    try:
        soak.start_bootstrap()
        for _ in range(args.peers):
            soak.start_peer("--wait-for-peers", str(args.peers))
        end = time.monotonic() + args.minutes * 60
        restart_at = time.monotonic() + args.minutes * 30  # the bootstrap node goes down half-way
        while time.monotonic() < end:
            time.sleep(min(args.event_every_s, max(0.0, end - time.monotonic())))
            if args.no_churn:
                continue
            if restart_at and time.monotonic() >= restart_at:
                soak.bootstrap.kill()
                soak.log("bootstrap SIGKILL")
                time.sleep(args.event_every_s / 2)
                soak.start_bootstrap()
                soak.log("bootstrap restarted (same identity and port)")
                restart_at = 0
            elif time.monotonic() < end:
                soak.event()
        # let every remaining peer finish one more round, then stop them gracefully
        target = {n: len(read_records(run_dir / f"{n}.jsonl")) + 2 for n in soak.peers}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and any(
            len(read_records(run_dir / f"{n}.jsonl")) < t for n, t in target.items()
        ):
            time.sleep(1)
        final_peers = sorted(soak.peers)
        for name in final_peers:
            soak.peers[name].stop()
        result = report(soak.records(), final_peers)
        result["events"] = len(soak.events)
        result["minutes"] = args.minutes
        result["cpu_hogs"] = args.cpu_hogs
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            print("\n=== soak report ===")
            for key, value in result.items():
                print(f"{key}: {value}")
        return 1 if result["any_peer_on_a_different_model"] else 0
    except KeyboardInterrupt:
        return 130
    finally:
        stop_hogs(hogs)
        for child in list(soak.peers.values()):
            child.kill()
        if soak.bootstrap is not None:
            soak.bootstrap.kill()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    sys.exit(main())
