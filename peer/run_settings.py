"""The run's settings as its peers publish them, and a newcomer's adoption of them, as pure functions.

A peer publishes the run's settings (peer.config's SHARED_SETTINGS and RUN_DEFAULTS, by flag name) beside its
fingerprint. A newcomer picks the version most distinct peers publish, takes every run setting it was not given,
and refuses one it was given that contradicts the run. The DHT reading is peer/run_state.py's; the CLI acts on the
answers here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from peer.cli import FLAGS, build_config, flag_values
from peer.config import (
    CONTENT_SETTINGS,
    RUN_DEFAULTS,
    SHARED_SETTINGS,
    RunConfig,
    fingerprint,
    schedule_horizon,
    shared_values,
)
from peer.preflight import PreflightError
from peer.records import MAX_RUN_SETTINGS_CHARS, SettingsRecord

RUN_SETTINGS = SHARED_SETTINGS | RUN_DEFAULTS
MAX_VALUE_CHARS = 1024
"""The longest string a published setting may hold (a path, a hub id); the record itself is bounded too."""


def run_values(config: RunConfig) -> dict:
    """The run settings of a config, by flag name, as a peer publishes them. total_steps is the schedule's horizon
    (peer.config.schedule_horizon: 0 for a constant learning rate after warmup), so that a newcomer's own
    --max-rounds cannot change the schedule."""
    values = flag_values(config)
    run = {name: values[name] for name in sorted(RUN_SETTINGS)}
    run["total_steps"] = schedule_horizon(config)
    return run


def encode(values: Mapping[str, Any]) -> str:
    """The JSON a settings record carries; "" if it would not pass parse_run_values (a path too long to publish)."""
    text = json.dumps(dict(values), sort_keys=True)
    return text if parse_run_values(text) is not None else ""


# ---- reading what strangers publish ------------------------------------------------------------------------------
def _value_ok(name: str, value: Any) -> bool:
    flag = FLAGS[name]
    if value is None:
        return flag.field.default is None  # only settings whose default is None may be None
    if flag.kind is float:
        return type(value) in (int, float) and math.isfinite(value)  # JSON writes 1.0 as 1.0, but be lenient
    if flag.kind is str:
        return type(value) is str and len(value) <= MAX_VALUE_CHARS
    return type(value) is flag.kind  # int or bool (type(): true is not an integer)


def parse_run_values(text: str) -> dict | None:
    """A published run-settings JSON checked as input from a stranger: exactly the run settings, each of its flag's
    type and bounded, and together a valid config. None if anything is wrong."""
    if not text or len(text) > MAX_RUN_SETTINGS_CHARS:
        return None
    try:
        values = json.loads(text)
    except ValueError:
        return None
    if not isinstance(values, dict) or set(values) != RUN_SETTINGS:
        return None
    if not all(_value_ok(name, value) for name, value in values.items()):
        return None
    values = {
        name: float(v) if FLAGS[name].kind is float and v is not None else v for name, v in values.items()
    }
    try:
        build_config(values)
    except (ValueError, TypeError):
        return None
    return values


@dataclass(frozen=True)
class PublishedRun:
    """One version of a run's settings and how many peers publish it."""

    fingerprint: str
    settings: dict
    """The fingerprint settings (peer.config.fingerprint_settings)."""
    values: dict
    """The run settings by flag name (run_values)."""
    publishers: int
    """Distinct record-signing keys that publish this version."""


def published_runs(records: Mapping[bytes, SettingsRecord]) -> list[PublishedRun]:
    """The valid versions of a run's settings among its peers' records, most publishers first (ties: by
    fingerprint, then settings, so that every reader lists them alike). A record counts only if its settings hash to
    its fingerprint, its run settings parse, and those agree with its own fingerprint settings."""
    versions: dict[tuple[str, str], tuple[dict, dict, set[bytes]]] = {}
    for key, record in records.items():
        try:
            settings = json.loads(record.settings_json)
        except ValueError:
            continue
        values = parse_run_values(record.run_settings_json)
        if not isinstance(settings, dict) or values is None or fingerprint(settings) != record.fingerprint:
            continue
        if any(settings.get(name) != value for name, value in shared_values(build_config(values)).items()):
            continue  # run settings that contradict the fingerprint they come with
        version = (record.fingerprint, json.dumps(values, sort_keys=True))
        versions.setdefault(version, (settings, values, set()))[2].add(key)
    runs = [
        PublishedRun(fp, settings, values, len(keys))
        for (fp, _), (settings, values, keys) in versions.items()
    ]
    return sorted(runs, key=lambda r: (-r.publishers, r.fingerprint, json.dumps(r.values, sort_keys=True)))


