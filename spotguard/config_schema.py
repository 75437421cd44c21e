"""Typed TOML sections: the machinery under ``config.py``, which holds spotguard's own keys.

A configuration is a frozen dataclass whose fields are section dataclasses; each key is a field with a
default and ``help`` (and optional ``choices``) metadata made by ``option``. This module reads such an
object from mappings (a TOML file, ``SPOTGUARD_SECTION_KEY`` environment variables, CLI overrides),
checks types and choices with errors that name the key and where the value came from, and writes it
back out as TOML and as reference rows for the docs. It knows no key by name: rules that tie keys
together are ``config_rules.py``'s.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

from spotguard.errors import ConfigError

T = TypeVar("T")
Sections = dict[str, dict[str, Any]]


def option(default: Any, help: str, *, choices: tuple[str, ...] = ()) -> Any:
    """A key with its default and documentation (lists are stored as tuples: values are frozen)."""
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def sections(root: type[Any]) -> dict[str, type[Any]]:
    """Section name -> its dataclass, in declaration order."""
    return {f.name: typing.cast(type[Any], f.type if isinstance(f.type, type) else _hints(root)[f.name])
            for f in dataclasses.fields(root)}


def _coerce(section: str, key: str, kind: Any, value: Any, origin: str) -> Any:
    where = f"[{section}] {key} (from {origin})"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.strip().lower() in {"1", "true", "yes", "on"}
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value, 0) if isinstance(value, str) else int(value) if isinstance(value, int) else _fail()
        except (ValueError, TypeError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value) if isinstance(value, (int, float, str)) else _fail()
        except (ValueError, TypeError):
            raise ConfigError(f"{where}: expected a number of seconds, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{where}: not a JSON list: {exc}") from None
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{where}: unsupported type {kind!r}")  # pragma: no cover - a bug in the schema


def _fail() -> Any:
    raise TypeError


def _check_choice(section: str, key: str, meta: Mapping[str, Any], value: Any) -> None:
    choices = meta.get("choices", ())
    if choices and value not in choices:
        raise ConfigError(f"[{section}] {key}: {value!r} is not one of {', '.join(choices)}")


def build(root: type[T], data: Mapping[str, Any], origin: str) -> T:
    """``root`` from ``{section: {key: value}}``: unknown sections and keys, wrong types and values outside
    ``choices`` raise ConfigError naming the key and ``origin``. Keys left out keep their defaults."""
    built: dict[str, Any] = {}
    known = sections(root)
    for name, section_data in data.items():
        if name not in known:
            raise ConfigError(f"unknown section [{name}] (from {origin}); known: {', '.join(known)}")
        if not isinstance(section_data, Mapping):
            raise ConfigError(f"[{name}] must be a table (from {origin})")
        cls = known[name]
        hints = _hints(cls)
        fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in section_data.items():
            if key not in fields_by_name:
                raise ConfigError(f"unknown key [{name}] {key} (from {origin}); known: {', '.join(fields_by_name)}")
            value = _coerce(name, key, hints[key], raw, origin)
            _check_choice(name, key, fields_by_name[key].metadata, value)
            values[key] = value
        built[name] = cls(**values)
    return root(**built)


def to_dict(config: Any) -> Sections:
    """``{section: {key: value}}`` of a built configuration."""
    return {f.name: dataclasses.asdict(getattr(config, f.name)) for f in dataclasses.fields(config)}


def merge(base: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Mapping[str, Any]]) -> Sections:
    """``base`` with ``extra``'s keys laid over it, section by section."""
    merged = {name: dict(values) for name, values in base.items()}
    for name, values in extra.items():
        merged.setdefault(name, {}).update(values)
    return merged


def from_env(root: type[Any], environ: Mapping[str, str], prefix: str, not_config: frozenset[str]) -> Sections:
    """``PREFIX_SECTION_KEY`` variables as sections (values still text); a variable under ``prefix`` that names
    no section is a ConfigError (a typo must not be silently ignored), unless it is in ``not_config``."""
    found: Sections = {}
    known = sections(root)
    for var, value in environ.items():
        if not var.startswith(prefix) or var in not_config:
            continue
        rest = var[len(prefix):].lower()
        for name in sorted(known, key=len, reverse=True):
            if rest.startswith(name + "_"):
                found.setdefault(name, {})[rest[len(name) + 1:]] = value
                break
        else:
            raise ConfigError(f"unknown environment variable {var}: no section matches; "
                              f"expected {prefix}<SECTION>_<KEY> with SECTION in {', '.join(known)}")
    return found


def read_toml(path: Path, named_by: str) -> dict[str, Any]:
    """A TOML file as sections; ConfigError when it is missing (naming who named it), unreadable or not TOML."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} (named by {named_by}) does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    return raw


def reference(root: type[Any]) -> list[tuple[str, str, str, str, str]]:
    """(section, key, type, default, help) for every key: the source of the configuration docs."""
    rows = []
    for name, cls in sections(root).items():
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            type_name = "list of strings" if typing.get_origin(kind) is tuple else getattr(kind, "__name__", str(kind))
            default = f.default if f.default is not dataclasses.MISSING else ""
            shown = json.dumps(list(default)) if isinstance(default, tuple) else json.dumps(default)
            help_text = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                help_text += f" One of: {', '.join(f.metadata['choices'])}."
            rows.append((name, f.name, type_name, shown, help_text))
    return rows


def to_toml(config: Any) -> str:
    """A built configuration as TOML text, every key written out."""
    lines: list[str] = []
    for name, values in to_dict(config).items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)
