from __future__ import annotations

import subprocess
import sys

import pytest

from peer.cli import FLAGS, build_config, config_from_args, flag_tables_markdown
from peer.config import (
    ALLREDUCE_PART_LAYOUT,
    RECORD_SIGNATURES,
    DataConfig,
    InnerConfig,
    ModelConfig,
    OuterConfig,
    RunConfig,
    SwarmConfig,
    differing_settings,
    fingerprint,
    fingerprint_settings,
    parse_shard,
)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: InnerConfig(steps=0), "--inner-steps"),
        (lambda: InnerConfig(lr=-1.0), "--inner-lr"),
        (lambda: OuterConfig(momentum=1.0), "--outer-momentum"),
        (lambda: OuterConfig(compression="zip"), "--compression"),
        (lambda: OuterConfig(aggregation="median"), "--aggregation"),
        (lambda: DataConfig(batch_size=0), "--batch-size"),
        (lambda: DataConfig(data_shard="3/2"), "--data-shard"),
        (lambda: DataConfig(data_shard="a/b"), "--data-shard"),
        (lambda: SwarmConfig(run_id="has.dot"), "--run-id"),
        (lambda: SwarmConfig(client_mode=True), "--client-mode"),
        (lambda: SwarmConfig(direct_transport="maybe"), "--direct-transport"),
        (lambda: SwarmConfig(direct_port=70000), "--direct-port"),
        (lambda: RunConfig(device="tpu"), "--device"),
        (lambda: RunConfig(device="cuda:x"), "--device"),
        (lambda: RunConfig(log_level="chatty"), "--log-level"),
        (lambda: RunConfig(resume=True), "--resume"),
    ],
)
def test_bad_settings_raise_a_clear_value_error(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_defaults_are_the_papers():
    config = RunConfig(model=ModelConfig(name="60m"))
    assert (config.inner.lr, config.inner.weight_decay, config.inner.warmup_steps, config.inner.steps) == (
        4e-4,
        0.1,
        1000,
        500,
    )
    assert (config.outer.lr, config.outer.momentum) == (0.7, 0.9)


def test_the_dataclass_defaults_are_the_command_line_defaults():
    assert RunConfig() == config_from_args([])[0]
    assert RunConfig(model=ModelConfig(name="60m")) == config_from_args(["--model", "60m"])[0]
    assert RunConfig().outer.momentum == 0.5  # the tiny preset's, resolved in one place
    assert OuterConfig().momentum is None  # until a RunConfig knows the model
    assert RunConfig(outer=OuterConfig(momentum=0.0)).outer.momentum == 0.0  # given beats the preset's


# One value per flag, none of them the default: adding a setting means adding it here too.
SAMPLE_VALUES = {
    "model": "org/pretrained",
    "init_from": "org/pretrained",
    "dataset": "corpus.txt",
    "dataset_config": "en",
    "wandb_project": "swarm-runs",
    "split": "validation",
    "text_field": "content",
    "eval_split": "test",
    "tokenizer": "tok.json",
    "batch_size": 3,
    "micro_batch_size": 1,
    "seq_len": 9,
    "data_shard": "1/3",
    "eval_tokens": 100,
    "inner_steps": 7,
    "inner_lr": 0.001,
    "weight_decay": 0.2,
    "warmup_steps": 3,
    "total_steps": 99,
    "min_lr_ratio": 0.2,
    "grad_clip": 0.5,
    "inner_optimizer": "adamw8bit",
    "round_tokens": 1000,
    "outer_lr": 0.6,
    "outer_momentum": 0.3,
    "compression": "int8",
    "aggregation": "trimmed-mean",
    "overlap": True,
    "initial_peers": ["/ip4/1.2.3.4/tcp/5", "/ip4/1.2.3.4/tcp/6"],
    "host_maddrs": ["/ip4/127.0.0.1/tcp/0"],
    "announce_maddrs": ["/ip4/1.1.1.1/tcp/1"],
    "identity_path": "id.key",
    "maddrs_file": "maddrs.txt",
    "client_mode": True,
    "direct_transport": "off",
    "direct_port": 40123,
    "run_id": "sample",
    "matchmaking_s": 3.0,
    "straggler_wait_s": 4.0,
    "allreduce_timeout_s": 5.0,
    "chunk_timeout_s": 6.0,
    "state_timeout_s": 7.0,
    "progress_period_s": 1.5,
    "wait_for_peers": 2,
    "swarm_key": "@swarm.key",  # a file in the working directory (the test writes it)
    "seed": 4,
    "max_rounds": 6,
    "device": "cuda:1",
    "precision": "bf16",
    "num_threads": 2,
    "metrics_file": "metrics.jsonl",
    "eval_every": 2,
    "eval_batches": 3,
    "checkpoint_dir": "ckpt",
    "checkpoint_every": 4,
    "keep_checkpoints": 2,
    "resume": True,
    "log_level": "DEBUG",
    "test_fault": "hang",
}


def _toml(values: dict) -> str:
    import json

    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


def _argv(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        option = "--" + key.replace("_", "-")
        if value is True:
            argv.append(option)
        else:
            argv += [option, *map(str, value if isinstance(value, list) else [value])]
    return argv


def test_every_flag_works_on_the_command_line_and_in_the_file_alike(tmp_path, monkeypatch):
    assert set(SAMPLE_VALUES) == set(FLAGS)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "swarm.key").write_text("0123456789abcdef0123456789abcdef\n")
    path = tmp_path / "run.toml"
    path.write_text(_toml(SAMPLE_VALUES))
    from_file, log_level = config_from_args(["--config", str(path)])
    from_flags, _ = config_from_args(_argv(SAMPLE_VALUES))
    assert from_file == from_flags
    assert log_level == "DEBUG"
    defaults = RunConfig().to_dict()
    for key, flag in FLAGS.items():  # every value arrived, and none of them is the default
        section = from_file.to_dict() if flag.section is None else from_file.to_dict()[flag.section]
        default = defaults if flag.section is None else defaults[flag.section]
        expected = tuple(SAMPLE_VALUES[key]) if flag.kind is tuple else SAMPLE_VALUES[key]
        assert section[flag.field.name] == expected != default[flag.field.name], key


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("batch_size = 8.5", "batch_size must be an integer, got 8.5"),
        ("inner_lr = true", "inner_lr must be a number, got True"),
        ('seed = "7"', "seed must be an integer, got '7'"),
        ("run_id = 3", "run_id must be a string, got 3"),
        ("overlap = 1", "overlap must be true or false, got 1"),
        ("initial_peers = [1, 2]", "initial_peers must be a string or a list of strings"),
    ],
)
def test_config_file_values_are_type_checked_with_the_key_in_the_message(tmp_path, line, message):
    path = tmp_path / "run.toml"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        config_from_args(["--config", str(path)])
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_config_file_numbers_and_single_addresses_are_converted(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('outer_momentum = 0\ninner_lr = 1\ninitial_peers = "/ip4/1.2.3.4/tcp/5"\n')
    config, _ = config_from_args(["--config", str(path)])
    # an integer in the file is the same float as on the command line (the fingerprint hashes its JSON)
    assert (
        config
        == config_from_args(
            ["--outer-momentum", "0", "--inner-lr", "1", "--initial-peers", "/ip4/1.2.3.4/tcp/5"]
        )[0]
    )
    assert isinstance(config.outer.momentum, float) and config.swarm.initial_peers == ("/ip4/1.2.3.4/tcp/5",)


def test_the_model_defaults_to_the_init_from_model_and_may_not_contradict_it(tmp_path):
    assert RunConfig().model.name == "tiny"
    config = build_config({"init_from": str(tmp_path)})
    assert config.model.name == str(tmp_path) and config.outer.momentum == 0.9  # not a CPU preset
    assert build_config({"init_from": str(tmp_path), "model": f"{tmp_path}/."}).model.init_from == str(
        tmp_path
    )
    with pytest.raises(ValueError, match="--model 150m and --init-from .* differ"):
        build_config({"init_from": str(tmp_path), "model": "150m"})


def test_build_config_takes_flat_settings_named_like_the_flags():
    config = build_config({"inner_steps": 20, "model": "60m", "overlap": True})
    assert (config.inner.steps, config.model.name, config.outer.overlap) == (20, "60m", True)
    assert config.outer.momentum == 0.9


def test_readme_flag_tables_are_generated_from_the_settings():
    """python scripts/flag_tables.py rewrites them; a new or changed setting shows up in the README."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert flag_tables_markdown() in readme
    for flag in FLAGS.values():
        assert (f"`{flag.option}" in readme) != bool(flag.field.metadata.get("hidden")), flag.name


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


def test_fingerprint_names_the_int8_wire_format():
    """int8 was hivemind's bitsandbytes format before peer/codec.py: the fingerprint names the new format, so peers
    on the old one never average with peers on the new one; none and fp16 (same bytes as before) are unchanged."""
    settings = {
        compression: fingerprint_settings(
            config_from_args(["--compression", compression])[0], model_arch={"a": 1}, tokenizer_id="t"
        )
        for compression in ("none", "fp16", "int8")
    }
    assert settings["int8"]["compression_codec"] == "int8-absmax-1024"
    old_int8 = {key: value for key, value in settings["int8"].items() if key != "compression_codec"}
    assert fingerprint(settings["int8"]) != fingerprint(old_int8)
    assert differing_settings(settings["int8"], old_int8) == [
        "compression_codec (ours 'int8-absmax-1024', theirs None)"
    ]
    assert "compression_codec" not in settings["none"] and "compression_codec" not in settings["fp16"]


def test_fingerprint_names_the_allreduce_part_layout():
    """Peers that cut the all-reduce into parts differently (hivemind's fixed 512 KiB before the group-sized parts)
    would send reducers parts of shapes they do not expect: the layout is in the fingerprint, so they never meet."""
    settings = fingerprint_settings(config_from_args([])[0], model_arch={"a": 1}, tokenizer_id="t")
    assert settings["allreduce_parts"] == ALLREDUCE_PART_LAYOUT
    older = {key: value for key, value in settings.items() if key != "allreduce_parts"}
    assert fingerprint(settings) != fingerprint(older)
    assert differing_settings(settings, older) == [
        f"allreduce_parts (ours {ALLREDUCE_PART_LAYOUT!r}, theirs None)"
    ]


def test_fingerprint_names_how_records_are_signed():
    """Peers that sign their records with hivemind's RSA keys (earlier versions) and peers that sign with Ed25519
    cannot read each other's round records: the signature scheme is in the fingerprint, so they never meet."""
    settings = fingerprint_settings(config_from_args([])[0], model_arch={"a": 1}, tokenizer_id="t")
    assert settings["record_signatures"] == RECORD_SIGNATURES == "ed25519"
    older = {key: value for key, value in settings.items() if key != "record_signatures"}
    assert differing_settings(settings, older) == ["record_signatures (ours 'ed25519', theirs None)"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--inner-steps", "0"],
        ["--config", "/nonexistent.toml"],
        ["--outer-lr", "x"],
        ["--config", "BAD_TOML"],
    ],
)
def test_cli_rejects_bad_input_with_one_line_and_nonzero_exit(argv, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = 8.5\n")
    argv = [str(bad) if arg == "BAD_TOML" else arg for arg in argv]
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
