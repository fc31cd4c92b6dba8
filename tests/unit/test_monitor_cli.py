"""Bad flags of the monitor and of the bootstrap node's dashboard end in one clear line, before any work."""

from __future__ import annotations

import pytest

from peer import monitor


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--initial-peers", "/ip4/127.0.0.1/tcp/1", "--port", "70000"], "--port must be in 0..65535"),
        (["--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "a b"], "--run-id must be non-empty"),
        (["--initial-peers", "/ip4/127.0.0.1/tcp/1", "--poll-s", "0"], "--poll-s and --stale-after-s"),
        (["--run-id", "x"], "--initial-peers"),
    ],
)
def test_monitor_rejects_bad_flags_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        monitor.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bootstrap_dashboard_flags_are_checked():
    from dht_bootstrap.node import BootstrapConfig

    with pytest.raises(ValueError, match="--dashboard-port must be in 0..65535"):
        BootstrapConfig(dashboard_port=-1)
    with pytest.raises(ValueError, match="--dashboard-run-id"):
        BootstrapConfig(dashboard_port=8080, dashboard_run_id="a.b")
    assert BootstrapConfig(dashboard_port=0).dashboard_host == "0.0.0.0"
