"""Flags and TOML config files -> RunConfig (shared by the peer CLI and the simulation).

The flags are generated from the fields of peer.config's dataclasses: a field's name (or its `setting(flag=)`)
is the flag and the TOML key, its type the flag's type, its docstring and default the help.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass

from peer.config import RUN_DEFAULTS, SHARED_SETTINGS, RunConfig, field_docs

HELP_DESCRIPTION = (
    "Join (or start) a DiLoCo training swarm. To join a run, --initial-peers and --run-id are enough: the peer "
    "adopts the settings the run's peers publish (give only this machine's settings). Every flag can also be set "
    "in --config FILE.toml (keys are flag names without dashes, e.g. inner_steps = 50); flags override the file."
)


RUN_SECTION_DOC = "This peer's run: seed, length, device, evaluation, checkpoints, logging."


@dataclass(frozen=True)
class Flag:
    """One setting as the command line and the TOML file see it."""

    name: str
    """The flag without dashes, e.g. inner_steps: also the TOML key."""
    section: str | None
    """The RunConfig field holding it (model, data, inner, outer, swarm), None for RunConfig's own fields."""
    field: dataclasses.Field
    kind: type
    """str, int, float, bool or tuple (of strings)."""
    help: str

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def _kind(annotation) -> type:
    """The value type of a field annotation: `str | None` -> str, `tuple[str, ...]` -> tuple."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    kind = typing.get_origin(annotation) or annotation
    assert kind in (str, int, float, bool, tuple), f"no command-line type for {annotation}"
    return kind


def _help(field: dataclasses.Field, doc: str) -> str:
    default = field.default
    if default is None or default is False or default == ():
        text = doc
    else:
        shown = (
            " ".join(default)
            if isinstance(default, tuple)
            else f"{default:g}"
            if isinstance(default, float)
            else default
        )
        text = f"{doc.removesuffix('.')} (default {shown})."
    return text.replace("%", "%%")  # argparse formats help strings with %


def flags_of(cls: type, section: str | None = None) -> list[Flag]:
    """The flags of a settings dataclass, recursing into dataclass fields (their name is the section)."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    flags = []
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            flags += flags_of(hints[field.name], field.name)
        elif field.metadata.get("cli", True):
            name = field.metadata.get("flag", field.name)
            flags.append(Flag(name, section, field, _kind(hints[field.name]), _help(field, docs[field.name])))
    return flags


FLAGS: dict[str, Flag] = {flag.name: flag for flag in flags_of(RunConfig)}
SECTIONS: dict[str, type] = {
    name: cls for name, cls in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(cls)
}


def _section_doc(section: str | None) -> str:
    return RUN_SECTION_DOC if section is None else SECTIONS[section].__doc__


def add_flags(group: argparse._ActionsContainer, flags: list[Flag]) -> None:
    """Add the flags to a parser or group; an unset flag parses as None (so the field's default applies)."""
    for flag in flags:
        metadata = flag.field.metadata
        options: dict = {"help": argparse.SUPPRESS if metadata.get("hidden") else flag.help, "default": None}
        if flag.kind is bool:
            options.update(action="store_const", const=True)
        else:
            options.update(metavar=metadata.get("metavar"), choices=metadata.get("choices"))
            if "parse" in metadata:
                options["type"] = str  # parsed with the field's own function, which says what is wrong
            elif flag.kind is tuple:
                options["nargs"] = "+"
            else:
                options["type"] = flag.kind
        group.add_argument(flag.option, dest=flag.name, **options)


def given_values(args: argparse.Namespace, flags: list[Flag]) -> dict:
    """Field name -> value of the flags given on the command line, converted to the fields' types."""
    values = {}
    for flag in flags:
        value = getattr(args, flag.name)
        if value is not None:
            parse = flag.field.metadata.get("parse")
            values[flag.field.name] = parse(value) if parse else tuple(value) if flag.kind is tuple else value
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m peer", description=HELP_DESCRIPTION, argument_default=None
    )
    parser.add_argument("--config", help="TOML file with settings (flat keys named like the flags)")
    for section in dict.fromkeys(flag.section for flag in FLAGS.values()):
        group = parser.add_argument_group(section or "run", _section_doc(section))
        add_flags(group, [flag for flag in FLAGS.values() if flag.section == section])
    return parser


