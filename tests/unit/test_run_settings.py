"""Run settings against machine settings, what the fingerprint covers, and how a newcomer picks and adopts the
settings a run's peers publish (peer/run_settings.py): pure functions fed hand-made records."""

from __future__ import annotations

import json

import pytest

from peer import run_settings
from peer.cli import FLAGS, build_config, flag_values
from peer.config import (
    CONTENT_SETTINGS,
    MACHINE_SETTINGS,
    RUN_DEFAULTS,
    SHARED_SETTINGS,
    fingerprint,
    fingerprint_settings,
    schedule_horizon,
    shared_values,
)
from peer.preflight import PreflightError
from peer.records import SettingsRecord
from peer.run_settings import AmbiguousRun, adopt, choose_run, parse_run_values, published_runs, settle
from tests.unit.test_config import SAMPLE_VALUES

ARCH = {"model_type": "llama", "hidden_size": 128}
RUN = {"run_id": "r", "inner_steps": 5, "inner_lr": 1e-3, "warmup_steps": 5, "max_rounds": 4, "seq_len": 64}


def no_paths(spec: str) -> bool:
    return False


def settings_of(values: dict) -> dict:
    return fingerprint_settings(build_config(values), model_arch=ARCH, tokenizer_id="embedded")


def record(values: dict, *, run_json: str | None = None, settings: dict | None = None) -> SettingsRecord:
    """The settings record a peer started with `values` publishes (or a forged one)."""
    config = build_config(values)
    settings = settings_of(values) if settings is None else settings
    return SettingsRecord(
        peer_id=b"peer",
        fingerprint=fingerprint(settings),
        settings_json=json.dumps(settings, sort_keys=True),
        run_settings_json=run_settings.encode(run_settings.run_values(config))
        if run_json is None
        else run_json,
    )


# ---- the split --------------------------------------------------------------------------------------------------
def test_every_flag_is_a_run_setting_or_a_machine_setting_exactly_once():
    groups = [SHARED_SETTINGS, RUN_DEFAULTS, MACHINE_SETTINGS]
    assert set().union(*groups) == set(FLAGS), "classify a new flag in peer/config.py"
    assert sum(len(group) for group in groups) == len(FLAGS)
    assert CONTENT_SETTINGS <= SHARED_SETTINGS


def test_the_fingerprint_covers_every_shared_setting_and_nothing_of_the_machine():
    base = settings_of({})
    assert set(shared_values(build_config({}))) == SHARED_SETTINGS - CONTENT_SETTINGS
    for name in SHARED_SETTINGS - CONTENT_SETTINGS:  # model, init_from, tokenizer enter by content
        changed = {name: SAMPLE_VALUES[name]}
        if name == "total_steps":
            changed["warmup_steps"] = 3  # 99 steps, after the default warmup of 1000 would be constant
        assert fingerprint(settings_of(changed)) != fingerprint(base), name
    for name in MACHINE_SETTINGS | RUN_DEFAULTS - {"max_rounds"}:
        value = SAMPLE_VALUES[name] if name != "swarm_key" else "k" * 32  # the sample names a key file
        value = tuple(value) if isinstance(value, list) else value
        needs = {"inner_optimizer": {"device": "cuda"}, "resume": {"checkpoint_dir": "c"}}.get(name, {})
        needs |= {"client_mode": {"initial_peers": ("/ip4/1.2.3.4/tcp/5/p2p/QmX",)}}.get(name, {})
        assert fingerprint(settings_of({name: value, **needs})) == fingerprint(base), name


def test_the_schedule_is_in_the_fingerprint_however_it_was_given():
    """A peer that forgets --max-rounds (the schedule's horizon when --total-steps is 0) no longer trains on
    another schedule unnoticed; two ways of giving the same schedule agree."""
    by_rounds = {"inner_steps": 10, "warmup_steps": 5, "max_rounds": 20}
    assert fingerprint(settings_of(by_rounds)) != fingerprint(settings_of({**by_rounds, "max_rounds": 0}))
    assert fingerprint(settings_of(by_rounds)) == fingerprint(settings_of({**by_rounds, "total_steps": 200}))
    # with --total-steps the rounds a peer trains are its own business
    fixed = {**by_rounds, "total_steps": 200}
    assert fingerprint(settings_of(fixed)) == fingerprint(settings_of({**fixed, "max_rounds": 3}))
    # a horizon within the warmup is a constant learning rate, however it is written
    assert schedule_horizon(build_config({"warmup_steps": 50, "total_steps": 40})) == 0
    assert schedule_horizon(build_config({"warmup_steps": 50, "max_rounds": 2, "inner_steps": 20})) == 0
    assert schedule_horizon(build_config({"warmup_steps": 50, "total_steps": 51})) == 51


