"""Bandwidth-limited benchmark: k peers, each in its own network namespace, joined by veth pairs to a bridge in
a hub namespace; every link is shaped with `tc ... tbf` in both directions (upload and download at R Mbit/s).

Part 1 (--parts allreduce): the project's averaging path (peer.allreduce.ExactAverager) averages P float32
values (default: the size of the `tiny` preset) with each compression; its time is compared with the
bandwidth bound 2(k-1)/k x P x bytes-per-element / R and with the bound for the bytes it really sent.

Part 2 (--parts utilization): real peers (`python -m peer`, one per namespace) train the `tiny` preset for a
few rounds; compute utilization = time in inner steps / wall time, per peer, over whole cycles from the start
of round 2 to the start of the last round.
Settings: DiLoCo, DiLoCo + fp16, DiLoCo + int8, DiLoCo + overlap (only if the peer has an --overlap flag),
and data-parallel, emulated from the same run: one measured inner step + one measured fp32 all-reduce of the
full model through the project's path, per step.

    sudo nice -n 19 python scripts/bench_wan.py                     # k = 2; 50, 100, 500 Mbit/s
    sudo nice -n 19 python scripts/bench_wan.py --bandwidths 100 --parts utilization --json

Needs root (ip netns, tc). Namespaces are named after this process id (dlw<pid>...) and removed on exit,
on Ctrl+C/SIGTERM, and by the next run if this one was SIGKILLed. No traffic leaves the namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_allreduce
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the peer package from this checkout
import bench_allreduce as bar  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
NS_PREFIX = "dlw"
SUBNET = "10.77.0"  # private addresses that exist only inside this benchmark's namespaces
CLONE_NEWNET = 0x40000000
CMD_TIMEOUT_S = 10.0


# ---- the network ---------------------------------------------------------------------------------------------
STOP_REQUESTED = False  # set by the signal handler, in case the SystemExit it raises is swallowed somewhere


def check_stop() -> None:
    if STOP_REQUESTED:
        raise SystemExit(143)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    if check:  # cleanup commands (check=False) must run even while stopping
        check_stop()
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_namespace(name: str) -> None:
    """Kill what runs inside (processes this benchmark started there), then delete the namespace and its links."""
    pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    sh("ip", "netns", "del", name, check=False)


def sweep_stale_namespaces() -> None:
    """Remove namespaces left by an earlier run of this script that was SIGKILLed (its pid is gone)."""
    listing = sh("ip", "netns", "list", check=False).stdout
    for name in re.findall(rf"^({NS_PREFIX}(\d+)[hp]\d*)\b", listing, flags=re.M):
        if not _pid_alive(int(name[1])):
            delete_namespace(name[0])


class Network:
    """A hub namespace with a bridge, and one namespace per peer linked to it by a veth pair."""

    def __init__(self, num_peers: int):
        tag = f"{NS_PREFIX}{os.getpid()}"
        self.hub = f"{tag}h"
        self.peers = [f"{tag}p{i}" for i in range(num_peers)]
        self.created: list[str] = []
        self.rate_mbit: float | None = None

    def address(self, peer_index: int) -> str:
        return f"{SUBNET}.{peer_index + 1}"

    def up(self) -> None:
        for name in [self.hub, *self.peers]:
            sh("ip", "netns", "add", name)
            self.created.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, peer in enumerate(self.peers):
            # created inside the namespaces directly: nothing ever appears in the host's namespace
            sh(
                "ip",
                "-n",
                self.hub,
                "link",
                "add",
                f"hub{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                peer,
            )
            sh("ip", "-n", self.hub, "link", "set", f"hub{i}", "master", "br0")
            sh("ip", "-n", self.hub, "link", "set", f"hub{i}", "up")
            sh("ip", "-n", peer, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            sh("ip", "-n", peer, "link", "set", "eth0", "up")

    def shape(self, rate_mbit: float) -> None:
        """Token bucket on both ends of every link: the peer's upload (eth0) and its download (hub side)."""
        rate_bytes_s = rate_mbit * 1e6 / 8
        burst = max(128 * 1024, int(rate_bytes_s / 100))  # >= a 64 KiB GSO segment; <= 10 ms at line rate
        for i, peer in enumerate(self.peers):
            for ns, dev in ((peer, "eth0"), (self.hub, f"hub{i}")):
                sh(
                    "ip", "netns", "exec", ns,
                    "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms",
                )  # fmt: skip
        self.rate_mbit = rate_mbit

    def down(self) -> None:
        for name in reversed(self.created):
            delete_namespace(name)  # deleting a namespace deletes its veth ends and their qdiscs
        self.created.clear()


