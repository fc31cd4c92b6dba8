from __future__ import annotations

import pytest

from tests.integration.harness import LocalSwarm


@pytest.fixture
def local_swarm(tmp_path):
    """A LocalSwarm whose processes (and their hivemind children) are killed after the test, pass or fail."""
    swarm = LocalSwarm(tmp_path)
    try:
        yield swarm
    finally:
        swarm.kill_all()
