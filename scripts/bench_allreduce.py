"""All-reduce benchmark on 127.0.0.1: the project's averaging path (peer.allreduce.ExactAverager) against
torch.distributed gloo, run by the same k processes on the same machine, for each compression.

For every (k, P, compression) it prints the time of one all-reduce of P float32 values on both, their ratio,
the bytes each peer really sent (measured by ExactAverager) against the bound 2(k-1)/k x P x bytes per
element, and whether every peer ended with bit-identical results (sha256 of the averaged tensor).

    nice -n 19 python scripts/bench_allreduce.py                 # k = 2, 4; P = 1M, 10M, 50M
    nice -n 19 python scripts/bench_allreduce.py --peers 2 --sizes 1M,4M --compressions none,fp16 --json

Processes are forked (hivemind objects must not be created in spawned processes); each peer uses one
torch thread, so k peers on a c-core machine compete for the cores exactly as gloo's k processes do.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # p2p_floor
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import p2p_floor  # noqa: E402

BYTES_PER_ELEMENT = {"none": 4, "fp16": 2, "int8": 1}
DEFAULT_SIZES = "1M,10M,50M"
READY_TIMEOUT_S = 60.0  # importing torch + hivemind and starting p2pd on a loaded 2-core machine


def parse_size(text: str) -> int:
    """'1M' -> 1_000_000, '500k' -> 500_000, '123' -> 123."""
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1M, 500k)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def human(num: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if num >= scale:
            return f"{num / scale:g}{unit}"
    return f"{num:g}"


def make_input(peer_index: int, num_values: int) -> torch.Tensor:
    """Peer i's contribution: reproducible random values (any peer can regenerate any other's)."""
    generator = torch.Generator().manual_seed(1000 + peer_index)
    return torch.randn(num_values, generator=generator)


def step_timeout_s(num_values: int) -> float:
    """Generous bound for one all-reduce on a slow shared machine."""
    return 60.0 + 1.5 * num_values / 1e6


def make_averager(
    tensors,
    dht,
    *,
    prefix: str,
    compression: str,
    num_peers: int,
    matchmaking_s: float,
    part_size_bytes: int | None = None,
    transport: str = "direct",
):
    from peer.allreduce import ExactAverager
    from peer.direct_transport import DirectSettings
    from peer.swarm_averaging import COMPRESSION

    extra = {} if part_size_bytes is None else {"part_size_bytes": part_size_bytes}
    return ExactAverager(
        tensors,
        dht,
        prefix=prefix,
        start=True,
        target_group_size=None,
        min_group_size=num_peers,
        min_matchmaking_time=matchmaking_s,
        request_timeout=1.0,
        next_chunk_timeout=30.0,
        compression=COMPRESSION[compression],
        state_provider=lambda: ({}, []),
        shutdown_timeout=3,
        direct=DirectSettings(enabled=transport == "direct"),
        **extra,
    )


@dataclass
class LoopPeer:
    """One peer of a script that all-reduces the same input over and over (stress_allreduce, profile_allreduce)."""

    values: torch.Tensor
    order_key: bytes
    dht: object
    averager: object
    timeout_s: float
    """Bound on one all-reduce (step_timeout_s)."""

    def average_once(self, peer_index: int):
        return average_once(
            self.averager,
            self.values,
            peer_index=peer_index,
            order_key=self.order_key,
            timeout_s=self.timeout_s,
        )

    def shutdown(self) -> None:
        self.averager.shutdown()
        self.dht.shutdown()


def start_loop_peer(
    peer_index: int, args: argparse.Namespace, initial_peers: list[str], *, prefix: str, part_size_bytes=None
) -> LoopPeer:
    """Peer `peer_index`'s input, DHT and averager for `args.values` values (`args`: compression, peers,
    matchmaking_s), in one torch thread."""
    import hivemind

    from peer.outer import contribution_key

    torch.set_num_threads(1)
    values = make_input(peer_index, args.values)
    dht = hivemind.DHT(initial_peers=initial_peers, start=True)
    averager = make_averager(
        [torch.zeros(args.values)],
        dht,
        prefix=prefix,
        compression=args.compression,
        num_peers=args.peers,
        matchmaking_s=args.matchmaking_s,
        part_size_bytes=part_size_bytes,
    )
    return LoopPeer(values, contribution_key([values]), dht, averager, step_timeout_s(args.values))


def average_once(averager, values: torch.Tensor, *, peer_index: int, order_key: bytes, timeout_s: float):
    """One all-reduce through the project's path; returns (wall_s, transport stats, sha256 of the result)."""
    from peer.outer import tensors_sha256

    with averager.get_tensors() as tensors:
        tensors[0].copy_(values)
    started = time.perf_counter()
    group = averager.step(
        gather={"order_key": order_key.hex(), "peer_index": peer_index, "direct": averager.direct_metadata()},
        weight=float(peer_index + 1),
        timeout=timeout_s,
        allow_retries=False,
    )
    wall_s = time.perf_counter() - started
    if group is None:
        raise RuntimeError("all-reduce returned no group")
    with averager.get_tensors() as tensors:
        digest = tensors_sha256(tensors)
    return wall_s, averager.last_transport_stats(), digest, len(group)


