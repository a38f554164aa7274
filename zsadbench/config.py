"""Typed method configurations: ``--set key=value`` overrides and flat records for tracking."""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """An override names an unknown key or a value that does not fit the field's type."""


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """Returns ``{"a.b": "value"}`` from ``["a.b=value", ...]`` (the CLI's repeated ``--set``)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Returns ``value`` converted to the annotated type ``hint`` (strings come from the command line)."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} fits none of {hint}")
    if origin is Literal:
        choices = get_args(hint)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith(("[", "(")):
                value = json.loads(text.replace("(", "[").replace(")", "]"))
            else:
                value = [v for v in text.split(",") if v.strip()]
        args = get_args(hint)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(args, value))
        item = args[0] if args else Any
        return origin(_coerce(v, item, key) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if hint in (int, float, str):
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}") from None
    return value


def apply_overrides(config: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """Returns a copy of the dataclass ``config`` with dotted-key overrides applied and type-checked.

    ``prefix`` is the dotted path of ``config`` inside the method config, so that errors name the full option.
    """
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        (nested.setdefault(head, {}).__setitem__(rest, value) if rest else direct.__setitem__(head, value))
    hints = get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for name in set(direct) | set(nested):
        if name not in names:
            raise ConfigError(
                f"{type(config).__name__} has no option {prefix + name!r}; options: "
                f"{', '.join(prefix + n for n in sorted(names))}"
            )
    for name, value in direct.items():
        changes[name] = _coerce(value, hints[name], prefix + name)
    for name, sub in nested.items():
        current = changes.get(name, getattr(config, name))
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{prefix + name} is not a group of options; use --set {prefix + name}=VALUE")
        changes[name] = apply_overrides(current, sub, f"{prefix}{name}.")
    return dataclasses.replace(config, **changes)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Returns ``{"a.b": value}`` for every leaf field of a (nested) dataclass config."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """Returns the config as nested plain dicts (JSON-serialisable)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Returns an instance of dataclass ``cls`` from nested dicts (inverse of :func:`to_dict`)."""
    flat = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(data, "")
    return apply_overrides(cls(), flat)



def describe_options(cls: type, prefix: str = "", default: Any = None) -> list[tuple[str, Any, str]]:
    """Returns (dotted name, default, meaning) of every option of config dataclass ``cls``, groups flattened.

    The meaning is the field's comment in the source (on its line, or the comment lines right above it), so that
    the config's own comments are the documentation `zsadbench methods NAME` prints. A group's defaults are those
    its parent gives it (a method's own ``train`` recipe), not the group class's.
    """
    comments = _field_comments(cls)
    out: list[tuple[str, Any, str]] = []
    default = cls() if default is None else default
    for f in dataclasses.fields(default):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            out += describe_options(type(value), f"{prefix}{f.name}.", value)
        else:
            out.append((prefix + f.name, list(value) if isinstance(value, tuple) else value, comments.get(f.name, "")))
    return out


def _field_comments(cls: type) -> dict[str, str]:
    """Returns the source comment of each annotated field of ``cls`` (trailing, else the block right above)."""
    import inspect
    import io
    import tokenize

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    trailing: dict[int, str] = {}
    try:
        for token in tokenize.generate_tokens(io.StringIO("\n".join(lines)).readline):
            if token.type == tokenize.COMMENT:
                trailing[token.start[0] - 1] = token.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    out: dict[str, str] = {}
    for i, line in enumerate(lines):
        stripped = line.strip()
        name, colon, _ = stripped.partition(":")
        if not colon or not name.isidentifier() or stripped.startswith(("def ", "class ", "#")):
            continue
        if i in trailing and not stripped.startswith("#"):
            out[name] = trailing[i]
            continue
        above: list[str] = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            above.insert(0, lines[j].strip().lstrip("#").strip())
            j -= 1
        if above:
            out[name] = " ".join(above)
    return out
