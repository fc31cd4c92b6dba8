"""Where the all-reduce's time goes: k forked peers average P float32 values through the project's path
(peer.allreduce.ExactAverager) on 127.0.0.1 while py-spy samples every averager process; the CPU time of each
process kind (averager, p2p daemon, DHT, the peer's main process) comes from /proc.

    python scripts/profile_allreduce.py --peers 2 --values 10M --allreduces 5
    python scripts/profile_allreduce.py --peers 4 --values 10M --compression int8 --json

It prints, per all-reduce and peer: the transfer's wall time; CPU seconds per process kind; and the averager's
CPU split into stages by the functions py-spy found on the stack (first match from the innermost frame).
Needs py-spy (dev extra) and the right to ptrace the children (root, or kernel.yama.ptrace_scope = 0).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_allreduce
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the peer package from this checkout
import bench_allreduce as bar  # noqa: E402

# stage <- function names (py-spy's frame names), checked from the innermost frame outwards
STAGES = (
    (
        "encode/decode",
        ("encode_once", "quantize_blockwise", "dequantize_blockwise", "_quantize", "_dequantize"),
    ),
    ("reduce", ("average_contributions", "check_part", "isfinite")),
    ("serialize", ("SerializeToString", "compress", "tobytes", "_generate_input_for_peer", "ByteSize")),
    ("deserialize", ("ParseFromString", "extract", "deserialize_torch_tensor", "_deserialize", "frombuffer")),
    (
        "p2p socket I/O",
        (
            "send_raw_data",
            "receive_raw_data",
            "readexactly",
            "send_protobuf",
            "receive_protobuf",
            "_handle_stream",
        ),
    ),
    ("assemble result", ("iterate_output_tensors", "register_processed_part", "_run_allreduce_inplace_")),
    (
        "matchmaking",
        ("matchmaking", "_step", "look_for_group", "rpc_join_group", "_declare_averager_periodically"),
    ),
)


def classify(stack: list[str]) -> str:
    for frame in reversed(stack):  # innermost first
        name = frame.split(" (")[0]
        for stage, names in STAGES:
            if any(n in name for n in names):
                return stage
    return "other (event loop, asyncio, threads)"


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def process_kinds(worker_pids: list[int], averager_pids: list[int]) -> dict[str, list[int]]:
    kinds = {"peer main": list(worker_pids), "averager": list(averager_pids), "p2p daemon": [], "DHT": []}
    for worker in worker_pids:
        for pid in bar.descendants(worker):
            if pid in averager_pids:
                continue
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                kinds["p2p daemon" if comm == "p2pd" else "DHT"].append(pid)
    return kinds


def worker(peer_index: int, args, initial_peers: list[str], barrier, results) -> None:
    peer = bar.start_loop_peer(
        peer_index, args, initial_peers, prefix="profile", part_size_bytes=args.part_size
    )
    timeout_s = peer.timeout_s
    try:
        results.put(("pids", peer_index, os.getpid(), peer.averager.pid))
        for index in range(args.allreduces + 1):  # the first one warms up, unprofiled
            barrier.wait(timeout=120 + timeout_s)  # the parent starts or keeps sampling between the barriers
            barrier.wait(timeout=120 + timeout_s)
            wall_s, stats, digest, _ = peer.average_once(peer_index)
            results.put(("run", index, peer_index, wall_s, stats, digest))
        barrier.wait(timeout=120 + timeout_s)
    finally:
        peer.shutdown()


def parse_raw(path: Path) -> tuple[collections.Counter, collections.Counter]:
    """py-spy --format raw: one 'frame;frame;... count' line per distinct stack -> samples by stage and by the
    innermost frame (self time)."""
    stages: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    if not path.exists():
        return stages, leaves
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = stack.split(";")
            stages[classify(frames)] += int(count)
            leaves[frames[-1]] += int(count)
    return stages, leaves


def run(args) -> dict:
    ctx = mp.get_context("fork")
    results, barrier = ctx.Queue(), ctx.Barrier(args.peers + 1)  # the parent takes part in every barrier
    import hivemind

    root = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    initial_peers = [str(m) for m in root.get_visible_maddrs()]
    procs = [
        ctx.Process(target=worker, args=(i, args, initial_peers, barrier, results)) for i in range(args.peers)
    ]
    for proc in procs:
        proc.start()
    out_dir = Path(tempfile.mkdtemp(prefix="profile_allreduce_"))
    spies: list[subprocess.Popen] = []
    try:
        pids = {}
        while len(pids) < args.peers:
            message = results.get(timeout=120)
            pids[message[1]] = (message[2], message[3])
        worker_pids = [pids[i][0] for i in range(args.peers)]
        averager_pids = [pids[i][1] for i in range(args.peers)]
        timeout_s = 120 + bar.step_timeout_s(args.values)
        barrier.wait(timeout=timeout_s)  # warm-up all-reduce
        barrier.wait(timeout=timeout_s)
        kinds = process_kinds(worker_pids, averager_pids)
        barrier.wait(timeout=timeout_s)  # the warm-up is done once everyone reaches the next barrier
        cpu_before = {kind: sum(cpu_seconds(p) for p in ps) for kind, ps in kinds.items()}
        spies = [
            subprocess.Popen(
                [shutil.which("py-spy") or "py-spy", "record", "--format", "raw", "--rate", str(args.rate)]
                + (["--gil"] if args.gil else [])
                + ["--pid", str(pid), "--output", str(out_dir / f"averager{i}.txt"), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i, pid in enumerate(averager_pids)
        ]
        time.sleep(1.0)  # py-spy attaches
        started = time.monotonic()
        barrier.wait(timeout=timeout_s)
        for _ in range(args.allreduces - 1):
            barrier.wait(timeout=timeout_s)
            barrier.wait(timeout=timeout_s)
        barrier.wait(timeout=timeout_s)  # after the last all-reduce
        wall_s = time.monotonic() - started
        cpu_after = {kind: sum(cpu_seconds(p) for p in ps) for kind, ps in kinds.items()}
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(timeout=30)
        runs = collections.defaultdict(dict)
        while not results.empty():
            message = results.get()
            if message[0] == "run":
                runs[message[1]][message[2]] = message[3:]
        measured = [runs[i] for i in sorted(runs) if i > 0]
        transfer_s = [max(r[p][1]["transfer_s"] for p in r) for r in measured]
        identical = all(len({r[p][2] for p in r}) == 1 for r in measured)
        stages, leaves = collections.Counter(), collections.Counter()
        for i in range(args.peers):
            peer_stages, peer_leaves = parse_raw(out_dir / f"averager{i}.txt")
            stages += peer_stages
            leaves += peer_leaves
        samples = sum(stages.values())
        cpu = {kind: (cpu_after[kind] - cpu_before[kind]) / args.allreduces / args.peers for kind in kinds}
        return {
            "peers": args.peers,
            "values": args.values,
            "compression": args.compression,
            "allreduces": args.allreduces,
            "transfer_s": transfer_s,
            "identical": identical,
            "wall_s_all": wall_s,
            "cpu_s_per_allreduce_per_peer": cpu,
            "averager_stage_share": {k: v / samples for k, v in stages.most_common()} if samples else {},
            "averager_top_functions": {k: v / samples for k, v in leaves.most_common(args.top)}
            if samples
            else {},
            "averager_stage_cpu_s": {k: v / samples * cpu["averager"] for k, v in stages.most_common()}
            if samples
            else {},
        }
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
        for proc in procs:
            proc.join(timeout=30)
        bar.kill_trees(procs)
        with contextlib.suppress(Exception):
            root.shutdown()
        shutil.rmtree(out_dir, ignore_errors=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=2, help="peers (default 2)")
    p.add_argument(
        "--values", type=bar.parse_size, default=bar.parse_size("10M"), help="float32 values (default 10M)"
    )
    p.add_argument(
        "--compression", default="none", choices=sorted(bar.BYTES_PER_ELEMENT), help="default none"
    )
    p.add_argument(
        "--allreduces", type=int, default=5, help="profiled all-reduces after one warm-up (default 5)"
    )
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    p.add_argument("--matchmaking-s", type=float, default=1.0, help="min_matchmaking_time (default 1)")
    p.add_argument(
        "--gil",
        action="store_true",
        help="count only samples of threads holding the GIL (Python work; leaves out idle waits that py-spy "
        "cannot tell from work inside uvloop, and native work done without the GIL)",
    )
    p.add_argument(
        "--top", type=int, default=15, help="innermost functions to list by self time (default 15)"
    )
    p.add_argument(
        "--part-size", type=bar.parse_size, default=None, help="bytes per part (default: ExactAverager's)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.peers < 2 or args.allreduces < 1:
        p.error("--peers must be at least 2 and --allreduces positive")
    if shutil.which("py-spy") is None:
        p.error("py-spy not found: pip install py-spy (it is in the dev extra)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run(args)
    finally:
        bar.kill_descendants()
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    transfer = sorted(result["transfer_s"])
    print(
        f"k={args.peers} P={bar.human(args.values)} {args.compression}: transfer (slowest peer) median "
        f"{transfer[len(transfer) // 2]:.3f} s, range {transfer[0]:.3f}-{transfer[-1]:.3f} s over "
        f"{args.allreduces} all-reduces; identical on every peer: {result['identical']}"
    )
    print("CPU seconds per all-reduce per peer, by process:")
    for kind, seconds in result["cpu_s_per_allreduce_per_peer"].items():
        print(f"  {kind:>12}: {seconds:7.3f}")
    print("averager process CPU by stage (py-spy, busy samples only):")
    for stage, share in result["averager_stage_share"].items():
        print(f"  {stage:>36}: {share * 100:5.1f} %  {result['averager_stage_cpu_s'][stage]:7.3f} s")
    print("averager process, innermost functions by self time:")
    for function, share in result["averager_top_functions"].items():
        print(f"  {share * 100:5.1f} %  {function}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
