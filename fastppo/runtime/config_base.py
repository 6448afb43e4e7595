"""What every stage's config shares: typed dataclass fields with their help, read from YAML, `--set key=value` and
generated command-line flags, and checked in one place.

A stage's config is a `@dataclass` subclass of `Config` whose fields are made with `option(default, help)`. The
field names are the Python API, the YAML keys and the flags (`--learning-rate` or `--learning_rate`); the help
strings are the flags' help and docs/configuration.md (generated from them). The class attributes say what else
a field accepts:

    CHOICES   field -> allowed values
    RANGES    field -> the `Interval` a number must lie in (besides being finite, or fitting in 64 bits)
    RENAMED   old key -> new key: accepted with a deprecation warning
    FOREIGN   another library's key (TRL's, OpenRLHF's) -> what to write instead: refused, naming it

`validate()` runs `check_fields()` (types, choices, ranges) and then the config's own cross-field checks. Every
problem is an `InputError` that names the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import field
from typing import ClassVar

from fastppo.runtime.errors import InputError
from fastppo.runtime.validation import (
    Interval,
    check_finite,
    check_int64,
    check_range,
    clip,
    parse_float,
    same_directory,
    short,
)

MAX_CONFIG_BYTES = 8 << 20  # a run config is a few KB; anything this big is the wrong file (or prompts inline)


def option(default, help: str, **metadata):
    """A config field: its default and the one sentence of help that the flags and the docs show (metadata
    `aliases`: more flags for it, such as `--lr`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


class Config:
    CHOICES: ClassVar[dict[str, Sequence]] = {}
    RANGES: ClassVar[dict[str, Interval]] = {}
    RENAMED: ClassVar[dict[str, str]] = {}
    FOREIGN: ClassVar[dict[str, str]] = {}
    # The directory of the YAML file the config was read from (not a field): 'module:function' specs resolve there.
    config_dir: ClassVar[str | None] = None

    # --- reading ------------------------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict, source: str = "config"):
        values = dict(values)
        for old, new in cls.RENAMED.items():
            if old in values:
                if new in values:
                    raise InputError(f"{source}: {old} is the old name of {new}, and both are set: keep {new}")
                warnings.warn(f"{source}: {old} is now called {new}; the old name will go", FutureWarning, stacklevel=2)
                values[new] = values.pop(old)
        names = cls.field_names()
        unknown = [str(key) for key in values if key not in names]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise InputError(f"{source}: {'; '.join(cls._unknown_key(key) for key in unknown[:5])}{more}")
        hints = typing.get_type_hints(cls)
        # YAML 1.1 reads `1e-5` (no dot) as a string: a float field takes any string that spells a number.
        values = {k: parse_float(v) if float in type_options(hints[k]) else v for k, v in values.items()}
        return cls(**values)

    @classmethod
    def _unknown_key(cls, key: str) -> str:
        if key in cls.FOREIGN:
            return f"{short(key)} is not a fastppo setting: {cls.FOREIGN[key]}"
        close = difflib.get_close_matches(key, sorted(cls.field_names()), n=1)
        return f"unknown key {short(key)}" + (f" (did you mean {close[0]}?)" if close else "")

    @classmethod
    def from_yaml(cls, path: str | None, overrides: Sequence[str] = (), flags: dict | None = None):
        """The config file (if any), then each `key=value` of `overrides`, then `flags` (already parsed)."""
        values = {}
        if path is not None:
            values = parse_yaml(read_config_file(path), path)
            values = {} if values is None else values
            if not isinstance(values, dict):
                raise InputError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
        for override in overrides:
            key, sep, value = override.partition("=")
            if not sep or not key.strip():
                raise InputError(f"--set {short(override)}: expected key=value")
            values[key.strip()] = parse_yaml(value, f"--set {clip(key.strip(), 80)}={short(value)}")
        values.update(flags or {})
        config = cls.from_dict(values, source=path or "command line")
        config.config_dir = os.path.dirname(os.path.abspath(path)) if path is not None else None
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --- checking -------------------------------------------------------------------------------------------------

    def check_fields(self) -> None:
        """Every field's type, then the CHOICES and RANGES of the class."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), hints[f.name])
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {', '.join(map(str, allowed))}; got {getattr(self, name)!r}")
        for name, interval in self.RANGES.items():
            check_range(name, getattr(self, name), interval, nullable=type(None) in type_options(hints[name]))

    def validate(self):
        self.check_fields()
        return self

    # --- the command line -----------------------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
        """`--config`, `--set KEY=VALUE` and one flag per field (its value read as YAML, like `--set`)."""
        parser.add_argument("--config", help="YAML file whose keys are the fields below")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        group = parser.add_argument_group(f"{cls.__name__} fields (each also a YAML key)")
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
            flags += list(f.metadata.get("aliases", ()))
            help_text = f"{f.metadata['help']} (default: {_default_text(f)})".replace("%", "%%")
            if f.type in ("bool", bool):
                group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(*flags, dest=f.name, metavar="VALUE", help=help_text)
        parser.set_defaults(**{f.name: None for f in dataclasses.fields(cls)})

    @classmethod
    def flags_given(cls, args: argparse.Namespace) -> dict:
        """The fields set by a flag, each value read as YAML (so `--micro-batch-size null` and `--lr 1e-5` mean what
        they mean in a config file)."""
        given = {}
        for name in cls.field_names():
            value = getattr(args, name, None)
            if value is None:
                continue
            given[name] = value if isinstance(value, bool) else parse_yaml(value, f"--{name.replace('_', '-')}")
        return given

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        return cls.from_yaml(args.config, args.set, cls.flags_given(args))


def _default_text(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)


# --- YAML -----------------------------------------------------------------------------------------------------


def read_config_file(path: str) -> str:
    if not os.path.exists(path):
        raise InputError(f"config file {path} does not exist")
    if not os.path.isfile(path):
        raise InputError(f"config file {path} is not a file")
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise InputError(
            f"config file {path} is {os.path.getsize(path) >> 20} MB: a run config is a few KB (prompts "
            "belong in a JSONL file); is it the right file?"
        )
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8-sig")
    except OSError as error:
        raise InputError(f"config file {path}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise InputError(
            f"config file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}); is it the right file?"
        ) from None


def parse_yaml(text: str, where: str):
    import yaml

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        def construct_mapping(self, node, deep=False):
            """PyYAML keeps the last of two equal keys; a config that sets a field twice is refused instead."""
            lines = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                    continue
                key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
                if key in lines:  # an unhashable key raises TypeError here: not valid YAML, below
                    raise InputError(f"{where}: {short(key)} is set twice (lines {lines[key]} and {line})")
                lines[key] = line
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=Loader)
    except InputError:
        raise
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as error:  # the others: from PyYAML's constructors
        problem = "nested too deeply" if isinstance(error, RecursionError) else clip(error)
        raise InputError(f"{where}: not valid YAML ({problem})") from None


# --- types and paths ------------------------------------------------------------------------------------------


def type_options(hint) -> tuple:
    """The types a field accepts: the members of a union, else the hint itself."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return typing.get_args(hint) if union else (hint,)


def check_type(name: str, value, hint) -> None:
    if hint is typing.Any:
        return
    allowed = type_options(hint)
    for option_type in allowed:
        option_type = typing.get_origin(option_type) or option_type
        if option_type is type(None) and value is None:
            return
        if option_type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return check_finite(name, value)
        if option_type is int and isinstance(value, int) and not isinstance(value, bool):
            return check_int64(name, value)
        if option_type not in (float, int, type(None)) and isinstance(value, option_type):
            return
    names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in allowed)
    raise InputError(f"{name} must be {names}, got {type(value).__name__} {short(value)}")


def check_path(name: str, path, file: bool = False) -> None:
    if path is None:
        return
    if not os.path.exists(path):
        raise InputError(f"{name}: path {path} does not exist")
    if file and not os.path.isfile(path):
        raise InputError(f"{name}: {path} is not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{name}: {path} is not readable")


RESUME_FROM_HELP = (
    "Run directory (latest valid checkpoint) or checkpoint directory to resume; output_dir itself with no checkpoint "
    "yet starts a fresh run (so --resume can always be passed)."
)


def check_resume_from(resume_from, output_dir) -> None:
    """resume_from exists, unless it is output_dir itself: a run that saved nothing yet starts fresh."""
    if resume_from is not None and not (isinstance(output_dir, str) and same_directory(resume_from, output_dir)):
        check_path("resume_from", resume_from)
