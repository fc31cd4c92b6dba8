"""Fuzzing config parsing with hypothesis: a TOML file with random values of random types for every setting gives
either a valid RunConfig (every value of its field's type, every number finite) or a ValueError with a message the
CLI prints as one line (exit 2); never another exception, which would be a traceback. What is checked is what the
CLI accepts: peer/cli.py's parsing, then peer/preflight.py's check of the numbers."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import types
import typing
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.cli import FLAGS, config_from_args
from peer.config import RunConfig
from peer.preflight import check_finite_numbers, one_line

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = sorted(FLAGS)

# what TOML can hold (tomli_w writes it, tomllib reads it back)
toml_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.datetimes()
    | st.dates()
    | st.times()
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# values a user might plausibly type, right or wrong: small and edge numbers, words, lists of addresses
plausible = (
    st.sampled_from([0, 1, -1, 2, 3, 5, 50, 10**9, 2**31, 0.0, 0.5, 1.0, -0.5, 1e-9, 1e308])
    | st.sampled_from([float("nan"), float("inf"), float("-inf")])
    | st.sampled_from(["", "0/4", "3/2", "1/0", "a/b", "none", "fp16", "int8", "cpu", "cuda", "auto", "tiny"])
    | st.sampled_from(["adamw", "adamw8bit", "DEBUG", "info", "embedded", "diloco", "run.id", "bf16"])
    | st.lists(st.sampled_from(["/ip4/127.0.0.1/tcp/0", "nonsense", ""]), max_size=3)
    | st.booleans()
)


def declared_type(key: str):
    """The annotation of the RunConfig field a TOML key sets."""
    flag = FLAGS[key]
    section, name = flag if isinstance(flag, tuple) else (flag.section, flag.field.name)
    cls = RunConfig if section is None else typing.get_type_hints(RunConfig)[section]
    return typing.get_type_hints(cls)[name]


def of_type(kind) -> st.SearchStrategy:
    """Values of a field's own type, edge cases included (NaN and infinities for numbers)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return st.one_of([of_type(k) for k in typing.get_args(kind) if k is not type(None)])
    kind = typing.get_origin(kind) or kind
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.sampled_from([0, 1, -1, 2**31])
    if kind is float:
        return st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**63), 2**63 - 1)
    if kind is tuple:
        return st.lists(
            st.text(max_size=20) | st.sampled_from(["/ip4/127.0.0.1/tcp/0", "nonsense"]), max_size=3
        )
    return st.text(max_size=30) | plausible


@st.composite
def config_files(draw) -> dict:
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=8))
    return {key: draw(plausible | toml_values) for key in keys}


def check_valid(config: RunConfig) -> None:
    """Every field holds a value of its declared type; numbers are finite."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), hints[field.name]
        if dataclasses.is_dataclass(kind):
            check_valid(value)
            continue
        allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
        if value is None:
            assert type(None) in allowed, (field.name, value)
            continue
        kinds = [typing.get_origin(k) or k for k in allowed if k is not type(None)]
        assert any(type(value) is k for k in kinds), (field.name, value, kinds)  # type(): True is not an int
        if isinstance(value, float):
            assert math.isfinite(value), (field.name, value)
        if isinstance(value, tuple):
            assert all(isinstance(item, str) for item in value), (field.name, value)


FOLDER = tempfile.TemporaryDirectory()


def parse(values: dict) -> RunConfig | None:
    """The config a TOML file with these values gives, or None if it was refused with a clear message."""
    path = Path(FOLDER.name) / "config.toml"
    path.write_text(tomli_w.dumps(values))
    try:
        config, _ = config_from_args(["--config", str(path)])
        check_finite_numbers(config)
    except ValueError as e:
        assert one_line(e), "an error without a message"
        return None
    return config


@pytest.mark.parametrize("key", KEYS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_each_setting_of_its_own_type_or_another_gives_a_valid_config_or_one_clear_error(key, data):
    value = data.draw(of_type(declared_type(key)) | plausible | toml_values)
    config = parse({key: value})
    if config is not None:
        check_valid(config)


@FUZZ
@given(values=config_files())
def test_a_config_file_gives_a_valid_config_or_one_clear_error(values):
    config = parse(values)
    if config is not None:
        check_valid(config)