# ---- what peers publish, read as input from strangers -------------------------------------------------------------
def test_published_run_settings_round_trip_and_bad_ones_are_refused():
    values = run_settings.run_values(build_config(RUN))
    assert values["total_steps"] == 20 and set(values) == SHARED_SETTINGS | RUN_DEFAULTS
    text = run_settings.encode(values)
    assert parse_run_values(text) == values
    bad = [
        {**values, "device": "cpu"},  # a machine setting
        {k: v for k, v in values.items() if k != "seed"},
        {**values, "inner_steps": "5"},
        {**values, "inner_steps": True},
        {**values, "inner_steps": 0},  # not a valid config
        {**values, "inner_lr": None},
        {**values, "dataset": "x" * 2000},
        {**values, "compression": "zip"},
    ]
    for forged in bad:
        assert parse_run_values(json.dumps(forged)) is None, forged
    assert parse_run_values(text.replace("0.001", "NaN")) is None
    for junk in ("", "[]", "{", "null", "x" * 20000):
        assert parse_run_values(junk) is None
    assert run_settings.encode({**values, "dataset": "/" + "x" * 2000}) == ""  # too long to publish: nothing


def test_versions_are_counted_by_distinct_publishers_and_forgeries_do_not_count():
    honest, other = record(RUN), record({**RUN, "inner_lr": 0.5})
    forged_hash = record(
        RUN, settings={**settings_of(RUN), "seed": 9}
    )  # settings do not hash to the fingerprint
    forged_hash = SettingsRecord(**{**forged_hash.dict(), "fingerprint": honest.fingerprint})
    # the honest fingerprint with run settings that contradict it (another learning rate)
    lying = record(RUN, run_json=record({**RUN, "inner_lr": 0.5}).run_settings_json)
    no_run = record(RUN, run_json="")  # an exporter: publishes no run settings
    records = {b"a": honest, b"b": honest, b"c": other, b"d": forged_hash, b"e": lying, b"f": no_run}
    runs = published_runs(records)
    assert [(r.values["inner_lr"], r.publishers) for r in runs] == [(1e-3, 2), (0.5, 1)]
    assert runs[0].fingerprint == honest.fingerprint and runs[0].settings == settings_of(RUN)


def test_one_stranger_cannot_capture_newcomers():
    runs = published_runs(
        {b"a": record(RUN), b"b": record(RUN), b"x": record({**RUN, "dataset": "evil/data"})}
    )
    assert choose_run(runs, {}, is_local_path=no_paths).values["dataset"] == "embedded"
    assert choose_run([], {}, is_local_path=no_paths) is None


def test_a_tie_is_settled_by_the_given_settings_or_refused():
    runs = published_runs({b"a": record(RUN), b"x": record({**RUN, "dataset": "evil/data"})})
    with pytest.raises(AmbiguousRun, match="2 different versions"):
        choose_run(runs, {"run_id": "r"}, is_local_path=no_paths)
    # the organizer's config file names the dataset: only one version matches what was given
    chosen = choose_run(runs, {"run_id": "r", "dataset": "embedded"}, is_local_path=no_paths)
    assert chosen.values["dataset"] == "embedded"
    with pytest.raises(PreflightError, match="cannot tell which is the run's"):
        settle({"run_id": "r"}, {b"a": record(RUN), b"x": record({**RUN, "seed": 3})}, **PATHS)


# ---- adopting them ------------------------------------------------------------------------------------------------
def test_a_newcomer_given_nothing_trains_with_the_runs_settings():
    organizer = build_config({**RUN, "batch_size": 4, "outer_momentum": 0.3, "compression": "fp16"})
    run = run_settings.run_values(organizer)
    adoption = adopt({"run_id": "r", "device": "cpu"}, run, is_local_path=no_paths)
    assert not adoption.conflicts and not adoption.own
    newcomer = build_config(adoption.values)
    assert shared_values(newcomer) == shared_values(organizer)  # the same fingerprint, given the same files
    assert (newcomer.max_rounds, newcomer.device) == (4, "cpu")


def test_a_contradicting_shared_setting_is_named_with_both_values():
    run = run_settings.run_values(build_config(RUN))
    adoption = adopt({"run_id": "r", "inner_lr": 0.01, "inner_steps": 5}, run, is_local_path=no_paths)
    assert adoption.conflicts == ["--inner-lr 0.01 contradicts the run's 0.001"]
    assert adopt({"model": "small"}, run, is_local_path=no_paths).conflicts == [
        "--model small contradicts the run's tiny"
    ]
    # a local path is this machine's copy: the fingerprint will compare what it holds
    copy = adopt({"tokenizer": "/mine/tok.json"}, run, is_local_path=lambda s: s.startswith("/"))
    assert not copy.conflicts and copy.own == {"tokenizer": ("/mine/tok.json", "embedded")}


