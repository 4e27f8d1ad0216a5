"""Settings dataclasses from YAML files and command-line flags, one flag per field.

`parse_config(cls, argv)` gives a dataclass `--config file.yaml` (any field) plus `--<field>` for each field,
typed from its annotation (`Optional[X]`, `bool` as `--x / --no-x`, tuples as several values), its default
shown in `--help`. Precedence: field defaults < the YAML file's `base` file, if any < YAML file < flags. An
unknown YAML key raises with the nearest field's name: a typo is never silently ignored.
"""

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Type, TypeVar, Union

import yaml

ConfigT = TypeVar("ConfigT")


def _unwrap_optional(hint: Any) -> Any:
    """`Optional[X]` -> `X`; other hints unchanged."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML or command-line value to the field's type (PyYAML reads `1e-4` as a string)."""
    optional = _unwrap_optional(hint) is not hint
    base = _unwrap_optional(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if not optional:
            raise ValueError(f"{name} may not be None.")
        return None
    try:
        if typing.get_origin(base) is tuple:
            item_type = typing.get_args(base)[0]
            return tuple(_coerce(name, item, item_type) for item in value)
        if base is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if base in (int, float, str):
            return base(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Bad value for {name}: {value!r} ({error}).") from None
    return value


def _converter(name: str, hint: Any):
    """`_coerce` for one flag, named after its type, so that argparse says "invalid float value: 'x'"."""

    def convert(text: str) -> Any:
        return _coerce(name, text, hint)

    convert.__name__ = getattr(_unwrap_optional(hint), "__name__", "value")
    return convert


def _add_field_flag(parser: argparse.ArgumentParser, name: str, hint: Any, help_text: str) -> None:
    base = _unwrap_optional(hint)
    # SUPPRESS: only flags actually given end up in the namespace, so they override the YAML file.
    common = dict(default=argparse.SUPPRESS, help=help_text)
    if base is bool:
        parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **common)
    elif typing.get_origin(base) is tuple:
        parser.add_argument(f"--{name}", nargs="+", type=_converter(name, typing.get_args(base)[0]), **common)
    else:
        parser.add_argument(f"--{name}", type=_converter(name, hint), **common)


class OneLineErrorParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage block before it), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def read_yaml_config(path: Union[str, os.PathLike], config_cls: Type[ConfigT]) -> Dict[str, Any]:
    """Field values from a YAML mapping; unknown keys raise (typos would otherwise be silently ignored).

    A `base: other.yaml` key (a path relative to this file) reads that file first and lets this one
    override it, so that a file that varies another states only what it changes.
    """
    return _read_yaml_chain(Path(path), config_cls, seen=())


def _read_yaml_chain(path: Path, config_cls: Type[ConfigT], seen: Sequence[Path]) -> Dict[str, Any]:
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ValueError(f"{path}: `base` files form a cycle: {chain}")
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of field names to values.")
    base = values.pop("base", None)
    inherited = _read_yaml_chain(path.parent / base, config_cls, (*seen, path.resolve())) if base else {}
    return {**inherited, **coerce_settings(values, config_cls, where=str(path))}


def coerce_settings(values: Dict[str, Any], config_cls: Type[ConfigT], where: str) -> Dict[str, Any]:
    """`values` converted to `config_cls`'s field types; an unknown key raises, naming `where` and the nearest field."""
    hints = typing.get_type_hints(config_cls)
    hints.pop("RESUME_FREE", None)  # a class attribute of training configs, not a setting
    for key in values:
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            suggestion = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown setting {key!r} for {config_cls.__name__}.{suggestion}")
    return {key: _coerce(key, value, hints[key]) for key, value in values.items()}


def parse_config(
    config_cls: Type[ConfigT], argv: Optional[Sequence[str]] = None, prog: Optional[str] = None
) -> ConfigT:
    """Build `config_cls` from its defaults, then `--config file.yaml`, then one flag per field."""
    parser = OneLineErrorParser(prog=prog, description=(config_cls.__doc__ or "").strip())
    parser.add_argument("--config", help="YAML file setting any of the fields below.")
    hints = typing.get_type_hints(config_cls)
    for field in fields(config_cls):
        default = field.default if field.default is not dataclasses.MISSING else None
        _add_field_flag(parser, field.name, hints[field.name], help_text=f"default: {default}")
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    values = read_yaml_config(config_path, config_cls) if config_path else {}
    values.update({name: tuple(value) if isinstance(value, list) else value for name, value in args.items()})
    return config_cls(**values)


__all__ = ["coerce_settings", "parse_config", "read_yaml_config"]
