"""Start bootstrap nodes and peers as real processes on 127.0.0.1, read their metrics, and clean up."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# Small and fast: a 1.5M-parameter model, 5 inner steps per round, short sequences, one thread per peer. The
# learning-rate schedule is part of the run fingerprint: --total-steps keeps it the same for every peer of a test's
# run however many rounds each one trains (without it, --max-rounds would set it).
FAST_PEER_ARGS = [
    "--model",
    "tiny",
    "--total-steps",
    "20",
    "--inner-steps",
    "5",
    "--batch-size",
    "4",
    "--seq-len",
    "64",
    "--warmup-steps",
    "5",
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
    "--progress-period-s",
    "1",
]


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def wait_for(condition, *, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll until condition() is truthy; fail the test with `what` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


class Proc:
    """One child process (its own session, so killing it takes its hivemind children too)."""

    def __init__(self, name: str, args: list[str], workdir: Path, *, prefix: tuple[str, ...] = ()):
        self.name, self.workdir = name, workdir
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, *args],  # prefix: e.g. `ip netns exec NS` to run in a network namespace
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env(),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        self._log.close()

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout=timeout_s)


class Peer(Proc):
    def __init__(
        self, name: str, args: list[str], workdir: Path, *, module: str = "peer", prefix: tuple[str, ...] = ()
    ):
        self.metrics_path = workdir / f"{name}.jsonl"
        self.maddrs_path = workdir / f"{name}.maddrs"
        super().__init__(
            name,
            [
                "-m",
                module,
                *args,
                "--metrics-file",
                str(self.metrics_path),
                "--maddrs-file",
                str(self.maddrs_path),
            ],
            workdir,
            prefix=prefix,
        )

    def records(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def maddrs(self) -> list[str]:
        return self.maddrs_path.read_text().split() if self.maddrs_path.exists() else []


class LocalSwarm:
    """A bootstrap node and peers on 127.0.0.1 inside one test's temporary directory."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.bootstrap: Proc | None = None
        self.bootstrap_maddrs: list[str] = []

    def start_bootstrap(
        self, timeout_s: float = 60, *, host: str = "127.0.0.1", prefix: tuple[str, ...] = (), extra=()
    ) -> list[str]:
        maddrs_file = self.workdir / "bootstrap.maddrs"
        self.bootstrap = Proc(
            "bootstrap",
            [
                "-m",
                "dht_bootstrap",
                "--host-maddrs",
                f"/ip4/{host}/tcp/0",
                "--maddrs-file",
                str(maddrs_file),
                *extra,
            ],
            self.workdir,
            prefix=prefix,
        )
        self.procs.append(self.bootstrap)
        wait_for(
            lambda: maddrs_file.exists() and maddrs_file.read_text().split(),
            timeout_s=timeout_s,
            what="the bootstrap node's multiaddrs",
        )
        self.bootstrap_maddrs = maddrs_file.read_text().split()
        return self.bootstrap_maddrs

    def start_peer(
        self,
        name: str,
        *extra: str,
        initial_peers: list[str] | None = None,
        module: str = "peer",
        prefix: tuple[str, ...] = (),
        fast: bool = True,
    ) -> Peer:
        """A peer process; `module` may name a test-only variant (tests.attacker) that takes the same flags, and
        `prefix` a command that runs it elsewhere (a network namespace). `fast=False` leaves out FAST_PEER_ARGS:
        the peer gets only `extra` (and its initial peers, metrics and maddrs files)."""
        initial = self.bootstrap_maddrs if initial_peers is None else initial_peers
        base = FAST_PEER_ARGS if fast else []
        args = [*base, *(["--initial-peers", *initial] if initial else []), *extra]
        peer = Peer(name, args, self.workdir, module=module, prefix=prefix)
        self.procs.append(peer)
        return peer

    def wait_rounds(self, peers: list[Peer], rounds: int, timeout_s: float) -> None:
        def done() -> bool:
            for peer in peers:
                if not peer.alive() and len(peer.records()) < rounds:
                    raise AssertionError(f"{peer.name} exited early:\n{peer.log()[-3000:]}")
            return all(len(peer.records()) >= rounds for peer in peers)

        try:
            wait_for(
                done,
                timeout_s=timeout_s,
                what=f"{rounds} rounds on {[p.name for p in peers]}",
                interval_s=0.5,
            )
        except AssertionError:
            self.dump_stacks()
            raise

    def dump_stacks(self) -> None:
        """On a timeout, write where every live process is stuck next to its log (needs py-spy)."""
        if shutil.which("py-spy") is None:
            return
        for proc in self.procs:
            if proc.alive():
                dump = subprocess.run(
                    ["py-spy", "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=30
                )
                (self.workdir / f"{proc.name}.stacks").write_text(dump.stdout + dump.stderr)

    def kill_all(self) -> None:
        for proc in self.procs:
            proc.kill_group()


def hashes_by_round(peers: list[Peer]) -> dict[int, dict[str, str]]:
    """{round: {peer name: global_params_sha256}}"""
    table: dict[int, dict[str, str]] = {}
    for peer in peers:
        for record in peer.records():
            table.setdefault(record["round"], {})[peer.name] = record["global_params_sha256"]
    return table


# ---- forked peers around a root DHT, none of hivemind in the test process ---------------------------------------
def _serve_root_dht(maddrs_sender, stop) -> None:
    import hivemind

    dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    maddrs_sender.send([str(m) for m in dht.get_visible_maddrs()])
    stop.wait(timeout=900)
    dht.shutdown()


@contextlib.contextmanager
def forked_peers(target, num_peers: int, *, start_timeout_s: float = 60.0):
    """Fork a root DHT and `num_peers` processes running target(index, initial_peers, barrier, results); yields
    (results queue, peer processes); afterwards kills every process they left behind (p2pd included). A target
    that raises reports it in `results` (see peer_reports).

    Nothing of hivemind runs in the test process itself: a DHT created and shut down there leaves process-wide
    pipes that the next module's forked peers inherit half-closed ("Broken pipe" in their all-reduce)."""
    from tests.conftest import descendants, kill_new_descendants

    before = descendants(os.getpid())
    ctx = mp.get_context("fork")  # hivemind objects must not be created in spawned processes
    results, barrier, stop = ctx.Queue(), ctx.Barrier(num_peers), ctx.Event()
    maddrs_receiver, maddrs_sender = ctx.Pipe(duplex=False)
    root = ctx.Process(target=_serve_root_dht, args=(maddrs_sender, stop))
    procs: list = []
    try:
        root.start()
        if not maddrs_receiver.poll(start_timeout_s):
            raise RuntimeError(f"the root DHT did not start within {start_timeout_s:.0f} s")
        initial_peers = maddrs_receiver.recv()
        procs = [
            ctx.Process(target=_report_errors, args=(target, i, initial_peers, barrier, results))
            for i in range(num_peers)
        ]
        for proc in procs:
            proc.start()
        yield results, procs
    finally:
        stop.set()
        kill_new_descendants(before, grace_s=0.0)
        for proc in [*procs, root]:
            proc.join(timeout=5)


def _report_errors(target, peer_index: int, initial_peers, barrier, results) -> None:
    """Run one forked peer; an exception becomes the (peer index, "error", message) report that peer_reports
    raises as ForkedPeerFailed, instead of a silent exit the test would only notice at its timeout."""
    try:
        target(peer_index, initial_peers, barrier, results)
    except BaseException as e:
        results.put((peer_index, "error", repr(e)))
        raise


class ForkedPeerFailed(Exception):
    """A forked peer reported an error instead of its result."""


def peer_reports(results, count: int, *, timeout_s: float):
    """The first `count` items the forked peers put in `results`, each (peer index, ...); raises ForkedPeerFailed
    for one that reads (peer index, "error", message), AssertionError if they do not all arrive within timeout_s."""
    deadline = time.monotonic() + timeout_s
    for _ in range(count):
        try:
            item = results.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"peers did not report within {timeout_s:.0f} s") from None
        if item[1] == "error":
            raise ForkedPeerFailed(f"peer {item[0]} failed: {item[2]}")
        yield item
