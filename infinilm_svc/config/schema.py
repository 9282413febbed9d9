"""Strict conversion of TOML tables into frozen dataclasses, collecting every problem with its line."""
from __future__ import annotations

import collections.abc
import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class ConfigError(Exception):
    """Raised with every problem found in one or more config files."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class Source:
    """A TOML file's text, for finding the line of a key, and the problem list being filled."""

    _HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
    _KEY = re.compile(r"^\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*=")

    def __init__(self, path: str, text: str, problems: list[Problem] | None = None) -> None:
        self.path = path
        self.text = text
        self.problems: list[Problem] = problems if problems is not None else []
        self._index: dict[tuple[str, ...], int] = {}
        self._index_lines()

    @classmethod
    def read(cls, path: str | Path, problems: list[Problem] | None = None) -> tuple["Source", dict | None]:
        """Read and parse a file; on failure the problem is recorded and the data is None."""
        path = str(path)
        probs = problems if problems is not None else []
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            probs.append(Problem(path, None, "", f"cannot read file: {exc.strerror or exc}"))
            return cls(path, "", probs), None
        src = cls(path, text, probs)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            line = getattr(exc, "lineno", None)
            if line is None:
                m = re.search(r"line (\d+)", str(exc))
                line = int(m.group(1)) if m else None
            probs.append(Problem(path, line, "", f"invalid TOML: {exc}"))
            return src, None
        return src, data

    def _index_lines(self) -> None:
        table: tuple[str, ...] = ()
        for no, line in enumerate(self.text.splitlines(), start=1):
            m = self._HEADER.match(line)
            if m and not line.lstrip().startswith("[["):
                table = tuple(p.strip().strip("\"'") for p in m.group(1).split("."))
                self._index.setdefault(table, no)
                continue
            m = self._KEY.match(line)
            if m:
                key = m.group(1).strip("\"'")
                self._index.setdefault(table + (key,), no)

    def line_of(self, path: tuple[str, ...]) -> int | None:
        """Best-effort line of a dotted key (or of its nearest enclosing table)."""
        p = tuple(path)
        while p:
            if p in self._index:
                return self._index[p]
            p = p[:-1]
        return None

    def problem(self, path: tuple[str, ...], message: str) -> None:
        self.problems.append(Problem(self.path, self.line_of(path), ".".join(path), message))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        inner = (typing.get_args(tp) or (Any,))[0]
        return f"array of {_type_name(inner)}s"
    if origin in (dict, collections.abc.Mapping):
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


_MISSING = object()


def _convert(tp: Any, value: Any, src: Source, path: tuple[str, ...]) -> Any:
    """Convert one TOML value to the annotated type; record a problem and return _MISSING if wrong."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        # The first alternative that accepts the value wins; the alternatives' complaints are dropped.
        kept = src.problems
        try:
            for alt in (a for a in typing.get_args(tp) if a is not type(None)):
                src.problems = []
                out = _convert(alt, value, src, path)
                if out is not _MISSING:
                    return out
        finally:
            src.problems = kept
        src.problem(path, f"expected {_type_name(tp)}, got {_toml_type(value)}")
        return _MISSING
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            src.problem(path, f"expected {_type_name(tp)}, got {_toml_type(value)}")
            return _MISSING
        inner = (typing.get_args(tp) or (Any,))[0]
        out = []
        ok = True
        for item in value:
            v = _convert(inner, item, src, path)
            if v is _MISSING:
                ok = False
            out.append(v)
        return tuple(out) if ok else _MISSING
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        if not isinstance(value, dict):
            src.problem(path, f"expected a table, got {_toml_type(value)}")
            return _MISSING
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        out = {}
        ok = True
        for k, v in value.items():
            cv = _convert(vt, v, src, path + (str(k),))
            if cv is _MISSING:
                ok = False
            out[str(k)] = cv
        return types.MappingProxyType(out) if ok else _MISSING
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            src.problem(path, f"expected a table, got {_toml_type(value)}")
            return _MISSING
        return load_table(tp, value, src, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        if isinstance(value, tp):
            return value
    src.problem(path, f"expected {_type_name(tp)}, got {_toml_type(value)} {value!r}")
    return _MISSING


_TOML_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (dict, "table"))


def _toml_type(value: Any) -> str:
    """The TOML name of a parsed value's type (bool before int: bool is an int in Python)."""
    return next((name for t, name in _TOML_TYPES if isinstance(value, t)), type(value).__name__)


def load_table(cls: type, table: dict, src: Source, path: tuple[str, ...] = ()) -> Any:
    """Build dataclass `cls` from `table`: unknown keys, wrong types and failed checks are problems.

    Returns an instance (defaults filling in for bad values so later checks still run), or
    _MISSING if a required key is absent. A dataclass may define `check(self) -> list[(key, msg)]`.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    kwargs: dict[str, Any] = {}
    missing = False
    before = len(src.problems)
    for key, value in table.items():
        if key not in fields:
            src.problem(path + (key,), f"unknown key (known keys here: {', '.join(sorted(fields))})")
            continue
        conv = _convert(hints[key], value, src, path + (key,))
        if conv is not _MISSING:
            kwargs[key] = conv
    for name, f in fields.items():
        if name in kwargs:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if not any(p.key == ".".join(path + (name,)) for p in src.problems[before:]):
                src.problem(path + (name,), f"required key is missing ({_type_name(hints[name])})")
            missing = True
    if missing:
        return _MISSING
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        src.problem(path, str(exc))
        return _MISSING
    check = getattr(obj, "check", None)
    if check is not None:
        for key, msg in check():
            src.problem(path + ((key,) if key else ()), msg)
    return obj


def is_missing(value: Any) -> bool:
    return value is _MISSING


def check_port(value: int) -> str | None:
    """None if `value` is a valid TCP port, else the complaint."""
    if not 1 <= value <= 65535:
        return f"port must be between 1 and 65535, got {value}"
    return None


def check_positive(value: float, name: str, allow_zero: bool = False) -> str | None:
    if value < 0 or (value == 0 and not allow_zero):
        return f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}"
    return None


def check_url(value: str | None) -> str | None:
    if value is None:
        return None
    if not re.match(r"^https?://[^/\s]+", value):
        return f"expected an http:// or https:// URL, got {value!r}"
    return None


def check_urls(value: str | tuple[str, ...] | None) -> str | None:
    """A URL, several (a list, or one string with commas), or none; each must be http(s)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    if not [i for i in items if i.strip()]:
        return "expected at least one http:// or https:// URL"
    for item in items:
        if (m := check_url(item.strip())):
            return m
    return None


__all__ = [
    "check_urls", "ConfigError", "Problem", "Source", "load_table", "is_missing", "check_port", "check_positive",
    "check_url", "field", "dataclass",
]
