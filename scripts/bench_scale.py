"""Scale benchmark (as root): k real peers (`python -m peer`, tiny model, short inner phases, one thread each), each
in its own network namespace behind a 100 Mbit/s tbf link (up and down), for k = 2, 4, 8, 16.

    sudo python scripts/bench_scale.py                          # k = 2, 4, 8, 16
    sudo python scripts/bench_scale.py --peers 2,4 --rounds 6 --json

Per k, k - 1 peers start together; once they finished --join-after-rounds rounds a newcomer starts; once the
newcomer has logged --rounds rounds, every peer gets SIGTERM (and leaves within seconds). Reported:
- all-reduce time against the bandwidth bound 2(k-1)/k x P x 4 / R, two ways (medians over full rounds): from the
  last member's pseudo-gradient being ready to the last member's transfer end (what the all-reduce adds to a
  round), and the slowest peer's transfer_s (it starts when its group forms, so it includes waiting for the last
  member's compute; this is what earlier tables reported);
- CPU time of each peer's averager process during the all-reduce, and the group's total divided by this
  machine's cores: the "CPU floor", below which the all-reduce cannot finish here whatever the links;
- bytes each peer sent per round against the bound 2(k-1)/k x P x 4 (none compression);
- how often every peer of a round was in its group (rounds where all k peers trained);
- DHT traffic per peer: link bytes while every peer was in its inner phase (no all-reduce, no state transfer:
  progress records, hash records, DHT maintenance), as a rate and per round of median length;
- memory per peer: the largest proportional set size (PSS) of the peer's process tree (main, DHT, averager, p2pd);
- time from the newcomer's start to the end of its first round whose all-reduce included it;
- failed peer-rounds: rounds any peer logged as failed (no group, or a failed all-reduce; no fault is injected).
Namespaces are set up and removed as in bench_wan.py (named after this process id; swept if a run was killed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_wan, bench_allreduce
import bench_wan as wan  # noqa: E402

SAMPLE_PERIOD_S = 1.0
UNTIL_STOPPED = 10**6  # --max-rounds of every peer: the benchmark stops them itself
LEAVE_TIMEOUT_S = 30.0
CORES = os.cpu_count() or 1


def link_counters(net: wan.Network) -> dict[int, tuple[int, int]]:
    """{peer index: (bytes the peer uploaded, bytes it downloaded)}, read from the hub ends of the veth pairs."""
    out = wan.sh("ip", "-n", net.hub, "-s", "-j", "link", "show", check=False).stdout
    counters = {}
    with contextlib.suppress(json.JSONDecodeError):
        for link in json.loads(out):
            name = link.get("ifname", "")
            if name.startswith("hub") and name[3:].isdigit():
                stats = link["stats64"]
                # the hub side receives what the peer uploads and transmits what it downloads
                counters[int(name[3:])] = (stats["rx"]["bytes"], stats["tx"]["bytes"])
    return counters


def pss_bytes(root_pid: int) -> int:
    """Proportional set size of a process and its descendants (shared pages counted once across them)."""
    total = 0
    for pid in [root_pid, *wan.bar.descendants(root_pid)]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
    return total


def peer_command(
    args, k: int, index: int, run_dir: Path, address: str, rounds: int, wait_for: int
) -> list[str]:
    return [
        sys.executable, "-m", "peer",
        "--model", "tiny", "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
        "--inner-steps", str(args.inner_steps), "--max-rounds", str(rounds),
        "--num-threads", "1", "--eval-every", "0", "--wait-for-peers", str(wait_for),
        "--run-id", f"scale{os.getpid()}_{k}", "--matchmaking-s", str(args.matchmaking_s),
        "--log-level", args.peer_log_level, "--host-maddrs", f"/ip4/{address}/tcp/0",
        "--metrics-file", str(run_dir / f"peer{index}.jsonl"),
    ]  # fmt: skip


def read_records(path: Path) -> list[dict]:
    with contextlib.suppress(OSError):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return []


def run_k(args, k: int, workdir: Path) -> dict:
    """One swarm of k peers in namespaces; returns its raw measurements."""
    net = wan.Network(k)
    run_dir = workdir / f"k{k}"
    run_dir.mkdir()
    procs: dict[int, subprocess.Popen] = {}
    started_at: dict[int, float] = {}
    samples: list[tuple[float, dict[int, tuple[int, int]]]] = []
    peak_pss: dict[int, int] = {}
    budget_s = (
        240
        + k * 20
        + (args.rounds + args.join_after_rounds)
        * (args.inner_steps * args.step_budget_s * max(1, k / 2) + 120)
    )
    deadline = time.monotonic() + budget_s
    newcomer = k - 1

    def start(index: int, rounds: int, wait_for: int, initial_peers: list[str] | None) -> None:
        cmd = peer_command(args, k, index, run_dir, net.address(index), rounds, wait_for)
        if initial_peers is None:
            cmd += ["--maddrs-file", str(run_dir / "maddrs")]
        else:
            cmd += ["--initial-peers", *initial_peers]
        with (run_dir / f"peer{index}.log").open("wb") as log:
            procs[index] = subprocess.Popen(
                ["ip", "netns", "exec", net.peers[index], *cmd],
                cwd=wan.REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        started_at[index] = time.time()

    def tick() -> None:
        wan.check_stop()
        if time.monotonic() > deadline:
            raise RuntimeError(f"k={k}: not finished within {budget_s:.0f} s")
        for i, proc in procs.items():
            code = proc.poll()
            if code is not None:  # nobody leaves before the benchmark says so
                raise RuntimeError(
                    f"k={k}: peer {i} exited with {code}: {wan._tail(run_dir / f'peer{i}.log')}"
                )
            if code is None:
                peak_pss[i] = max(peak_pss.get(i, 0), pss_bytes(proc.pid))
        samples.append((time.time(), link_counters(net)))
        time.sleep(SAMPLE_PERIOD_S)

    try:
        net.up()
        net.shape(args.mbit)
        samples.append((time.time(), link_counters(net)))
        start(0, UNTIL_STOPPED, k - 1, None)
        while not (run_dir / "maddrs").exists():
            tick()
        initial_peers = (run_dir / "maddrs").read_text().split()
        for i in range(1, k - 1):
            start(i, UNTIL_STOPPED, k - 1, initial_peers)
        while len(read_records(run_dir / "peer0.jsonl")) < args.join_after_rounds:
            tick()  # (with k = 2 the first peer trains these rounds alone)
        start(newcomer, UNTIL_STOPPED, 1, initial_peers)
        while len(read_records(run_dir / f"peer{newcomer}.jsonl")) < args.rounds:
            tick()
        for proc in procs.values():  # leave the swarm as a user would (Ctrl+C / SIGTERM)
            proc.send_signal(signal.SIGTERM)
        leave_deadline = time.monotonic() + LEAVE_TIMEOUT_S
        while any(proc.poll() is None for proc in procs.values()) and time.monotonic() < leave_deadline:
            time.sleep(0.2)
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        net.down()
    records = {i: read_records(run_dir / f"peer{i}.jsonl") for i in range(k)}
    return {"k": k, "records": records, "samples": samples, "peak_pss": peak_pss, "started_at": started_at}


def bytes_between(samples, index: int, t0: float, t1: float) -> float:
    """Bytes (up + down) of one peer's link between two times, interpolated from the samples."""

    def at(t: float) -> float:
        points = [(ts, sum(c[index])) for ts, c in samples if index in c]
        if not points:
            return 0.0
        if t <= points[0][0]:
            return points[0][1]
        for (ta, va), (tb, vb) in zip(points, points[1:], strict=False):
            if ta <= t <= tb:
                return va + (vb - va) * (t - ta) / max(tb - ta, 1e-9)
        return points[-1][1]

    return at(t1) - at(t0)