def test_a_volunteer_may_read_its_own_copy_of_the_data_and_stay_fewer_rounds():
    run = run_settings.run_values(build_config({**RUN, "dataset": "/org/data.parquet", "text_field": "body"}))
    adoption = adopt({"dataset": "/mnt/copy.parquet", "max_rounds": 2}, run, is_local_path=no_paths)
    assert not adoption.conflicts
    assert adoption.own == {"dataset": ("/mnt/copy.parquet", "/org/data.parquet"), "max_rounds": (2, 4)}
    config = build_config(adoption.values)
    assert (config.data.text_field, config.max_rounds, config.total_inner_steps) == ("body", 2, 20)
    assert shared_values(config) == shared_values(build_config(RUN))  # the schedule stays the run's


def test_the_schedule_horizon_is_the_runs_whatever_the_newcomer_stays():
    constant = run_settings.run_values(build_config({**RUN, "max_rounds": 0}))  # lr constant after warmup
    stays_three = adopt({"max_rounds": 3}, constant, is_local_path=no_paths)
    assert not stays_three.conflicts
    assert schedule_horizon(build_config(stays_three.values)) == 0
    no_warmup = run_settings.run_values(build_config({**RUN, "max_rounds": 0, "warmup_steps": 0}))
    assert adopt({"max_rounds": 3}, no_warmup, is_local_path=no_paths).conflicts == [
        "--max-rounds 3 gives a learning-rate schedule that decays over 15 steps; the run's stays constant "
        "after warmup (leave --max-rounds out)"
    ]
    run = run_settings.run_values(build_config(RUN))  # decays over 4 x 5 = 20 steps
    assert not adopt(
        {"total_steps": 0, "max_rounds": 4}, run, is_local_path=no_paths
    ).conflicts  # its own file
    assert adopt({"total_steps": 30}, run, is_local_path=no_paths).conflicts == [
        "--total-steps 30 gives a learning-rate schedule that decays over 30 steps; the run's decays over 20"
    ]


PATHS = {"is_local_path": lambda s: s.startswith("/"), "exists": lambda s: s.startswith("/here")}


def test_settle_starts_a_run_when_nobody_publishes_and_refuses_what_this_machine_lacks():
    alone = settle({"run_id": "r", "inner_steps": 7}, {}, **PATHS)
    assert alone.config.inner.steps == 7 and alone.publish["inner_steps"] == 7
    assert alone.lines == [
        "run 'r': no peer publishes its settings yet; starting it with this peer's settings"
    ]

    with pytest.raises(PreflightError) as error:
        settle({"run_id": "r", "inner_steps": 7}, {b"a": record(RUN)}, **PATHS)
    assert error.value.exit_code == 2 and "--inner-steps 7 contradicts the run's 5" in str(error.value)

    on_disk = {b"a": record({**RUN, "dataset": "/org/data"})}
    with pytest.raises(PreflightError) as error:
        settle({"run_id": "r"}, on_disk, **PATHS)
    assert error.value.exit_code == 1
    assert str(error.value).startswith(
        "run 'r' trains on dataset /org/data, a local path this machine does not have: put a copy at that same path"
    )
    assert (
        settle({"run_id": "r", "dataset": "/here/copy"}, on_disk, **PATHS).config.data.dataset == "/here/copy"
    )
    tokenizer_file = {b"a": record({**RUN, "tokenizer": "/org/tok.json"})}
    with pytest.raises(
        PreflightError, match="run 'r' uses tokenizer /org/tok.json, a local path this machine does "
    ):
        settle({"run_id": "r"}, tokenizer_file, **PATHS)


def test_settle_adopts_says_what_and_publishes_the_runs_version():
    organizer = {**RUN, "dataset": "/here/data", "batch_size": 4}
    settled = settle(
        {"run_id": "r", "dataset": "/here/mine", "device": "cpu"}, {b"a": record(organizer)}, **PATHS
    )
    config = build_config(organizer)
    assert shared_values(settled.config) == shared_values(config)
    assert settled.publish == run_settings.run_values(config)  # the run's dataset, not this peer's copy
    assert flag_values(settled.config)["dataset"] == "/here/mine"
    header, adopted, own = settled.lines
    assert header.startswith("run 'r': adopting the settings 1 peer(s) publish (fingerprint ")
    assert "batch_size=4" in adopted and "inner_steps=5" in adopted and "warmup_steps=5" in adopted
    assert "seed=" not in adopted  # the same as this peer's default: not news
    assert own == "  this peer's own: dataset=/here/mine (the run's: /here/data)"