def enter_namespace(name: str) -> None:
    """Move this (forked, single-threaded) process into a network namespace; p2pd inherits it."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name}) failed")
    finally:
        os.close(fd)


def check_namespaces_work() -> str | None:
    """None if this machine lets us create namespaces, veth pairs and tbf qdiscs; otherwise why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns, tc): run with sudo"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install iproute2)"
    probe = f"{NS_PREFIX}{os.getpid()}p99"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "-n", probe, "link", "add", "probe_a", "type", "veth", "peer", "name", "probe_b")
        sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "probe_a", "root", "tbf",
           "rate", "10mbit", "burst", "32kb", "latency", "50ms")  # fmt: skip
    except subprocess.CalledProcessError as e:
        return f"`{' '.join(e.cmd)}` failed: {e.stderr.strip()}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


# ---- part 1: the averaging path against the bandwidth bound ------------------------------------------------------
def allreduce_worker(peer_index, args, net_names, addresses, barrier, maddrs_queue, results) -> None:
    """One peer in its namespace: for each bandwidth (set by the main process between barriers) and each
    compression, warm up once, then time `--repeats` all-reduces."""
    import hivemind

    from peer.outer import contribution_key

    try:
        enter_namespace(net_names[peer_index])
        torch.set_num_threads(1)
        if peer_index == 0:
            dht = hivemind.DHT(host_maddrs=[f"/ip4/{addresses[0]}/tcp/0"], start=True)
            for _ in range(args.peers - 1):
                maddrs_queue.put([str(m) for m in dht.get_visible_maddrs()])
        else:
            initial_peers = maddrs_queue.get(timeout=bar.READY_TIMEOUT_S)
            dht = hivemind.DHT(
                initial_peers=initial_peers, host_maddrs=[f"/ip4/{addresses[peer_index]}/tcp/0"], start=True
            )
        values = bar.make_input(peer_index, args.values)
        order_key = contribution_key([values])
        averagers = {
            c: bar.make_averager(
                [torch.zeros(args.values)],
                dht,
                prefix=f"wan_{c}",
                compression=c,
                num_peers=args.peers,
                matchmaking_s=args.matchmaking_s,
            )
            for c in args.compressions
        }
        timeout_s = wan_step_timeout_s(args)
        for rate in args.bandwidths:
            barrier.wait(
                timeout=bar.READY_TIMEOUT_S + 10 * timeout_s
            )  # the main process has shaped the links
            for compression, averager in averagers.items():
                runs = []
                for _ in range(args.repeats + 1):
                    barrier.wait(timeout=bar.READY_TIMEOUT_S + timeout_s)
                    runs.append(
                        bar.average_once(
                            averager, values, peer_index=peer_index, order_key=order_key, timeout_s=timeout_s
                        )
                    )
                results.put(("ours", peer_index, rate, compression, runs[1:]))
        # a reducer may still be streaming averaged parts to others when its own step() returns
        barrier.wait(timeout=bar.READY_TIMEOUT_S + timeout_s)
        for averager in averagers.values():
            averager.shutdown()
        dht.shutdown()
        results.put(("done", peer_index))
    except BaseException as e:
        results.put(("error", peer_index, f"{type(e).__name__}: {e}"))
        barrier.abort()  # the others stop waiting for this peer at once
        raise


def wan_step_timeout_s(args) -> float:
    slowest_s = 2 * args.values * 4 * 8 / (min(args.bandwidths) * 1e6)
    return 60.0 + 3 * slowest_s + 1.5 * args.values / 1e6


