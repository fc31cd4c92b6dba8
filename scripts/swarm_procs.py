"""Child processes for the local scripts (demo, soak, benchmarks): each in its own session so it can be killed whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class Child:
    def __init__(self, name: str, argv: list[str], run_dir: Path, env: dict, *, append: bool = False):
        self.name = name
        self.log_path = run_dir / f"{name}.log"
        self._log = open(self.log_path, "ab" if append else "wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, wait for a clean exit, then make sure nothing of it is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the process and everything in its session (hivemind's helpers included)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)
        self._log.close()


def start_bootstrap(run_dir: Path, env: dict) -> Child:
    """A bootstrap node on 127.0.0.1 that writes its multiaddrs to run_dir/bootstrap.maddrs (wait_for_file)."""
    argv = [sys.executable, "-m", "dht_bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    return Child("bootstrap", [*argv, "--maddrs-file", str(run_dir / "bootstrap.maddrs")], run_dir, env)


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_file(path: Path, child: Child, timeout_s: float) -> list[str]:
    """Wait until a multiaddrs file has content; fail early if the child died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().split():
            return path.read_text().split()
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited early; see {child.log_path}")
        time.sleep(0.2)
    raise RuntimeError(f"{child.name} did not become ready within {timeout_s:.0f}s; see {child.log_path}")


def start_hogs(num_hogs: int) -> list[subprocess.Popen]:
    """`yes > /dev/null` processes that keep CPUs busy beside a swarm (stop_hogs ends them)."""
    return [
        subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, start_new_session=True) for _ in range(num_hogs)
    ]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for hog in hogs:
        hog.kill()
        hog.wait()
