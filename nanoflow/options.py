"""Options as dataclass fields: each field's default, help and choices are written once, and the
CLI's flags (``--field-name``) and the keyword arguments read back from them are derived."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

HELP, CHOICES = "help", "choices"
REQUIRED = dataclasses.MISSING  # an option without a default: a required flag


def option(default: Any, help: str, choices: Sequence[Any] | None = None) -> Any:
    """A dataclass field with the help sentence (and choices) of its flag."""
    return dataclasses.field(default=default, metadata={HELP: help, CHOICES: choices})


def option_like(cls: type, name: str, default: Any = dataclasses.MISSING) -> Any:
    """A field with the help, choices and (unless given) default of ``cls``'s field ``name``:
    another options class that shares a setting reuses it instead of restating it."""
    source = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = source.default if default is dataclasses.MISSING else default
    return dataclasses.field(default=value, metadata=dict(source.metadata))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(hint: Any) -> type:
    """The flag's type: the annotation without its ``| None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: Iterable[str] = (),
    only: Iterable[str] | None = None,
) -> None:
    """A flag for every field of ``cls`` that has help text (of those in ``only``, when given),
    except those in ``skip``."""
    skipped, wanted = set(skip), None if only is None else set(only)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skipped or HELP not in f.metadata:
            continue
        if wanted is not None and f.name not in wanted:
            continue
        kind = _scalar(hints[f.name])
        kwargs: dict[str, Any] = {"help": f.metadata[HELP]}
        if f.default is REQUIRED:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if f.metadata.get(CHOICES):
                kwargs["choices"] = list(f.metadata[CHOICES])
        parser.add_argument(flag(f.name), **kwargs)


def options_from(args: argparse.Namespace, cls: type, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The values of ``cls``'s flags in ``args``, by field name."""
    skipped = set(skip)
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.name not in skipped and HELP in f.metadata and hasattr(args, f.name)
    }