def run_allreduce_part(args, net: Network) -> list[dict]:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(args.peers + 1)  # the peers and this process, which shapes the links
    results, maddrs_queue = ctx.Queue(), ctx.Queue()
    addresses = [net.address(i) for i in range(args.peers)]
    procs = [
        ctx.Process(
            target=allreduce_worker, args=(i, args, net.peers, addresses, barrier, maddrs_queue, results)
        )
        for i in range(args.peers)
    ]
    for proc in procs:
        proc.start()
    collected: dict[tuple[float, str], list] = {}
    timeout_s = wan_step_timeout_s(args)
    try:
        for rate in args.bandwidths:
            net.shape(rate)
            barrier.wait(timeout=bar.READY_TIMEOUT_S + 10 * timeout_s)
            for compression in args.compressions:
                for _ in range(args.repeats + 1):
                    check_stop()
                    barrier.wait(timeout=bar.READY_TIMEOUT_S + timeout_s)
                for _ in range(args.peers):
                    message = _get_result(results, procs, timeout_s=bar.READY_TIMEOUT_S + timeout_s)
                    _, index, got_rate, got_compression, runs = message
                    collected.setdefault((got_rate, got_compression), []).append((index, runs))
                if args.verbose:
                    print(f"  {rate} Mbit/s {compression}: done", file=sys.stderr)
        barrier.wait(timeout=bar.READY_TIMEOUT_S + timeout_s)  # every peer is done before any shuts down
        for _ in range(args.peers):
            _get_result(results, procs, timeout_s=30)
        for proc in procs:
            proc.join(timeout=15)
    finally:
        with contextlib.suppress(Exception):
            barrier.abort()  # releases peers stuck at a barrier if we leave early
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
    return summarize_allreduce(args, collected)


