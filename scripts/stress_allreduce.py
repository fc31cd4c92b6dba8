"""Lost-stream reproducer: k forked peers run many all-reduces back to back through the project's averaging path
(peer.allreduce.ExactAverager) on 127.0.0.1, optionally with CPU hogs (`yes > /dev/null`) beside them, and count
the all-reduces that failed for any peer. No faults are injected: every failure is a transport defect.

    python scripts/stress_allreduce.py --peers 3 --allreduces 200 --hogs 2
    python scripts/stress_allreduce.py --peers 2 --values 200k --allreduces 500 --hogs 2 --json

Each all-reduce also checks agreement: every peer's result hashes identically (invariant I1). Peers keep one
averager for the whole run, like a swarm peer across rounds; a barrier starts each all-reduce on every peer.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_allreduce
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the peer package from this checkout
import bench_allreduce as bar  # noqa: E402
from swarm_procs import start_hogs, stop_hogs  # noqa: E402

BARRIER_TIMEOUT_S = 120.0


def worker(peer_index: int, args: argparse.Namespace, initial_peers: list[str], barrier, results) -> None:
    """One peer: one DHT and one averager, `args.allreduces` all-reduces; reports (index, ok, sha256 or error)."""
    peer = bar.start_loop_peer(peer_index, args, initial_peers, prefix="stress")
    timeout_s = peer.timeout_s
    try:
        for index in range(args.allreduces):
            barrier.wait(timeout=BARRIER_TIMEOUT_S + timeout_s)
            try:
                _, _, digest, group_size = peer.average_once(peer_index)
                results.put(("result", index, peer_index, group_size == args.peers, digest))
            except Exception as e:  # a failed all-reduce is what this script counts
                results.put(("result", index, peer_index, False, f"{type(e).__name__}: {e}"))
        barrier.wait(timeout=BARRIER_TIMEOUT_S + timeout_s)  # nobody leaves while others may still need it
    except BaseException as e:
        results.put(("error", peer_index, f"{type(e).__name__}: {e}"))
        barrier.abort()
        raise
    finally:
        peer.shutdown()
    results.put(("done", peer_index))


def run(args: argparse.Namespace, initial_peers: list[str]) -> dict:
    ctx = mp.get_context("fork")
    results, barrier = ctx.Queue(), ctx.Barrier(args.peers)
    procs = [
        ctx.Process(target=worker, args=(i, args, initial_peers, barrier, results)) for i in range(args.peers)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, dict[int, tuple[bool, str]]] = collections.defaultdict(dict)
    started = time.monotonic()
    deadline = started + args.allreduces * (bar.step_timeout_s(args.values) + 10) + 120
    done = 0
    try:
        while done < args.peers:
            if time.monotonic() > deadline:
                raise TimeoutError("peers did not finish in time")
            try:
                message = results.get(timeout=5.0)
            except Exception:  # queue.Empty: check that nobody died silently
                if dead := [p.exitcode for p in procs if p.exitcode not in (None, 0)]:
                    raise RuntimeError(f"a peer exited with {dead}") from None
                continue
            if message[0] == "error":
                raise RuntimeError(f"peer {message[1]} failed: {message[2]}")
            if message[0] == "done":
                done += 1
            else:
                _, index, peer_index, ok, detail = message
                outcomes[index][peer_index] = (ok, detail)
                if args.verbose and not ok:
                    print(f"  all-reduce {index}: peer {peer_index}: {detail}", file=sys.stderr)
        for proc in procs:
            proc.join(timeout=15)
    finally:
        bar.kill_trees(procs)
    failed = [i for i, by_peer in sorted(outcomes.items()) if not all(ok for ok, _ in by_peer.values())]
    disagreed = [
        i
        for i, by_peer in sorted(outcomes.items())
        if i not in failed and len({detail for _, detail in by_peer.values()}) != 1
    ]
    errors = collections.Counter(
        detail.split(" (")[0] for by_peer in outcomes.values() for ok, detail in by_peer.values() if not ok
    )
    return {
        "peers": args.peers,
        "values": args.values,
        "compression": args.compression,
        "hogs": args.hogs,
        "daemon_threads": args.daemon_threads,
        "allreduces": len(outcomes),
        "failed": len(failed),
        "failed_indices": failed,
        "disagreed": len(disagreed),
        "errors": dict(errors),
        "wall_s": round(time.monotonic() - started, 1),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=3, help="peers in the group (default 3)")
    p.add_argument(
        "--values", type=bar.parse_size, default=bar.parse_size("1M"), help="float32 values (default 1M)"
    )
    p.add_argument(
        "--compression", default="none", choices=sorted(bar.BYTES_PER_ELEMENT), help="default none"
    )
    p.add_argument("--allreduces", type=int, default=200, help="all-reduces to run (default 200)")
    p.add_argument(
        "--hogs", type=int, default=2, help="`yes > /dev/null` processes beside the peers (default 2)"
    )
    p.add_argument(
        "--daemon-threads",
        type=int,
        default=0,
        help="GOMAXPROCS of the p2p daemons (default: Go's, one per core); more threads than cores make the "
        "daemons' goroutines run in parallel more often, which is what the lost-stream race needs",
    )
    p.add_argument("--matchmaking-s", type=float, default=0.5, help="min_matchmaking_time (default 0.5)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--verbose", action="store_true", help="each failure on stderr as it happens")
    args = p.parse_args(argv)
    if args.peers < 2:
        p.error("--peers must be at least 2")
    if args.allreduces < 1 or args.hogs < 0:
        p.error("--allreduces must be positive and --hogs non-negative")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import hivemind

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks below
    if args.daemon_threads:
        os.environ["GOMAXPROCS"] = str(
            args.daemon_threads
        )  # hivemind starts p2pd with a copy of our environment
    hogs = start_hogs(args.hogs)
    root = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        summary = run(args, [str(m) for m in root.get_visible_maddrs()])
    except (RuntimeError, TimeoutError) as e:
        print(f"stress_allreduce: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        stop_hogs(hogs)
        with contextlib.suppress(Exception):
            root.shutdown()
        bar.kill_descendants()
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"k={summary['peers']} P={bar.human(summary['values'])} {summary['compression']}, "
            f"{summary['hogs']} CPU hogs, {os.cpu_count()} cores, daemon threads {args.daemon_threads or 'default'}: "
            f"{summary['failed']} of {summary['allreduces']} "
            f"all-reduces failed, {summary['disagreed']} disagreed ({summary['wall_s']} s) {summary['errors']}"
        )
    return 0 if summary["failed"] == 0 and summary["disagreed"] == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