def allreduce_after_ready_s(peers, k: int) -> float | None:
    """What the all-reduce added to one round: from the last member's pseudo-gradient being ready to the last
    member's transfer end (None unless all k peers averaged in one group). The slowest peer's transfer_s counts
    from its own start instead, and a peer that finished its inner steps early starts as soon as its group forms,
    so that includes waiting for the last peer's compute."""
    stages = [p.get("stage_at") or {} for p in peers if p["group_size"] == k]
    if len(stages) != k or not all("transfer_ended" in s and "pseudo_grad_ready" in s for s in stages):
        return None
    return max(s["transfer_ended"] for s in stages) - max(s["pseudo_grad_ready"] for s in stages)


def summarize(args, raw: dict, num_values: int) -> dict:
    k, records = raw["k"], raw["records"]
    newcomer = k - 1
    rate_bytes_s = args.mbit * 1e6 / 8
    bound_bytes = 2 * (k - 1) / k * num_values * 4
    by_round: dict[int, dict[int, dict]] = {}
    for i, recs in records.items():
        for r in recs:
            by_round.setdefault(r["round"], {})[i] = r
    full_rounds = [rnd for rnd, peers in sorted(by_round.items()) if len(peers) == k]
    all_in_group = [rnd for rnd in full_rounds if all(by_round[rnd][i]["group_size"] == k for i in range(k))]
    ok = [r for recs in records.values() for r in recs if not r["failed"] and r.get("transfer_s")]
    transfer_by_round = [
        max(p["transfer_s"] for p in by_round[rnd].values() if p.get("transfer_s"))
        for rnd in full_rounds
        if any(p.get("transfer_s") for p in by_round[rnd].values())
    ]
    after_ready_by_round = [
        s for rnd in full_rounds if (s := allreduce_after_ready_s(by_round[rnd].values(), k)) is not None
    ]
    sent = [r["bytes_sent"] for r in ok if r["group_size"] == k]
    # the averagers' CPU time during one all-reduce: per peer, and summed over the group and spread over this
    # machine's cores, the wall time the all-reduce cannot beat here however fast the links are
    cpu_by_round = [
        [p["transfer_cpu_s"] for p in by_round[rnd].values() if p.get("transfer_cpu_s")]
        for rnd in full_rounds
    ]
    cpu_by_round = [c for c in cpu_by_round if len(c) == k]
    # DHT traffic: link bytes while every peer of a full round was in its inner phase
    dht_bytes, dht_seconds = 0.0, 0.0
    for rnd in full_rounds:
        peers = by_round[rnd].values()
        t0 = max(p["inner_started_at"] for p in peers) + 1.0  # after the previous all-reduce's last bytes
        t1 = min(p["inner_started_at"] + p["inner_s"] for p in peers) - 1.0  # before matchmaking traffic
        if t1 - t0 >= 2.0:
            dht_bytes += sum(bytes_between(raw["samples"], i, t0, t1) for i in range(k)) / k
            dht_seconds += t1 - t0
    round_s = [
        b["time"] - a["time"]
        for recs in records.values()
        for a, b in zip(recs, recs[1:], strict=False)
        if b["round"] == a["round"] + 1
    ]
    joined = next((r for r in records.get(newcomer, []) if not r["failed"] and r["group_size"] >= 2), None)
    dht_rate = dht_bytes / dht_seconds if dht_seconds else None
    return {
        "peers": k,
        "mbit_s": args.mbit,
        "values": num_values,
        "rounds_all_peers": len(full_rounds),
        "rounds_all_in_one_group": len(all_in_group),
        "failed_peer_rounds": sum(r["failed"] for recs in records.values() for r in recs),
        "allreduce_s_median": statistics.median(transfer_by_round) if transfer_by_round else None,
        "allreduce_after_ready_s_median": statistics.median(after_ready_by_round)
        if after_ready_by_round
        else None,
        "allreduce_s_max": max(transfer_by_round) if transfer_by_round else None,
        "bound_s": bound_bytes / rate_bytes_s,
        "cpu_s_per_peer_median": statistics.median(statistics.median(c) for c in cpu_by_round)
        if cpu_by_round
        else None,
        "cpu_floor_s_median": statistics.median(sum(c) / CORES for c in cpu_by_round)
        if cpu_by_round
        else None,
        "bytes_sent_median": statistics.median(sent) if sent else None,
        "bytes_bound": bound_bytes,
        "dht_bytes_per_s_per_peer": dht_rate,
        "dht_bytes_per_round_per_peer": dht_rate * statistics.median(round_s)
        if dht_rate and round_s
        else None,
        "round_s_median": statistics.median(round_s) if round_s else None,
        "pss_bytes_max": max(raw["peak_pss"].values()) if raw["peak_pss"] else None,
        "pss_bytes_median": statistics.median(raw["peak_pss"].values()) if raw["peak_pss"] else None,
        "newcomer_s_to_first_round": joined["time"] - raw["started_at"][newcomer] if joined else None,
        "newcomer_first_round": joined["round"] if joined else None,
        "agreed_rounds": sum(
            len({p["global_params_sha256"] for p in by_round[rnd].values()}) == 1 for rnd in full_rounds
        ),
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"{'k':>3} | {'from ready s':>12} {'bound s':>7} {'ratio':>5} | {'transfer_s':>10} | "
        f"{'CPU s/peer':>10} {'CPU floor s':>11} | "
        f"{'sent MB':>7} {'bound MB':>8} {'ratio':>5} | "
        f"{'one group':>9} | {'DHT KB/s':>8} {'KB/round':>8} | {'PSS MB':>6} | {'join s':>6} | failed | agreed"
    )
    for r in rows:

        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"

        after_ready = r["allreduce_after_ready_s_median"]
        ratio_t = after_ready / r["bound_s"] if after_ready else None
        ratio_b = r["bytes_sent_median"] / r["bytes_bound"] if r["bytes_sent_median"] else None
        print(
            f"{r['peers']:>3} | {fmt(after_ready, '12.2f')} {r['bound_s']:>7.2f} {fmt(ratio_t, '5.2f')} | "
            f"{fmt(r['allreduce_s_median'], '10.2f')} | "
            f"{fmt(r['cpu_s_per_peer_median'], '10.2f')} {fmt(r['cpu_floor_s_median'], '11.2f')} | "
            f"{fmt(r['bytes_sent_median'] and r['bytes_sent_median'] / 1e6, '7.2f')} {r['bytes_bound'] / 1e6:>8.2f} "
            f"{fmt(ratio_b, '5.3f')} | {r['rounds_all_in_one_group']:>4}/{r['rounds_all_peers']:<4} | "
            f"{fmt(r['dht_bytes_per_s_per_peer'] and r['dht_bytes_per_s_per_peer'] / 1e3, '8.2f')} "
            f"{fmt(r['dht_bytes_per_round_per_peer'] and r['dht_bytes_per_round_per_peer'] / 1e3, '8.1f')} | "
            f"{fmt(r['pss_bytes_max'] and r['pss_bytes_max'] / 2**20, '6.0f')} | "
            f"{fmt(r['newcomer_s_to_first_round'], '6.1f')} | {r['failed_peer_rounds']:>6} | "
            f"{r['agreed_rounds']}/{r['rounds_all_peers']}"
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default="2,4,8,16", help="comma-separated k (default 2,4,8,16)")
    p.add_argument("--mbit", type=float, default=100.0, help="link rate in Mbit/s, up and down (default 100)")
    p.add_argument(
        "--rounds", type=int, default=6, help="rounds the newcomer trains before all stop (default 6)"
    )
    p.add_argument(
        "--join-after-rounds", type=int, default=2, help="rounds before the newcomer starts (default 2)"
    )
    p.add_argument("--inner-steps", type=int, default=20, help="H (default 20)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per inner step (default 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--matchmaking-s", type=float, default=5.0, help="peers' --matchmaking-s (default 5)")
    p.add_argument("--step-budget-s", type=float, default=2.0, help="time bound per inner step, for timeouts")
    p.add_argument(
        "--peer-log-level",
        default="WARNING",
        help="the peers' --log-level; their logs stay in the run directory",
    )
    p.add_argument("--json", action="store_true", help="print the rows (and raw per-round records) as JSON")
    args = p.parse_args(argv)
    try:
        args.peers = [int(x) for x in args.peers.split(",")]
    except ValueError:
        p.error(f"--peers must be comma-separated integers, got {args.peers!r}")
    if any(not 2 <= k <= 200 for k in args.peers) or args.mbit <= 0:
        p.error("every k must be 2..200 and --mbit positive")
    if args.rounds < 3 or args.join_after_rounds < 1:
        p.error("--rounds must be at least 3 and --join-after-rounds at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = wan.check_namespaces_work()
    if problem:
        print(f"bench_scale: error: {problem}", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, wan._raise_exit)  # unwind through the finally blocks, which remove the namespaces
    wan.sweep_stale_namespaces()
    num_values = wan.tiny_num_params()
    workdir = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    rows, raws = [], []
    try:
        for k in args.peers:
            print(f"k={k} ...", file=sys.stderr)
            raw = run_k(args, k, workdir)
            raws.append(raw)
            rows.append(summarize(args, raw, num_values))
            if not args.json:
                print_table(rows[-1:])
    except SystemExit:
        print("interrupted: cleaning up", file=sys.stderr)
        raise
    except (RuntimeError, subprocess.SubprocessError) as e:
        print(f"bench_scale: error: {e} (logs in {workdir})", file=sys.stderr)
        return 1
    finally:
        wan.bar.kill_descendants()
    if args.json:
        print(json.dumps({"rows": rows, "records": [r["records"] for r in raws]}, indent=1))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
