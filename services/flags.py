"""Flags from config dataclasses: a field is a setting, its default is the only default.

    @dataclass(kw_only=True)
    class ExpertConfig(...):
        shard_id: int = setting(help="this shard's index")              # required: no default
        flush_interval: float = setting(1.0, help="seconds between load-counter flushes")

``add_flags(parser, cls)`` declares ``--shard-id`` and ``--flush-interval`` (``str``, ``int``,
``float``, ``bool`` and ``X | None`` fields; ``choices`` from the metadata); ``from_args(cls, ns)``
builds the config back from parsed flags; ``to_argv(config)`` is the one way a launcher turns a
config into the command line that parses back to it (only fields that differ from their default).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
_SCALARS = (str, int, float, bool)


def setting(default: Any = dataclasses.MISSING, *, help: str, choices: tuple | None = None,
            low: float | None = None, high: float | None = None) -> Any:
    """A config field that is also a flag; without ``default`` the flag is required. ``choices`` and
    the bounds ``[low, high]`` are checked when a flag or a mapping sets it (and go into the chart's schema)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high})


def same_as(cls: type, name: str, *, help: str | None = None) -> Any:
    """A setting with the default, choices and bounds of ``cls``'s setting ``name`` (its help, unless given)."""
    f = next(f for f in settings(cls) if f.name == name)
    meta = f.metadata
    return setting(f.default, help=help or meta["help"], choices=meta["choices"], low=meta["low"], high=meta["high"])


def check(f: dataclasses.Field, value: Any) -> None:
    """ValueError naming the flag when ``value`` is outside ``f``'s choices or bounds (None is always fine)."""
    meta = f.metadata
    if value is None:
        return
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ValueError(f"{flag_name(f.name)}: must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if (meta["low"] is not None and value < meta["low"]) or (meta["high"] is not None and value > meta["high"]):
        bounds = f"in [{meta['low']}, {meta['high']}]" if meta["high"] is not None else f">= {meta['low']}"
        raise ValueError(f"{flag_name(f.name)}: must be {bounds}, got {value!r}")


def flag_name(name: str) -> str:
    """``micro_batch_min_tokens`` -> ``--micro-batch-min-tokens``."""
    return "--" + name.replace("_", "-")


def scalar_type(cls: type, name: str) -> type:
    """The scalar type of field ``name`` (``int`` for ``int | None``)."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint not in _SCALARS:
        raise TypeError(f"{cls.__name__}.{name}: a flag field must be str, int, float or bool (or None), got {hint}")
    return hint


def settings(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are flags (declared with ``setting``), in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per setting of ``cls``, with its default and help."""
    for f in settings(cls):
        kind, required = scalar_type(cls, f.name), f.default is dataclasses.MISSING
        shown = "" if required or f.default is None else f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
            continue
        choices = f.metadata["choices"]
        metavar = "{" + ",".join(choices) + "}" if choices else None
        parser.add_argument(flag_name(f.name), type=_checked(f, kind), required=required, metavar=metavar,
                            default=None if required else f.default, help=f.metadata["help"] + shown)


def _checked(f: dataclasses.Field, kind: type):
    """``kind`` as an argparse type that also checks ``f``'s choices and bounds."""
    def parse(text: str):
        value = kind(text)
        try:
            check(f, value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None
        return value
    parse.__name__ = kind.__name__          # argparse names it in "invalid int value: 'x'"
    return parse


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config of ``cls`` from parsed flags."""
    values = {f.name: getattr(args, f.name) for f in settings(cls) if hasattr(args, f.name)}
    return cls(**values)


def from_dict(cls: type[T], values: dict[str, Any], **fixed: Any) -> T:
    """The config of ``cls`` from ``values`` (for example a Ray config file's mapping); a name that
    is not a setting of ``cls`` or is set by the launcher (``fixed``) is a ``ValueError`` naming it."""
    by_name = {f.name: f for f in settings(cls)}
    for name, value in values.items():
        if name not in by_name:
            raise ValueError(f"{cls.__name__} has no setting {name!r} (settings: {', '.join(sorted(by_name))})")
        if name in fixed:
            raise ValueError(f"{cls.__name__}.{name} is set by the launcher; it cannot be overridden")
        kind = scalar_type(cls, name)
        if value is not None and not _is_a(kind, value):
            raise ValueError(f"{cls.__name__}.{name} must be {kind.__name__}, got {value!r}")
        check(by_name[name], value)
    return cls(**{**values, **fixed})


def _is_a(kind: type, value: Any) -> bool:
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def to_argv(config: Any) -> list[str]:
    """Flags that parse back to ``config``: every required setting and every one not at its default."""
    argv = []
    for f in settings(type(config)):
        value = getattr(config, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if isinstance(value, bool):
            argv.append(flag_name(f.name) if value else "--no-" + flag_name(f.name)[2:])
        elif value is not None:
            argv.append(f"{flag_name(f.name)}={value}")
    return argv
