"""A rehearsal of a public run on emulated internet links (root only; network namespaces from scripts/netlab.py):
a bootstrap node serving the dashboard, peers on links of different bandwidths (tc tbf), one peer behind a home
router (iptables masquerade, reached through the bootstrap node's relay), a peer that joins late and one that is
SIGKILLed; then a summary per peer: rounds, agreement, failed rounds, bytes, utilization (time in inner steps / wall
time).

    sudo nice -n 10 python scripts/rehearsal.py                 # 4 peers + a late one, 8 rounds
    sudo python scripts/rehearsal.py --rounds 12 --json

Namespaces are removed on exit, Ctrl+C and SIGTERM (and by the next run if this one was SIGKILLed). No traffic
leaves them. At the end the model is exported from the live swarm (`python -m peer.export`) into the work directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netlab import Netlab, unavailable_reason  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PEERS = [  # name, link in Mbit/s (up and down), behind NAT
    ("fast", 200.0, False),
    ("medium", 50.0, False),
    ("slow", 20.0, False),
    ("home", 50.0, True),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rounds", type=int, default=8, help="rounds the surviving peers train (default %(default)s)"
    )
    p.add_argument("--inner-steps", type=int, default=10, help="H (default %(default)s)")
    p.add_argument(
        "--late-after", type=int, default=2, help="the late peer joins after this round (default 2)"
    )
    p.add_argument(
        "--kill-after", type=int, default=3, help="SIGKILL the 'medium' peer after this round (default 3)"
    )
    p.add_argument(
        "--timeout-s", type=float, default=1500.0, help="give up after this long (default %(default)s)"
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep logs and metrics here (default: a temp dir)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--screenshot", type=Path, default=None, help="save the dashboard as PNG at the end (chromium)"
    )
    return p.parse_args(argv)


class Rehearsal:
    def __init__(self, args: argparse.Namespace, lab: Netlab, workdir: Path):
        self.args, self.lab, self.workdir = args, lab, workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.run_id = f"rehearsal{os.getpid()}"

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        with (self.workdir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                self.lab.command(name, sys.executable, *argv),
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: killed with its hivemind children and p2pd
            )
        self.procs[name] = proc
        return proc

    def wait_for(self, condition, what: str, timeout_s: float = 120.0):
        deadline = time.monotonic() + min(timeout_s, self.deadline - time.monotonic())
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}")

    def records(self, name: str) -> list[dict]:
        path = self.workdir / f"{name}.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip().endswith("}")]

    def start_peer(self, name: str, maddrs: list[str], *, behind_nat: bool) -> None:
        host = "0.0.0.0" if behind_nat else self.lab.hosts[name].address
        self.start(
            name,
            [
                "-m", "peer", "--run-id", self.run_id, "--model", "tiny", "--inner-steps", str(self.args.inner_steps),
                "--batch-size", "4", "--seq-len", "128", "--warmup-steps", "10", "--inner-lr", "1e-3",
                "--num-threads", "1", "--eval-every", "2", "--eval-batches", "2", "--matchmaking-s", "3",
                "--progress-period-s", "1", "--host-maddrs", f"/ip4/{host}/tcp/0", "--initial-peers", *maddrs,
                "--metrics-file", str(self.workdir / f"{name}.jsonl"), "--wait-for-peers", "3",
            ],  # behind NAT without --client-mode: its reachability check finds it relayed through the bootstrap node
        )  # fmt: skip

    def run(self) -> dict:
        args, lab = self.args, self.lab
        self.deadline = time.monotonic() + args.timeout_s
        boot = lab.add_public("boot")
        for name, rate, behind_nat in [*PEERS, ("late", 100.0, False)]:
            (lab.add_behind_nat if behind_nat else lab.add_public)(name)
            lab.shape(name, rate)
        maddrs_file = self.workdir / "boot.maddrs"
        self.start(
            "boot",
            ["-m", "dht_bootstrap", "--host-maddrs", f"/ip4/{boot.address}/tcp/0", "--maddrs-file", str(maddrs_file),
             "--dashboard-port", "8080", "--dashboard-host", boot.address, "--dashboard-run-id", self.run_id],
        )  # fmt: skip
        maddrs = self.wait_for(
            lambda: maddrs_file.exists() and maddrs_file.read_text().split(), "the bootstrap"
        )
        started = time.time()
        for name, _, behind_nat in PEERS:
            if behind_nat:  # checked by the public peers: they must be up and serving checks first
                self.wait_for(
                    lambda: len(self.reachability_lines()) >= len(PEERS) - 1, "the public peers", 300
                )
            self.start_peer(name, maddrs, behind_nat=behind_nat)
        self.wait_for(lambda: len(self.records("fast")) >= args.late_after, "the first rounds", 600)
        self.start_peer("late", maddrs, behind_nat=False)
        self.wait_for(
            lambda: len(self.records("medium")) >= args.kill_after, "the round before the kill", 600
        )
        os.killpg(self.procs["medium"].pid, signal.SIGKILL)
        survivors = ["fast", "slow", "home", "late"]
        self.wait_for(
            lambda: all(r and r[-1]["round"] >= args.rounds for r in map(self.records, survivors)),
            f"{args.rounds} rounds on the surviving peers",
            args.timeout_s,
        )
        dashboard = self.dashboard_status(boot.address)
        if self.args.screenshot is not None:
            self.screenshot(boot.address, self.args.screenshot)
        exported = self.export(maddrs)  # from the live swarm, while the survivors still train
        for name in survivors:
            self.procs[name].send_signal(signal.SIGTERM)
        for name in survivors:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.procs[name].wait(timeout=60)
        summary = summarize(
            {name: self.records(name) for name, *_ in [*PEERS, ("late",)]}, started, dashboard
        )
        summary["reachability"] = self.reachability_lines()
        summary["export"] = exported
        return summary

    def export(self, maddrs: list[str]) -> str:
        """`python -m peer.export` from the live swarm into the work directory; its last line (or the error)."""
        argv = ["-m", "peer.export", "--initial-peers", *maddrs, "--run-id", self.run_id, "--model", "tiny",
                "--out", str(self.workdir / "model")]  # fmt: skip
        try:
            done = subprocess.run(
                self.lab.command("boot", sys.executable, *argv),
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            return "export timed out after 300 s"
        lines = (done.stdout if done.returncode == 0 else done.stderr).strip().splitlines()
        return lines[-1] if lines else f"export exited with {done.returncode}"

    def reachability_lines(self) -> dict[str, str]:
        """name -> the reachability line each started peer logged."""
        lines = {}
        for name in self.procs:
            log = self.workdir / f"{name}.log"
            found = [
                line for line in log.read_text(errors="replace").splitlines() if "reachability: " in line
            ]
            if found:
                lines[name] = found[0].split("reachability: ", 1)[1].split(" (")[0]
        return lines

    def screenshot(self, address: str, path: Path) -> None:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            print("screenshot: skipped (no chromium)", file=sys.stderr)
            return
        argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1150",
                "--virtual-time-budget=6000", f"--screenshot={path.resolve()}", f"http://{address}:8080/"]  # fmt: skip
        subprocess.run(self.lab.command("boot", *argv), capture_output=True, timeout=120)

    def dashboard_status(self, address: str) -> dict | None:
        code = f"import urllib.request; print(urllib.request.urlopen('http://{address}:8080/api/status', timeout=10).read().decode())"
        out = subprocess.run(
            self.lab.command("boot", sys.executable, "-c", code), capture_output=True, text=True, timeout=60
        )
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(out.stdout)
        return None

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)


def summarize(records: dict[str, list[dict]], started: float, dashboard: dict | None) -> dict:
    hashes: dict[int, set[str]] = {}
    for rows in records.values():
        for r in rows:
            hashes.setdefault(r["round"], set()).add(r["global_params_sha256"])
    peers = {}
    for name, rows in records.items():
        if not rows:
            peers[name] = {"rounds": 0}
            continue
        wall_s = rows[-1]["time"] - rows[0]["inner_started_at"]
        peers[name] = {
            "rounds": len(rows),
            "first_round": rows[0]["round"],
            "last_round": rows[-1]["round"],
            "failed_rounds": rows[-1]["failed_rounds"],
            "resyncs": rows[-1]["resyncs"],
            "mb_sent": sum(r.get("bytes_sent", 0) for r in rows) / 1e6,
            "mb_received": sum(r.get("bytes_received", 0) for r in rows) / 1e6,
            "utilization": sum(r["inner_s"] for r in rows) / wall_s if wall_s > 0 else None,
            "group_sizes": [r["group_size"] for r in rows],
        }
    summary = {
        "wall_s": time.time() - started,
        "rounds": max(hashes, default=0),
        "rounds_all_agreed": sum(len(h) == 1 for h in hashes.values()),
        "disagreeing_rounds": sorted(r for r, h in hashes.items() if len(h) > 1),
        "peers": peers,
    }
    if dashboard is not None:
        summary["dashboard"] = {
            "live_peers": [p["peer_id"][-6:] + ":" + p["reachability"] for p in dashboard["peers"]],
            "rounds_shown": len(dashboard["rounds"]),
            "totals": dashboard["totals"],
        }
    return summary


def print_summary(summary: dict) -> None:
    print(f"rounds: {summary['rounds']}, all peers agreed in {summary['rounds_all_agreed']} "
          f"(disagreeing: {summary['disagreeing_rounds'] or 'none'}); wall time {summary['wall_s']:.0f} s")  # fmt: skip
    print(
        f"{'peer':>7} {'rounds':>6} {'first':>5} {'last':>4} {'failed':>6} {'resyncs':>7} {'MB sent':>8} {'MB recv':>8} {'util':>6}"
    )
    for name, p in summary["peers"].items():
        if not p["rounds"]:
            print(f"{name:>7} {0:>6}")
            continue
        util = f"{100 * p['utilization']:.1f}%" if p["utilization"] is not None else "-"
        print(f"{name:>7} {p['rounds']:>6} {p['first_round']:>5} {p['last_round']:>4} {p['failed_rounds']:>6} "
              f"{p['resyncs']:>7} {p['mb_sent']:>8.2f} {p['mb_received']:>8.2f} {util:>6}")  # fmt: skip
    print("reachability: " + ", ".join(f"{name} {kind}" for name, kind in summary["reachability"].items()))
    print(f"export: {summary['export']}")
    if "dashboard" in summary:
        d = summary["dashboard"]
        print(f"dashboard at the end: live {', '.join(d['live_peers'])}; {d['rounds_shown']} rounds shown; "
              f"{d['totals']['tokens']:,} tokens, {(d['totals']['bytes_sent']) / 1e6:.1f} MB sent in total")  # fmt: skip


def _raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = unavailable_reason()
    if problem:
        print(f"rehearsal: error: {problem}", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)  # unwind through the finally below, which removes the namespaces
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rehearsal_"))
    workdir.mkdir(parents=True, exist_ok=True)
    lab = Netlab("dlr")
    rehearsal = Rehearsal(args, lab, workdir)
    try:
        lab.up()
        summary = rehearsal.run()
    except RuntimeError as e:
        print(f"rehearsal: error: {e} (logs in {workdir})", file=sys.stderr)
        return 1
    finally:
        rehearsal.stop()
        lab.down()
    print(json.dumps(summary, indent=1) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_summary(summary)
    print(f"logs and metrics: {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