def read_toml(path: str) -> dict:
    """The settings of a TOML file (flat keys named like the flags), each checked against its field's type."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as file:
            raw = tomllib.load(file)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(values) - set(FLAGS))
    if unknown:
        raise ValueError(f"config file {path}: unknown settings {', '.join(unknown)}")
    return {key: _checked(FLAGS[key], value, path) for key, value in values.items()}


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _checked(flag: Flag, value, path: str):
    """A TOML value converted to its field's type, or one clear error naming the key."""
    if flag.kind is tuple:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return tuple(items)
        expected = "a string or a list of strings"
    elif flag.kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif type(value) is flag.kind:  # type(): true is not an integer
        return value
    else:
        expected = _TYPE_NAMES[flag.kind]
    raise ValueError(f"config file {path}: {flag.name} must be {expected}, got {value!r}")


def build_config(values: dict) -> RunConfig:
    """RunConfig from flat settings named like the flags (flag name -> value); unset ones keep their default."""
    sections: dict[str | None, dict] = {}
    for key, value in values.items():
        flag = FLAGS[key]
        sections.setdefault(flag.section, {})[flag.field.name] = value
    nested = {name: SECTIONS[name](**fields) for name, fields in sections.items() if name is not None}
    return RunConfig(**nested, **sections.get(None, {}))


def given_settings(argv: list[str] | None = None) -> dict:
    """The settings the user gave, in flags or in the --config file (flags win), by flag name; a setting left out
    is absent (every flag parses as None when not given, so its default can still be shown in --help)."""
    args = build_parser().parse_args(argv)
    values = read_toml(args.config) if args.config else {}
    for key, value in vars(args).items():
        if key in FLAGS and value is not None:
            values[key] = tuple(value) if FLAGS[key].kind is tuple else value
    return values


def config_from_args(argv: list[str] | None = None) -> tuple[RunConfig, str]:
    """Parse flags (over an optional --config file); returns the config and its log level."""
    config = build_config(given_settings(argv))
    return config, config.log_level


def flag_values(config: RunConfig) -> dict:
    """Every setting of a config by flag name (the inverse of build_config)."""
    return {
        name: getattr(config if flag.section is None else getattr(config, flag.section), flag.field.name)
        for name, flag in FLAGS.items()
    }


SCOPE_LEGEND = (
    "The last column says whose setting it is. **shared**: the run's, the same on every peer (part of the run "
    "fingerprint); a volunteer adopts it from the run, and a different value is refused. **run default**: the "
    "run's choice, adopted unless a volunteer gives its own (its copy of the data, how many rounds it stays). "
    "**machine**: this machine's alone, never published."
)


def scope(flag_name: str) -> str:
    """shared, run default or machine (peer.config's classification of the setting)."""
    if flag_name in SHARED_SETTINGS:
        return "shared"
    return "run default" if flag_name in RUN_DEFAULTS else "machine"


def flag_tables_markdown() -> str:
    """The README's flag tables, one per section (scripts/flag_tables.py writes them into README.md)."""
    header = ["| flag | meaning | scope |", "|---|---|---|"]
    lines = [SCOPE_LEGEND, "", "**general**", "", *header]
    lines.append("| `--config FILE` | TOML file with settings (flat keys named like the flags) | |")
    section = "general"
    for flag in FLAGS.values():
        metadata = flag.field.metadata
        if metadata.get("hidden"):
            continue
        if flag.section != section:
            section = flag.section
            lines += ["", f"**{section or 'run'}**: {_section_doc(section)}", "", *header]
        metavar = metadata.get("metavar") or flag.name.upper()
        usage = {bool: flag.option, tuple: f"{flag.option} {metavar} ..."}.get(
            flag.kind, f"{flag.option} {metavar}"
        )
        meaning = flag.help.replace("%%", "%").replace("|", "\\|")
        lines.append(f"| `{usage}` | {meaning} | {scope(flag.name)} |")
    return "\n".join(lines) + "\n"
