"""The suite's own hooks (tests/conftest.py): leftover processes are killed, integration tests are marked."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import descendants, kill_new_descendants

CONFTEST = Path(__file__).parents[1] / "conftest.py"


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_new_children_and_orphans_are_killed_older_processes_are_not(tmp_path):
    older = subprocess.Popen(["sleep", "300"])
    try:
        before = descendants(os.getpid())
        child = subprocess.Popen(["sleep", "301"])
        # the shell exits at once, so its background sleep is an orphan: re-parented to this process (the suite
        # makes pytest a child subreaper), no longer a child of anything the test holds
        out = subprocess.run(
            ["sh", "-c", "sleep 302 >/dev/null 2>&1 & echo $!"], check=True, capture_output=True, text=True
        )
        orphan = int(out.stdout)
        assert _running(orphan) and orphan in descendants(os.getpid())
        exiting = subprocess.Popen(["sleep", "0.1"])  # ends by itself within the grace period: not reported

        killed = kill_new_descendants(before, grace_s=0.5)

        assert sorted(int(k.split()[0]) for k in killed) == sorted([child.pid, orphan])
        assert not _running(child.pid) and not _running(orphan) and exiting.poll() is not None
        assert _running(older.pid) and _running(os.getpid())
    finally:
        older.kill()
        older.wait()


def test_everything_under_integration_is_marked(pytester: pytest.Pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_plain="def test_unit(): pass")
    pytester.mkpydir("integration")
    (pytester.path / "integration" / "test_swarm.py").write_text("def test_net(): pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-m", "integration", "-v")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*integration/test_swarm.py::test_net PASSED*"])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_torchs_shared_memory_manager_survives_the_cleanup():
    """torch starts torch_shm_manager once, for the whole session: killing it would break later tests."""
    import torch
    import torch.multiprocessing

    strategy = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        before = descendants(os.getpid())
        torch.zeros(2).share_memory_()
        assert not [k for k in kill_new_descendants(before) if "torch_shm_manager" in k]
        torch.zeros(2).share_memory_()  # 'Broken pipe' if the manager was killed
    finally:
        torch.multiprocessing.set_sharing_strategy(strategy)
