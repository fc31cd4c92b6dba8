"""The example configs in scripts/configs are valid settings of `python -m peer`."""

from __future__ import annotations

from pathlib import Path

import pytest

from peer.cli import config_from_args

CONFIGS = sorted((Path(__file__).parents[2] / "scripts" / "configs").glob("*.toml"))


def test_there_are_configs_for_cpu_150m_and_1b():
    assert {p.stem for p in CONFIGS} >= {"cpu-tiny", "c4-150m", "fineweb-1.1b"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_config_parses(path: Path):
    config, _ = config_from_args(["--config", str(path)])
    assert config.swarm.run_id != "diloco"  # each example names its own run


def test_the_150m_config_is_the_papers_run():
    config, _ = config_from_args(["--config", str(next(p for p in CONFIGS if p.stem == "c4-150m"))])
    assert (config.model.name, config.data.batch_size, config.data.seq_len) == ("150m", 512, 1024)
    assert (config.inner.steps, config.inner.lr, config.inner.warmup_steps, config.total_inner_steps) == (
        500,
        4e-4,
        1000,
        88000,
    )
    assert (config.outer.lr, config.outer.momentum) == (0.7, 0.9)