def _get_result(results, procs, *, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        check_stop()
        try:
            message = results.get(timeout=1.0)
        except Exception:  # queue.Empty
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError(f"a peer died: exit codes {[p.exitcode for p in procs]}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result from the peers within {timeout_s:.0f} s") from None
            continue
        if message[0] == "error":
            raise RuntimeError(f"peer {message[1]} failed: {message[2]}")
        return message


def summarize_allreduce(args, collected) -> list[dict]:
    rows = []
    k = args.peers
    for rate in args.bandwidths:
        rate_bytes_s = rate * 1e6 / 8
        for compression in args.compressions:
            runs_by_peer = [runs for _, runs in sorted(collected[(rate, compression)], key=lambda x: x[0])]
            reps = list(zip(*runs_by_peer, strict=True))
            transfer_s = statistics.median(max(r[1]["transfer_s"] for r in rep) for rep in reps)
            step_s = statistics.median(max(r[0] for r in rep) for rep in reps)
            # the slowest link decides: the most any one peer had to push through its upload or download
            busiest = max(max(r[1]["bytes_sent"], r[1]["bytes_received"]) for rep in reps for r in rep)
            bound_bytes = 2 * (k - 1) / k * args.values * bar.BYTES_PER_ELEMENT[compression]
            bound_s = bound_bytes / rate_bytes_s
            identical = all(len({r[2] for r in rep}) == 1 for rep in reps)
            rows.append(
                {
                    "peers": k,
                    "mbit_s": rate,
                    "values": args.values,
                    "compression": compression,
                    "allreduce_s": transfer_s,
                    "step_s": step_s,
                    "bound_s": bound_s,
                    "ratio_to_bound": transfer_s / bound_s,
                    "bytes_busiest_peer": busiest,
                    "bound_s_for_sent_bytes": busiest / rate_bytes_s,
                    "ratio_to_bound_for_sent_bytes": transfer_s / (busiest / rate_bytes_s),
                    "identical": identical,
                }
            )
    return rows


# ---- part 2: utilization of real peers -----------------------------------------------------------------------
def peer_has_flag(flag: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "peer", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    ).stdout
    return flag in out


def utilization_settings(args, overlap_available: bool) -> list[tuple[str, list[str]]]:
    """(name, extra peer flags) of the DiLoCo settings run with real peers."""
    settings = [
        ("DiLoCo", ["--compression", "none"]),
        ("DiLoCo + fp16", ["--compression", "fp16"]),
        ("DiLoCo + int8", ["--compression", "int8"]),
    ]
    if overlap_available:
        settings.append(("DiLoCo + overlap", ["--compression", "none", "--overlap"]))
    return [s for s in settings if not args.settings or any(p in s[0] for p in args.settings)]


def data_parallel_row(rate: float, diloco_rows: list[dict], allreduce_rows: list[dict]) -> dict:
    """Data-parallel emulated from this run's measurements: every step computes one inner step (the DiLoCo
    peers' median step time) and then all-reduces the full model in fp32 through the project's averaging path
    (its measured transfer time at this bandwidth; matchmaking excluded, as a persistent data-parallel group
    would not rematch every step). Running peers with H = 1 instead measures matchmaking, not bandwidth."""
    steps = [r["inner_step_s"] for r in diloco_rows if "inner_step_s" in r]
    transfers = [r for r in allreduce_rows if r["mbit_s"] == rate and r["compression"] == "none"]
    if not steps or not transfers:
        return {"setting": "data-parallel (emulated)", "error": "needs a DiLoCo run and the none all-reduce"}
    step_s, allreduce_s = statistics.median(steps), transfers[0]["allreduce_s"]
    return {
        "setting": "data-parallel (emulated)",
        "inner_steps": 1,
        "utilization": step_s / (step_s + allreduce_s),
        "inner_step_s": step_s,
        "allreduce_s_median": allreduce_s,
        "bytes_sent_median": transfers[0]["bytes_busiest_peer"],
        "failed_rounds": 0,
    }


def run_peers_once(args, net: Network, workdir: Path, name: str, flags: list[str]) -> dict:
    """Start one `python -m peer` per namespace, wait (bounded) for them to finish, read their metrics."""
    slug = re.sub(r"\W+", "_", name).strip("_")
    run_dir = workdir / f"{net.rate_mbit:g}_{slug}"
    run_dir.mkdir()
    rounds, inner_steps = args.rounds, args.inner_steps
    budget_s = 180 + rounds * (inner_steps * args.step_budget_s + 90)
    common = [
        sys.executable, "-m", "peer",
        "--model", "tiny", "--inner-steps", str(inner_steps), "--max-rounds", str(rounds),
        "--num-threads", "1", "--eval-every", "0", "--wait-for-peers", str(args.peers),
        "--run-id", f"wan{os.getpid()}_{slug}", "--matchmaking-s", str(args.peer_matchmaking_s),
        "--log-level", "WARNING", *flags,
    ]  # fmt: skip
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + budget_s
    try:
        for i, ns in enumerate(net.peers):
            cmd = [*common, "--host-maddrs", f"/ip4/{net.address(i)}/tcp/0"]
            cmd += ["--metrics-file", str(run_dir / f"peer{i}.jsonl")]
            if i == 0:
                cmd += ["--maddrs-file", str(run_dir / "maddrs")]
            else:
                while not (run_dir / "maddrs").exists():
                    check_stop()
                    if time.monotonic() > deadline or procs[0].poll() is not None:
                        raise RuntimeError(
                            f"{name}: the first peer did not come up: {_tail(run_dir / 'peer0.log')}"
                        )
                    time.sleep(0.2)
                cmd += ["--initial-peers", *(run_dir / "maddrs").read_text().split()]
            with (run_dir / f"peer{i}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", ns, *cmd],
                        cwd=REPO_ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,  # its own group: we can kill it with p2pd and hivemind's children
                    )
                )
        for i, proc in enumerate(procs):
            while True:
                check_stop()
                try:
                    code = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name}: peers did not finish within {budget_s:.0f} s") from None
            if code != 0:
                raise RuntimeError(f"{name}: peer {i} exited with {code}: {_tail(run_dir / f'peer{i}.log')}")
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
    return summarize_peers(run_dir, name, inner_steps)


