"""Suite-wide test hooks: the `integration` marker, and no child process outlives the test that started it."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]  # tests/unit/test_suite_hooks.py runs these hooks in an inner session

INTEGRATION_DIR = Path(__file__).parent / "integration"
PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    # Orphans (a peer's hivemind children after the peer died) are re-parented to this process instead of
    # init, so the cleanup below still sees them as descendants of the test process.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration is marked `integration` (select with -m, skip with -m 'not ...')."""
    for item in items:
        if INTEGRATION_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> set[int]:
    """Every live or zombie process below `pid` (Linux /proc; empty elsewhere)."""
    if not Path("/proc/self/stat").exists():
        return set()
    children, found, todo = _children_by_parent(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone counts as done
    return stat[stat.rindex(")") + 2] in "ZX"


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


# Helpers a library starts once and keeps for the whole session (torch's shared-memory manager, started by the
# first tensor shared through the file system); killing them breaks later tests of the same session.
SESSION_HELPER_PROGRAMS = {"torch_shm_manager"}


def _session_helpers(pids: set[int]) -> set[int]:
    """Those of `pids` that are long-lived helpers of the session, not processes a test started for itself:
    multiprocessing's resource tracker and fork server, and SESSION_HELPER_PROGRAMS."""
    helpers = set()
    with contextlib.suppress(Exception):
        from multiprocessing import resource_tracker

        helpers.add(resource_tracker._resource_tracker._pid)
    with contextlib.suppress(Exception):
        from multiprocessing import forkserver

        helpers.add(forkserver._forkserver._forkserver_pid)
    for pid in pids:
        if Path(_command(pid).split(" ", 1)[0]).name in SESSION_HELPER_PROGRAMS:
            helpers.add(pid)
    return helpers & pids


def _reap_(pids: set[int]) -> None:
    """Collect the exit status of those of `pids` that are our exited children (re-parented orphans, or
    processes the test never waited for), so they do not linger as zombies."""
    for pid in set(_children_by_parent().get(os.getpid(), [])) & pids:
        if _is_zombie(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


# A process the test already stopped may still be exiting when the test returns (its memory released, not yet a
# zombie): it gets this long to finish before it counts as left over.
EXITING_GRACE_S = 1.0


def _wait_until_exited(pids: list[int], timeout_s: float) -> list[int]:
    """Those of `pids` still running after at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    running = [pid for pid in pids if not _is_zombie(pid)]
    while running and time.monotonic() < deadline:
        time.sleep(0.02)
        running = [pid for pid in running if not _is_zombie(pid)]
    return running


def kill_new_descendants(before: set[int], *, grace_s: float = EXITING_GRACE_S) -> list[str]:
    """SIGKILL every descendant of this process that is not in `before` (nor a session helper) and is still
    running after `grace_s`; wait until they are gone and reap them. Returns 'pid command' for each one killed."""
    new = descendants(os.getpid()) - before
    leftovers = new - _session_helpers(new)
    running = sorted(_wait_until_exited(sorted(leftovers), grace_s))
    killed = [f"{pid} {_command(pid)[:120]}" for pid in running]
    for pid in running:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    _wait_until_exited(running, 10)
    _reap_(leftovers)
    return killed


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Kill every process the test started, directly or not, that is still running after it.

    Only descendants of this pytest process that did not exist before the test are touched, so module-scoped
    fixtures' processes, the session's helpers (_session_helpers), pytest itself and unrelated processes are
    left alone. A leftover is reported as a warning: a test should clean up after itself, this is the safety net."""
    before = descendants(os.getpid())
    yield
    killed = kill_new_descendants(before)
    if killed:
        warnings.warn("killed processes left over by the test: " + "; ".join(killed), stacklevel=1)