class AmbiguousRun(ValueError):
    """Several versions of the run's settings have the same, largest number of publishers."""


def choose_run(
    runs: list[PublishedRun], given: Mapping[str, Any], *, is_local_path: Callable[[str], bool]
) -> PublishedRun | None:
    """The version to adopt: the one the most distinct peers publish, so that one stranger's record cannot capture
    newcomers. Between versions with equally many publishers, the only one the given settings do not contradict;
    otherwise AmbiguousRun (a newcomer cannot tell which is the run's). None: nobody publishes usable settings."""
    if not runs:
        return None
    top = [r for r in runs if r.publishers == runs[0].publishers]
    if len(top) == 1:
        return top[0]
    consistent = [r for r in top if _matches(adopt(given, r.values, is_local_path=is_local_path))]
    if len(consistent) == 1:
        return consistent[0]
    raise AmbiguousRun(
        f"{len(top)} different versions of the run's settings, each published by {runs[0].publishers} peer(s)"
    )


# ---- adopting them -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Adoption:
    """What a newcomer trains with: the run's settings where it gave none, its own where the run allows it."""

    values: dict
    """The settings to build this peer's config from, by flag name."""
    adopted: dict = field(default_factory=dict)
    """Run settings this peer did not give, with the run's value."""
    own: dict = field(default_factory=dict)
    """Run settings where this peer keeps its own value: flag -> (ours, the run's)."""
    conflicts: list[str] = field(default_factory=list)
    """One message per given setting that contradicts the run."""


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def adopt(
    given: Mapping[str, Any], run: Mapping[str, Any], *, is_local_path: Callable[[str], bool]
) -> Adoption:
    """Merge the settings a newcomer gave with the run's published ones (`run`: run_values of the run).

    A shared setting given with another value is a conflict, except a model, weights or tokenizer given as a local
    path (this machine's copy: the fingerprint compares contents). A run default given with another value is this
    peer's own choice. The schedule's horizon is the run's: total_steps is adopted as the run's horizon, so a
    newcomer's own --max-rounds only says how long it stays."""
    values = dict(given)
    adopted, own, conflicts = {}, {}, []
    for name in sorted(RUN_SETTINGS - {"total_steps"}):
        theirs = run[name]
        if name not in given:
            if name == "model" and theirs == run["init_from"] and "init_from" in given:
                continue  # the model is the pretrained one: it follows this peer's copy of it
            values[name] = adopted[name] = theirs
        elif given[name] == theirs:
            continue
        elif name in RUN_DEFAULTS or (
            name in CONTENT_SETTINGS and isinstance(given[name], str) and is_local_path(given[name])
        ):
            own[name] = (given[name], theirs)
        else:
            conflicts.append(f"{_option(name)} {given[name]} contradicts the run's {theirs}")
    horizon = run["total_steps"]
    if "total_steps" not in given:
        # the run's horizon, whatever this peer's --max-rounds; a constant schedule is any horizon within the warmup
        adopted["total_steps"] = horizon
        values["total_steps"] = horizon or values["warmup_steps"]
    ours = _horizon(values)
    if ours != horizon and not conflicts:  # (an inner_steps or warmup conflict already explains it)
        given_flags = " ".join(
            f"{_option(n)} {given[n]}" for n in ("total_steps", "max_rounds") if n in given
        )
        conflicts.append(
            f"{given_flags} gives a learning-rate schedule that decays over {ours} steps; the run's "
            + (f"decays over {horizon}" if horizon else "stays constant after warmup")
            + ("" if "total_steps" in given else " (leave --max-rounds out)")
        )
    return Adoption(values, adopted, own, conflicts)