def _tail(path: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    return "(no log)"


def summarize_peers(run_dir: Path, name: str, inner_steps: int) -> dict:
    """Utilization per peer: inner-step time over wall time from the start of round 2's inner phase to the start
    of the last round's (round 1 includes startup and peer discovery; with --overlap the last round's
    all-reduce has no compute left to hide behind, so whole cycles are measured, from inner start to inner
    start)."""
    per_peer = []
    allreduce, bytes_sent, failed = [], [], 0
    for path in sorted(run_dir.glob("peer*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(records) < 3:
            raise RuntimeError(f"{name}: {path.name} has {len(records)} rounds, need at least 3")
        measured = records[1:-1]
        wall_s = records[-1]["inner_started_at"] - records[1]["inner_started_at"]
        per_peer.append(sum(r["inner_s"] for r in measured) / wall_s)
        allreduce += [r["allreduce_s"] for r in measured]
        bytes_sent += [r.get("bytes_sent", 0) for r in measured]
        failed += sum(bool(r["failed"]) for r in measured)
        inner_step_s = statistics.median(r["inner_s"] / inner_steps for r in measured)
    return {
        "setting": name,
        "inner_steps": inner_steps,
        "utilization": statistics.mean(per_peer),
        "utilization_per_peer": per_peer,
        "allreduce_s_median": statistics.median(allreduce),  # from the peer's own metrics (incl. matchmaking)
        "bytes_sent_median": statistics.median(bytes_sent),
        "inner_step_s": inner_step_s,
        "failed_rounds": failed,
    }


# ---- main --------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=2, help="k, peers (one namespace each; default 2)")
    p.add_argument("--bandwidths", default="50,100,500", help="link rates in Mbit/s (default 50,100,500)")
    p.add_argument("--parts", default="allreduce,utilization", help="which parts to run (default both)")
    p.add_argument("--compressions", default="none,fp16,int8", help="compressions for the all-reduce part")
    p.add_argument(
        "--values", type=bar.parse_size, default=None, help="P for the all-reduce part (default: tiny's size)"
    )
    p.add_argument("--repeats", type=int, default=2, help="timed all-reduces per setting (default 2)")
    p.add_argument(
        "--matchmaking-s", type=float, default=1.0, help="min_matchmaking_time in the all-reduce part"
    )
    p.add_argument("--inner-steps", type=int, default=50, help="H for the DiLoCo settings (default 50)")
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds per DiLoCo setting (at least 3): rounds 2 to the last but one are measured",
    )
    p.add_argument(
        "--dp-rounds", type=int, default=4, help="rounds (= steps) for the data-parallel emulation"
    )
    p.add_argument("--settings", default="", help="comma-separated name filters for part 2, e.g. int8,fp16")
    p.add_argument("--peer-matchmaking-s", type=float, default=5.0, help="peers' --matchmaking-s (default 5)")
    p.add_argument(
        "--step-budget-s", type=float, default=2.0, help="time bound per inner step (for timeouts)"
    )
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    args = p.parse_args(argv)
    try:
        args.bandwidths = [float(x) for x in args.bandwidths.split(",")]
    except ValueError:
        p.error(f"--bandwidths must be numbers in Mbit/s, got {args.bandwidths!r}")
    args.parts = set(args.parts.split(","))
    args.compressions = args.compressions.split(",")
    args.settings = [s for s in args.settings.split(",") if s]
    if args.parts - {"allreduce", "utilization"}:
        p.error("--parts: choose from allreduce, utilization")
    if not 2 <= args.peers <= 200 or any(r <= 0 for r in args.bandwidths):
        p.error("--peers must be 2..200 and every bandwidth positive")
    if bad := [c for c in args.compressions if c not in bar.BYTES_PER_ELEMENT]:
        p.error(f"--compressions: unknown {bad}")
    if args.rounds < 3:
        p.error("--rounds must be at least 3 (whole cycles from round 2 to the last are measured)")
    return args


def tiny_num_params() -> int:
    from peer.data import Tokenizer
    from peer.model import build_model, count_parameters, load_model_config

    tokenizer = Tokenizer("embedded")
    return count_parameters(
        build_model(load_model_config("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=256), seed=0)
    )


def _raise_exit(signum, _frame):
    global STOP_REQUESTED
    STOP_REQUESTED = True
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = check_namespaces_work()
    if problem:
        print(f"bench_wan: error: {problem}", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)  # unwind through the finally below, which removes the namespaces
    sweep_stale_namespaces()
    if args.values is None:
        args.values = tiny_num_params()
    check_stop()
    net = Network(args.peers)
    workdir = Path(tempfile.mkdtemp(prefix="bench_wan_"))
    report: dict = {"peers": args.peers, "values": args.values, "cpu_count": os.cpu_count()}
    try:
        net.up()
        if "allreduce" in args.parts:
            report["allreduce"] = run_allreduce_part(args, net)
        if "utilization" in args.parts:
            overlap_available = peer_has_flag("--overlap")
            report["overlap"] = (
                "available" if overlap_available else "not available (the peer has no --overlap flag)"
            )
            report["utilization"] = []
            allreduce_rows = report.get("allreduce")
            if allreduce_rows is None:  # the data-parallel emulation needs the fp32 all-reduce time
                none_only = argparse.Namespace(**{**vars(args), "compressions": ["none"]})
                allreduce_rows = report["allreduce_none"] = run_allreduce_part(none_only, net)
            for rate in args.bandwidths:
                net.shape(rate)
                rows = []
                for name, flags in utilization_settings(args, overlap_available):
                    if args.verbose:
                        print(f"  {rate:g} Mbit/s: {name} ...", file=sys.stderr)
                    try:
                        rows.append(run_peers_once(args, net, workdir, name, flags))
                    except RuntimeError as e:
                        rows.append({"setting": name, "error": str(e)})
                rows.insert(0, data_parallel_row(rate, rows, allreduce_rows))
                report["utilization"] += [{"mbit_s": rate, **row} for row in rows]
    except SystemExit:
        print("interrupted: cleaning up", file=sys.stderr)
        raise
    except (RuntimeError, TimeoutError, subprocess.SubprocessError) as e:
        print(f"bench_wan: error: {e}", file=sys.stderr)
        return 1
    finally:
        net.down()
        bar.kill_descendants()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 0


def print_report(report: dict) -> None:
    k = report["peers"]
    print(f"k = {k} peers, each behind a link of R Mbit/s up and down (tbf); P = {report['values']:,} values")
    if "allreduce" in report:
        print("\nAll-reduce (project path) vs the bandwidth bound 2(k-1)/k x P x bytes-per-element / R")
        print(
            f"{'Mbit/s':>7} {'comp':>5} | {'ours s':>7} {'bound s':>8} {'ratio':>6} | {'bound(sent) s':>13} {'ratio':>6} | {'step s':>7} | identical"
        )
        for r in report["allreduce"]:
            print(
                f"{r['mbit_s']:>7g} {r['compression']:>5} | {r['allreduce_s']:>7.2f} {r['bound_s']:>8.2f} "
                f"{r['ratio_to_bound']:>6.2f} | {r['bound_s_for_sent_bytes']:>13.2f} "
                f"{r['ratio_to_bound_for_sent_bytes']:>6.2f} | {r['step_s']:>7.2f} | {'yes' if r['identical'] else 'NO'}"
            )
    if "utilization" in report:
        print(
            f"\nCompute utilization (inner time / wall time over whole cycles, from round 2 to the last round's start); overlap: {report['overlap']}"
        )
        print(
            f"{'Mbit/s':>7} {'setting':>24} | {'H':>4} {'util':>6} | {'step s':>6} {'allreduce s':>11} {'sent MB':>8} failed"
        )
        for r in report["utilization"]:
            if "error" in r:
                print(f"{r['mbit_s']:>7g} {r['setting']:>24} | error: {r['error']}")
                continue
            print(
                f"{r['mbit_s']:>7g} {r['setting']:>24} | {r['inner_steps']:>4} {r['utilization']:>6.1%} | "
                f"{r['inner_step_s']:>6.3f} {r['allreduce_s_median']:>11.2f} {r['bytes_sent_median'] / 1e6:>8.2f} "
                f"{r['failed_rounds']}"
            )


if __name__ == "__main__":
    sys.exit(main())
