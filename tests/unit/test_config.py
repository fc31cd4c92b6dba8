from __future__ import annotations

import subprocess
import sys

import pytest

from peer.cli import config_from_args
from peer.config import (
    DataConfig,
    InnerConfig,
    OuterConfig,
    RunConfig,
    SwarmConfig,
    differing_settings,
    fingerprint,
    parse_shard,
)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: InnerConfig(steps=0), "--inner-steps"),
        (lambda: InnerConfig(lr=-1.0), "--inner-lr"),
        (lambda: OuterConfig(momentum=1.0), "--outer-momentum"),
        (lambda: OuterConfig(compression="zip"), "--compression"),
        (lambda: DataConfig(batch_size=0), "--batch-size"),
        (lambda: DataConfig(data_shard="3/2"), "--data-shard"),
        (lambda: DataConfig(data_shard="a/b"), "--data-shard"),
        (lambda: SwarmConfig(run_id="has.dot"), "--run-id"),
        (lambda: SwarmConfig(client_mode=True), "--client-mode"),
        (lambda: RunConfig(device="tpu"), "--device"),
        (lambda: RunConfig(resume=True), "--resume"),
    ],
)
def test_bad_settings_raise_a_clear_value_error(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_defaults_are_the_papers():
    config = RunConfig()
    assert (config.inner.lr, config.inner.weight_decay, config.inner.warmup_steps, config.inner.steps) == (
        4e-4,
        0.1,
        1000,
        500,
    )
    assert (config.outer.lr, config.outer.momentum) == (0.7, 0.9)


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('inner_steps = 20\nouter-lr = 0.5\nrun_id = "from-file"\n')
    config, _ = config_from_args(["--config", str(path), "--inner-steps", "30"])
    assert config.inner.steps == 30
    assert config.outer.lr == 0.5
    assert config.swarm.run_id == "from-file"


def test_unknown_key_in_config_file_is_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("inner_stepz = 20\n")
    with pytest.raises(ValueError, match="inner_stepz"):
        config_from_args(["--config", str(path)])


def test_fingerprint_changes_with_settings_that_must_match():
    base = {"run_id": "r", "inner_steps": 500, "compression": "none"}
    other = dict(base, inner_steps=100)
    assert fingerprint(base) != fingerprint(other)
    assert differing_settings(base, other) == ["inner_steps (ours 500, theirs 100)"]


@pytest.mark.parametrize(
    "argv", [["--inner-steps", "0"], ["--config", "/nonexistent.toml"], ["--outer-lr", "x"]]
)
def test_cli_rejects_bad_input_with_one_line_and_nonzero_exit(argv):
    result = subprocess.run([sys.executable, "-m", "peer", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(("error:", "usage:", "python -m peer: error"))


def test_outer_momentum_default_depends_on_the_preset_and_yields_to_flags_and_files(tmp_path):
    assert config_from_args([])[0].outer.momentum == 0.5  # tiny: the sweep's best (docs/RESULTS.md)
    assert config_from_args(["--model", "60m"])[0].outer.momentum == 0.9  # the paper's, for its sizes
    assert config_from_args(["--outer-momentum", "0.9"])[0].outer.momentum == 0.9
    path = tmp_path / "run.toml"
    path.write_text("outer_momentum = 0.8\n")
    assert config_from_args(["--config", str(path)])[0].outer.momentum == 0.8