def adoption_lines(
    run_id: str, run: PublishedRun, adoption: Adoption, defaults: Mapping[str, Any]
) -> list[str]:
    """What a newcomer says it adopted: the run settings that differ from what it would have used by itself."""
    changed = {k: v for k, v in adoption.adopted.items() if defaults.get(k) != v}
    lines = [
        f"run {run_id!r}: adopting the settings {run.publishers} peer(s) publish (fingerprint {run.fingerprint})",
        "  adopted: "
        + (" ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "nothing new")
        + f" ({len(adoption.adopted) - len(changed)} more run settings equal this peer's defaults)",
    ]
    if adoption.own:
        lines.append(
            "  this peer's own: "
            + " ".join(
                f"{k}={ours} (the run's: {theirs})" for k, (ours, theirs) in sorted(adoption.own.items())
            )
        )
    return lines


def _matches(adoption: Adoption) -> bool:
    """The given settings are this version's wherever they were given."""
    return not adoption.conflicts and not adoption.own


# what a newcomer needs on its own disk when it adopts a local path, and what to do when it lacks it
_LOCAL_PATH_HINTS = {
    "dataset": ("trains on dataset", "pass your copy with --dataset PATH, or ask the organizer for a Hugging Face "
                "hub dataset"),
    "tokenizer": ("uses tokenizer", "pass your copy with --tokenizer PATH"),
    "model": ("uses the model config", "pass your copy with --model PATH"),
    "init_from": ("starts from the weights in", "pass your copy with --init-from DIR"),
}  # fmt: skip


def missing_local_paths(
    adopted: Mapping[str, Any],
    *,
    run_id: str,
    is_local_path: Callable[[str], bool],
    exists: Callable[[str], bool],
) -> list[str]:
    """One message per adopted setting that names a local path this machine does not have."""
    return [
        f"run {run_id!r} {what} {adopted[name]}, a local path this machine does not have: put a copy at that same "
        f"path, or {hint}"
        for name, (what, hint) in _LOCAL_PATH_HINTS.items()
        if isinstance(adopted.get(name), str) and is_local_path(adopted[name]) and not exists(adopted[name])
    ]


@dataclass(frozen=True)
class Settled:
    """A peer's settings once it has looked at the run it joins."""

    config: RunConfig
    publish: dict
    """The run's settings as this peer publishes them for later newcomers (the run's own version, not this peer's
    local choices, so that every peer of the run publishes the same)."""
    lines: list[str]
    """What to tell the user."""


def settle(
    given: Mapping[str, Any],
    records: Mapping[bytes, SettingsRecord],
    *,
    is_local_path: Callable[[str], bool],
    exists: Callable[[str], bool],
) -> Settled:
    """This peer's config from the settings it was given (by flag name) and the settings records the run's peers
    publish; raises PreflightError with one line (exit code 2 for a contradicting setting)."""
    own = build_config(dict(given))
    run_id = own.swarm.run_id
    runs = published_runs(records)
    try:
        run = choose_run(runs, given, is_local_path=is_local_path)
    except AmbiguousRun as e:
        raise PreflightError(
            f"run {run_id!r}: {e}, so this peer cannot tell which is the run's (a stranger may publish false "
            "settings): give the run's settings with --config FILE from its organizer, or try again later"
        ) from None
    if run is None:
        ignored = f" ({len(records)} unusable settings records ignored)" if records else ""
        line = f"run {run_id!r}: no peer publishes its settings yet{ignored}; starting it with this peer's settings"
        return Settled(own, run_values(own), [line])
    adoption = adopt(given, run.values, is_local_path=is_local_path)
    if adoption.conflicts:
        raise PreflightError(
            f"run {run_id!r}: {'; '.join(adoption.conflicts)}. Leave "
            + ("it" if len(adoption.conflicts) == 1 else "them")
            + " out to train with the run's settings, or start another run with another --run-id",
            exit_code=2,
        )
    missing = missing_local_paths(adoption.adopted, run_id=run_id, is_local_path=is_local_path, exists=exists)
    if missing:
        raise PreflightError(missing[0])
    try:
        config = build_config(adoption.values)
    except (ValueError, TypeError) as e:
        raise PreflightError(f"run {run_id!r}: with the run's settings: {e}", exit_code=2) from None
    defaults = flag_values(own)
    return Settled(config, dict(run.values), adoption_lines(run_id, run, adoption, defaults))


def _horizon(values: Mapping[str, Any]) -> int:
    """The schedule horizon (peer.config.schedule_horizon) of flat settings."""
    horizon = values["total_steps"] or values["max_rounds"] * values["inner_steps"]
    return horizon if horizon > values["warmup_steps"] else 0
