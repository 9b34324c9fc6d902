"""Typed, frozen configuration loaded from TOML.

This module owns the mapping from a TOML file to nested frozen dataclasses: every key is checked
against the dataclass fields, unknown keys and wrong types are refused with a `ConfigError` that
names the file, the key and (where it can be found) the line. It also writes a config back as
TOML, so that `init` and `join` produce files that `load` reads.

It does not know what any host's settings mean: each host declares its own dataclasses, with a
docstring per field, and passes them in.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """An operator's mistake in a config file: the message names the file, key and line."""


def load(cls: type[T], path: Path) -> T:
    """Read `path` into the dataclass `cls`; raise ConfigError naming what was wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (run the host's init or join first)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(cls, raw, source=str(path), text=text)


def from_dict(cls: type[T], raw: dict[str, Any], *, source: str, text: str = "") -> T:
    """Build `cls` from a parsed mapping; `text` is the file's text, used to find line numbers."""
    return _build(cls, raw, source=source, text=text, prefix="")


def _line_of(text: str, dotted: str) -> str:
    """Best effort: ' (line N)' for the key's last part under its section, or ''."""
    parts = dotted.split(".")
    key = re.escape(parts[-1])
    section = ".".join(parts[:-1])
    current = ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[([^\]]+)\]", stripped)
        if header:
            current = header.group(1).strip()
            if current == dotted:
                return f" (line {number})"  # the key is a table: its header is where it starts
            continue
        if current == section and re.match(rf'^"?{key}"?\s*=', stripped):
            return f" (line {number})"
    return ""


def _build(cls: type[T], raw: Any, *, source: str, text: str, prefix: str) -> T:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{where}]{_line_of(text, where)} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'{_line_of(text, prefix + key)}"
                f" (known keys here: {known})"
            )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = prefix + name
        if name not in raw:
            if dataclasses.is_dataclass(hints[name]):
                # A missing table is an empty one: its own keys' defaults and checks apply, not
                # a code default (RemoteHostConfig's trunk factory has a placeholder main host).
                values[name] = _build(
                    hints[name], {}, source=source, text=text, prefix=dotted + "."
                )
                continue
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key '{dotted}'")
            continue
        values[name] = _convert(hints[name], raw[name], source=source, text=text, dotted=dotted)
    try:
        return cls(**values)
    except ValueError as exc:  # __post_init__ validation names its own key
        named = re.search(r"key '([^']+)'", str(exc))
        line = _line_of(text, named.group(1)) if named else ""
        raise ConfigError(f"{source}: {exc}{line}") from None


def _convert(hint: Any, value: Any, *, source: str, text: str, dotted: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(
            f"{source}: key '{dotted}'{_line_of(text, dotted)} must be {expected}, not {value!r}"
        )

    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source=source, text=text, prefix=dotted + ".")  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or value == "":
            return None
        return _convert(args[0], value, source=source, text=text, dotted=dotted)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(value, list):
            raise bad("a list")
        return tuple(_convert(item, v, source=source, text=text, dotted=dotted) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise bad("a path (string)")
        return Path(value)
    raise ConfigError(f"{source}: key '{dotted}' has a type this loader does not know: {hint}")


def check_port(name: str, value: int, *, allow_zero: bool = True) -> None:
    """Raise ValueError (turned into ConfigError by the loader) if `value` is no port."""
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ValueError(f"key '{name}' must be a port number {low}-65535, not {value}")


def check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"key '{name}' must be greater than 0, not {value}")


def check_ip(name: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"key '{name}' must be an IP address, not {value!r}") from None


def dump(config: Any) -> str:
    """Serialize a config dataclass to TOML, with each field's doc comment above it."""
    out: list[str] = []
    _dump_table(config, "", out)
    return "\n".join(out).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        return '""'
    raise TypeError(f"cannot write {value!r} as TOML")


_TOML_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_char(char: str) -> str:
    # TOML 1.0 "String": a basic string holds no control character (U+0000-U+001F, U+007F) raw.
    if char in _TOML_ESCAPES:
        return _TOML_ESCAPES[char]
    if char < " " or char == "\x7f":
        return f"\\u{ord(char):04X}"
    return char


def _dump_table(config: Any, name: str, out: list[str]) -> None:
    scalars: list[tuple[dataclasses.Field[Any], Any]] = []
    tables: list[tuple[str, Any]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            tables.append((f.name, value))
        else:
            scalars.append((f, value))
    if name:
        out.append("")
        out.append(f"[{name}]")
    for f, value in scalars:
        doc = f.metadata.get("doc")
        if doc:
            out.extend(f"# {line}" for line in doc.splitlines())
        out.append(f"{f.name} = {_toml_value(value)}")
    for sub, value in tables:
        _dump_table(value, f"{name}.{sub}" if name else sub, out)


def field(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a doc string that `dump` writes as a comment."""
    if isinstance(default, list | dict):
        raise TypeError("use tuples for list defaults: configs are frozen")
    return dataclasses.field(default=default, metadata={"doc": doc})