def worker(
    peer_index: int,
    num_peers: int,
    args: argparse.Namespace,
    gloo_port: int,
    initial_peers: list[str],
    barrier,
    results,
) -> None:
    """One peer: first gloo all-reduces every size, then the project's averaging path, reporting to `results`."""
    import hivemind
    import torch.distributed as dist

    from peer.allreduce import allreduce_part_bytes
    from peer.outer import average_contributions, contribution_key, tensors_sha256

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{gloo_port}",
            world_size=num_peers,
            rank=peer_index,  # torch's name; the swarm itself has no ranks
            timeout=timedelta(seconds=120),
        )
        for num_values in args.sizes:
            values = make_input(peer_index, num_values)
            times = []
            for _ in range(args.repeats + 1):  # the first all-reduce of a size is warm-up
                buffer = values.clone()
                dist.barrier()
                started = time.perf_counter()
                dist.all_reduce(buffer)
                times.append(time.perf_counter() - started)
            results.put(("gloo", peer_index, num_values, times[1:]))
            del values, buffer
        dist.destroy_process_group()

        dht = hivemind.DHT(initial_peers=initial_peers, start=True)
        for num_values in args.sizes:
            for compression in args.compressions:
                floor_times = p2p_floor.measure(
                    dht,
                    key=f"floor{num_peers}_{num_values}_{compression}",
                    peer_index=peer_index,
                    num_peers=num_peers,
                    bytes_to_each=num_values // num_peers * BYTES_PER_ELEMENT[compression],
                    part_bytes=args.part_size or allreduce_part_bytes(num_values, num_peers),  # the group's
                    barrier=barrier,
                    repeats=args.repeats,
                )
                results.put(("floor", peer_index, num_values, compression, floor_times))
        for num_values in args.sizes:
            values = make_input(peer_index, num_values)
            order_key = contribution_key([values])
            for compression, transport in itertools.product(args.compressions, args.transports):
                averager = make_averager(
                    [torch.zeros(num_values)],
                    dht,
                    prefix=f"bench{num_peers}_{num_values}_{compression}_{transport}",
                    compression=compression,
                    num_peers=num_peers,
                    matchmaking_s=args.matchmaking_s,
                    part_size_bytes=args.part_size,
                    transport=transport,
                )
                runs = []
                try:
                    for _ in range(args.repeats + 1):  # the first one warms up connections and threads
                        barrier.wait(timeout=READY_TIMEOUT_S + step_timeout_s(num_values))
                        runs.append(
                            average_once(
                                averager,
                                values,
                                peer_index=peer_index,
                                order_key=order_key,
                                timeout_s=step_timeout_s(num_values),
                            )
                        )
                    # a reducer may still be streaming averaged parts to others when its own step() returns;
                    # shutting down now would cut those streams
                    barrier.wait(timeout=READY_TIMEOUT_S + step_timeout_s(num_values))
                finally:
                    averager.shutdown()
                runs = runs[1:]
                expected = None
                if peer_index == 0 and compression == "none":
                    # the exact weighted average, computed in memory like peer.simulate does
                    inputs = [make_input(i, num_values) for i in range(num_peers)]
                    expected = tensors_sha256(
                        [
                            average_contributions(
                                inputs,
                                [float(i + 1) for i in range(num_peers)],
                                [contribution_key([x]) for x in inputs],
                            )
                        ]
                    )
                    del inputs
                results.put(("ours", peer_index, num_values, (compression, transport), runs, expected))
            del values
        dht.shutdown()
        results.put(("done", peer_index))
    except BaseException as e:
        results.put(("error", peer_index, f"{type(e).__name__}: {e}"))
        barrier.abort()  # the others stop waiting for this peer at once
        raise


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (p2pd daemons and hivemind's forked averagers included)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_descendants() -> None:
    for pid in reversed(descendants(os.getpid())):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_trees(procs) -> None:
    """Kill the peer processes still alive and everything under them. Their descendants are listed first: once
    a peer dies, its hivemind children (DHT, averager, p2pd) are orphaned out of this process's tree."""
    leftovers = [pid for proc in procs if proc.pid is not None for pid in descendants(proc.pid)]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for pid in reversed(leftovers):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for proc in procs:
        proc.join(timeout=5)


def run_peers(num_peers: int, args: argparse.Namespace, initial_peers: list[str]) -> tuple[dict, dict]:
    """Fork k peers, collect their gloo times and our results; kill whatever is left on the way out."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    barrier = ctx.Barrier(num_peers)
    port = free_port()
    procs = [
        ctx.Process(
            target=worker,
            args=(i, num_peers, args, port, initial_peers, barrier, results),
            daemon=False,
        )
        for i in range(num_peers)
    ]
    for proc in procs:
        proc.start()
    gloo: dict[int, list[list[float]]] = {}
    floor: dict[tuple[int, str], list[list[float]]] = {}
    ours: dict[tuple[int, str], list] = {}
    budget_s = READY_TIMEOUT_S + sum(
        (args.repeats + 1) * (step_timeout_s(n) + args.matchmaking_s + 5)
        for n in args.sizes
        for c in args.compressions
        for _ in args.transports
    )
    deadline = time.monotonic() + budget_s
    done = 0
    try:
        while done < num_peers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"k={num_peers}: peers did not finish within {budget_s:.0f} s")
            try:
                message = results.get(timeout=min(remaining, 5.0))
            except Exception:  # queue.Empty: check that nobody died silently
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"k={num_peers}: a peer exited with {dead}") from None
                continue
            kind = message[0]
            if kind == "error":
                raise RuntimeError(f"k={num_peers}: peer {message[1]} failed: {message[2]}")
            if kind == "done":
                done += 1
            elif kind == "gloo":
                _, _, num_values, times = message
                gloo.setdefault(num_values, []).append(times)
            elif kind == "floor":
                _, _, num_values, compression, times = message
                floor.setdefault((num_values, compression), []).append(times)
            elif kind == "ours":
                _, index, num_values, compression, runs, expected = message
                ours.setdefault((num_values, compression), []).append((index, runs, expected))
                if args.verbose:
                    hashes = " ".join(run[2][:8] for run in runs)
                    print(
                        f"  k={num_peers} P={human(num_values)} {compression}: peer {index} sha256 {hashes}, "
                        f"reducers direct/p2p {[(r[1]['reducers_direct'], r[1]['reducers_p2p']) for r in runs]}, "
                        f"transfer s {[round(r[1]['transfer_s'], 3) for r in runs]}",
                        file=sys.stderr,
                    )
        for proc in procs:
            proc.join(timeout=15)
    finally:
        kill_trees(procs)
    return gloo, floor, ours


def summarize(num_peers: int, args, gloo: dict, floor: dict, ours: dict) -> list[dict]:
    rows = []
    for num_values in args.sizes:
        # an all-reduce is over when its slowest peer is done: per repetition the max over peers, then the median
        gloo_s = statistics.median(max(times) for times in zip(*gloo[num_values], strict=True))
        for compression, transport in itertools.product(args.compressions, args.transports):
            per_peer = sorted(ours[(num_values, (compression, transport))], key=lambda item: item[0])
            runs_by_peer = [runs for _, runs, _ in per_peer]
            transfer_s = statistics.median(
                max(run[1]["transfer_s"] for run in rep) for rep in zip(*runs_by_peer, strict=True)
            )
            step_s = statistics.median(max(run[0] for run in rep) for rep in zip(*runs_by_peer, strict=True))
            floor_s = statistics.median(max(t) for t in zip(*floor[(num_values, compression)], strict=True))
            sent = [run[1]["bytes_sent"] for runs in runs_by_peer for run in runs]
            received = [run[1]["bytes_received"] for runs in runs_by_peer for run in runs]
            # which path the parts really took: reducers reached directly / through p2p, over all peers and runs
            direct = sum(run[1]["reducers_direct"] for runs in runs_by_peer for run in runs)
            via_p2p = sum(run[1]["reducers_p2p"] for runs in runs_by_peer for run in runs)
            # I1: within each all-reduce every peer holds the same bytes
            per_rep_hashes = [{run[2] for run in rep} for rep in zip(*runs_by_peer, strict=True)]
            identical = all(len(h) == 1 for h in per_rep_hashes)
            hashes = set().union(*per_rep_hashes)
            group_sizes = {run[3] for runs in runs_by_peer for run in runs}
            expected = next((e for _, _, e in per_peer if e is not None), None)
            bound = 2 * (num_peers - 1) / num_peers * num_values * BYTES_PER_ELEMENT[compression]
            rows.append(
                {
                    "peers": num_peers,
                    "values": num_values,
                    "compression": compression,
                    "transport": transport,
                    "reducers_direct": direct,
                    "reducers_p2p": via_p2p,
                    "ours_s": transfer_s,
                    "ours_step_s": step_s,
                    "gloo_fp32_s": gloo_s,
                    "ratio": transfer_s / gloo_s,
                    "p2p_floor_s": floor_s,
                    "ratio_to_floor": transfer_s / floor_s,
                    "bytes_sent_mean": statistics.mean(sent),
                    "bytes_sent_max": max(sent),
                    "bytes_received_mean": statistics.mean(received),
                    "bytes_bound": bound,
                    "sent_over_bound": statistics.mean(sent) / bound,
                    "group_sizes": sorted(group_sizes),
                    "identical": identical,
                    # the same result in every repetition (each repetition forms a new group, whose random peer
                    # order decides which peer reduces which shard)
                    "same_across_repeats": len(hashes) == 1,
                    "sha256": sorted(h[:16] for h in hashes),
                    "matches_exact": None if expected is None else hashes == {expected},
                }
            )
    return rows


def path_label(row: dict) -> str:
    """The transport asked for, with a "!" if any reducer was reached another way (a fallback happened)."""
    fell_back = row["reducers_p2p"] if row["transport"] == "direct" else row["reducers_direct"]
    return row["transport"] + ("!" if fell_back else "")


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'k':>2} {'P':>5} {'comp':>5} {'path':>6} | {'ours s':>7} {'gloo s':>7} {'ratio':>6} | {'p2p s':>6} {'/p2p':>5} | "
        f"{'sent/peer MB':>12} {'bound MB':>9} {'sent/bnd':>8} | {'step s':>7} | identical (sha256)"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        identical = "yes" if row["identical"] else "NO"
        if row["matches_exact"] is not None:
            identical += ", = exact" if row["matches_exact"] else ", != exact"
        if not row["same_across_repeats"]:
            identical += ", differs between repeats"
        sha = ",".join(h[:8] for h in row["sha256"])
        print(
            f"{row['peers']:>2} {human(row['values']):>5} {row['compression']:>5} {path_label(row):>6} | "
            f"{row['ours_s']:>7.3f} {row['gloo_fp32_s']:>7.3f} {row['ratio']:>6.2f} | "
            f"{row['p2p_floor_s']:>6.3f} {row['ratio_to_floor']:>5.2f} | "
            f"{row['bytes_sent_mean'] / 1e6:>12.2f} {row['bytes_bound'] / 1e6:>9.2f} "
            f"{row['sent_over_bound']:>8.3f} | {row['ours_step_s']:>7.2f} | {identical} ({sha})"
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--peers", default="2,4", help="comma-separated numbers of peers k to benchmark (default 2,4)"
    )
    p.add_argument(
        "--sizes",
        default=DEFAULT_SIZES,
        help=f"comma-separated numbers of float32 values P, e.g. 1M,4M,50M (default {DEFAULT_SIZES})",
    )
    p.add_argument(
        "--compressions", default="none,fp16,int8", help="comma-separated subset of none,fp16,int8"
    )
    p.add_argument(
        "--transports",
        default="direct,p2p",
        help="comma-separated subset of direct (our TCP data path, peer/direct_transport.py) and p2p "
        "(everything through hivemind's p2p daemon); default both",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed all-reduces per setting (median; default 1)")
    p.add_argument(
        "--matchmaking-s", type=float, default=1.0, help="min_matchmaking_time of each all-reduce (default 1)"
    )
    p.add_argument(
        "--part-size",
        type=parse_size,
        default=None,
        help="bytes per all-reduce part (after compression), e.g. 4M (default: what the group picks)",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    args = p.parse_args(argv)
    try:
        args.peers = [int(x) for x in args.peers.split(",")]
        args.sizes = [parse_size(x) for x in args.sizes.split(",")]
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(str(e))
    args.compressions = [c.strip() for c in args.compressions.split(",")]
    args.transports = [t.strip() for t in args.transports.split(",")]
    if bad := [t for t in args.transports if t not in ("direct", "p2p")]:
        p.error(f"--transports: unknown {bad}; choose from direct, p2p")
    if any(k < 2 for k in args.peers):
        p.error("--peers: every k must be at least 2")
    if bad := [c for c in args.compressions if c not in BYTES_PER_ELEMENT]:
        p.error(f"--compressions: unknown {bad}; choose from none, fp16, int8")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import hivemind

    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks below
    root = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    rows = []
    try:
        initial_peers = [str(m) for m in root.get_visible_maddrs()]
        for num_peers in args.peers:
            gloo, floor, ours = run_peers(num_peers, args, initial_peers)
            rows += summarize(num_peers, args, gloo, floor, ours)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as e:
        print(f"bench_allreduce: error: {e}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            root.shutdown()
        kill_descendants()
    if args.json:
        print(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=1))
    else:
        print(
            f"all-reduce of P float32 values, k peers on 127.0.0.1, {os.cpu_count()} CPU cores, 1 thread/peer"
        )
        print_table(rows)
        print(
            "ours s: ExactAverager transfer (group formed -> averaged tensor copied), slowest peer, median;\n"
            "gloo s: torch.distributed gloo all_reduce of the same fp32 tensors by the same processes;\n"
            "p2p s: the same bytes streamed to every other peer and echoed back through hivemind's p2p daemon, "
            "nothing else (scripts/p2p_floor.py);\n"
            "sent/peer: bytes each peer sent (measured, protobuf framing included), mean over peers;\n"
            "path: the data path (direct: our TCP connections; p2p: hivemind's daemon; '!': some reducer fell back);\n"
            "bound: 2(k-1)/k x P x bytes per element; step s: averager.step() incl. matchmaking;\n"
            "identical: every peer's result has the same sha256 in each repetition (invariant I1)."
        )
    ok = all(row["identical"] and row["matches_exact"] is not False for row in rows)
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
