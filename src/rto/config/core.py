"""Typed, documented configs: dataclasses whose fields carry their help, range and choices.

A config is a tree of dataclasses. Leaves are declared with `option(...)`, which records the
one-line help that `rto <stage> --help` prints, and the allowed values. Values come, in order of
precedence, from the command line (`--train.lr 1e-5`), a YAML file (`--config FILE`) and the
defaults. Anything unknown, mistyped or out of range is refused before work starts, with the
dotted key in the message.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml

from rto.errors import ConfigError, not_utf8

T = TypeVar("T")


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: typing.Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    default_factory: Any = MISSING,
    paper: str | None = None,
) -> Any:
    """Declare a config leaf.

    `paper` names the symbol or setting of the RTO paper the option stands for (shown in help).
    """
    meta = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "min": min,
        "max": max,
        "min_exclusive": min_exclusive,
        "paper": paper,
    }
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str = "", **overrides: Any) -> Any:
    """Declare a nested section; `overrides` change that section's defaults for this config."""

    def make() -> Any:
        return cls(**overrides)

    return field(default_factory=make, metadata={"help": help, "section": True})


# ----------------------------------------------------------------------------- type handling


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def type_name(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    if optional:
        return f"{type_name(inner)} or null"
    origin = get_origin(tp)
    if origin is list:
        (arg,) = get_args(tp)
        return f"list of {type_name(arg)}"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_NULL = {"null", "none", "~", ""}


def coerce(value: Any, tp: Any, key: str, *, from_text: bool) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`.

    `from_text` is True for command-line values, which arrive as strings and are parsed; values
    from YAML must already have the right type (an int is accepted where a float is expected).
    """
    optional, inner = _is_optional(tp)
    if optional:
        if value is None or (from_text and isinstance(value, str) and value.lower() in _NULL):
            return None
        return coerce(value, inner, key, from_text=from_text)
    if value is None:
        raise ConfigError(f"config key '{key}' must be a {type_name(tp)}, not null")
    origin = get_origin(tp)
    if origin is list:
        (item_tp,) = get_args(tp)
        if from_text and isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
                return [
                    coerce(v, item_tp, f"{key}[{i}]", from_text=False) for i, v in enumerate(value)
                ]
            value = [v.strip() for v in text.split(",") if v.strip()] if text else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a {type_name(tp)}, got {value!r}")
        return [coerce(v, item_tp, f"{key}[{i}]", from_text=from_text) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer() and not from_text:
            return int(value)
        if from_text and isinstance(value, str):
            try:
                number = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                number = None
            if isinstance(number, int) or (isinstance(number, float) and number.is_integer()):
                return int(number)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return number  # inf and nan are refused by _check_range
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for key {key}")


def _check_range(value: Any, meta: dict[str, Any], key: str) -> None:
    choices = meta.get("choices")
    if choices is not None and value is not None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v not in choices:
                allowed = ", ".join(repr(c) for c in choices)
                raise ConfigError(
                    f"config key '{key}' = {v!r} is not allowed; choose one of {allowed}"
                )
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, float) and not math.isfinite(value):
        # no option means anything at inf or nan: they would train a model of NaNs, or crash
        raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            sign = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(
                f"config key '{key}' = {value} is out of range; it must be {sign} {lo}"
            )
        if hi is not None and value > hi:
            raise ConfigError(f"config key '{key}' = {value} is out of range; it must be <= {hi}")


# ----------------------------------------------------------------------------- build / merge


def renamed_key(cfg: Any, key: str) -> tuple[str, str] | None:
    """(the key to use instead, how a value carries over) when dotted `key` of config `cfg` (a
    dataclass instance or class) is one an earlier version of rto had: each section lists its
    own in a class attribute RENAMED = {old key: (new key, note)}, both relative to it."""
    node = cfg() if isinstance(cfg, type) else cfg
    parts, prefix = key.split("."), ""
    for i, part in enumerate(parts):
        table = getattr(type(node), "RENAMED", {})
        rest = ".".join(parts[i:])
        if rest in table:
            new, note = table[rest]
            return prefix + new, note
        f = {f.name: f for f in fields(node)}.get(part)
        if f is None or not f.metadata.get("section"):
            return None
        node, prefix = getattr(node, part), prefix + part + "."
    return None


def renamed_error(old: str, new: str, note: str, where: str = "", dashes: str = "") -> ConfigError:
    """The one line for a key that was renamed (`dashes` "--" on the command line)."""
    how = f" ({note})" if note else ""
    kind = "option" if dashes else "config key"
    return ConfigError(f"{kind} '{dashes}{old}'{where} was renamed: use '{dashes}{new}'{how}")


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(
        f"unknown config key '{key}'{where}.{hint} Allowed keys here: {', '.join(sorted(known))}"
    )


def apply(
    cfg: Any, updates: dict[str, Any], *, prefix: str = "", from_text: bool = False, where: str = ""
) -> None:
    """Set nested values of the dataclass `cfg` in place from a (nested) dict."""
    if not isinstance(updates, dict):
        raise ConfigError(
            f"config section '{prefix.rstrip('.') or '<top>'}'{where} must be a mapping, got {updates!r}"
        )
    hints = _resolved_hints(type(cfg))
    by_name = {f.name: f for f in fields(cfg)}
    for raw_key, value in updates.items():
        key = str(raw_key)
        if "." in key:  # dotted keys at any level: {"train.lr": 1e-5}
            head, rest = key.split(".", 1)
            apply(cfg, {head: {rest: value}}, prefix=prefix, from_text=from_text, where=where)
            continue
        dotted = prefix + key
        f = by_name.get(key)
        if f is None:
            renamed = renamed_key(cfg, key)
            if renamed is not None:
                raise renamed_error(dotted, prefix + renamed[0], renamed[1], where)
            raise _unknown_key(dotted, list(by_name), where)
        if f.metadata.get("section"):
            apply(getattr(cfg, key), value, prefix=dotted + ".", from_text=from_text, where=where)
            continue
        choices = f.metadata.get("choices") or ()
        if isinstance(value, bool) and "true" in choices:  # YAML true / false for a named choice
            value = str(value).lower()
        try:
            new = coerce(value, hints[key], dotted, from_text=from_text)
            _check_range(new, f.metadata, dotted)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{where}") from None
        setattr(cfg, key, new)


def validate(cfg: Any, prefix: str = "") -> None:
    """Range-check every leaf and run each section's own `check()` (cross-field rules)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("section"):
            validate(value, prefix + f.name + ".")
        else:
            _check_range(value, f.metadata, prefix + f.name)
    check = getattr(cfg, "check", None)
    if callable(check):
        check()


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    raw = p.read_bytes()
    try:
        data = yaml.safe_load(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError("config " + not_utf8(p, raw, exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p} must hold a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def build(
    cls: type[T],
    *,
    file_values: dict[str, Any] | None = None,
    file_name: str | None = None,
    cli_values: dict[str, Any] | None = None,
    base: T | None = None,
) -> T:
    """Defaults (or `base`) <- YAML values <- command-line values, then validate."""
    cfg = base if base is not None else cls()
    presets = getattr(cls, "PRESETS", None)
    if presets:  # a preset sets its keys first; the file and the command line still override them
        name = (cli_values or {}).get("preset") or (file_values or {}).get("preset")
        if name is not None:
            if name not in presets:
                raise ConfigError(
                    f"config key 'preset' = {name!r} is not allowed; choose one of {', '.join(presets)}"
                )
            apply(cfg, dict(presets[name]))
    if file_values:
        apply(cfg, file_values, where=f" (in {file_name})" if file_name else "")
    if cli_values:
        apply(cfg, cli_values, from_text=True, where="")
    try:
        validate(cfg)
    except ConfigError as exc:  # a rule across keys: say which file (and pipeline stage) set them
        if file_name and file_name not in str(exc):
            raise ConfigError(f"{exc} (in {file_name})") from None
        raise
    return cfg


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def iter_leaves(
    cls_or_cfg: Any, prefix: str = ""
) -> typing.Iterator[tuple[str, Any, Any, dict[str, Any]]]:
    """Yield (dotted key, type, default, metadata) for every leaf of a config class or instance."""
    cfg = cls_or_cfg() if isinstance(cls_or_cfg, type) else cls_or_cfg
    assert is_dataclass(cfg)
    hints = _resolved_hints(type(cfg))
    for f in fields(cfg):
        if f.metadata.get("section"):
            yield from iter_leaves(getattr(cfg, f.name), prefix + f.name + ".")
        else:
            yield prefix + f.name, hints[f.name], getattr(cfg, f.name), dict(f.metadata)
