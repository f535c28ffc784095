"""Command-line options declared once, on the dataclass field they set.

A field made with :func:`option` carries its flag, help and parser; :func:`add_options` turns a dataclass's
fields into argparse arguments and :func:`from_options` reads them back into the dataclass, so a setting is
written in one place. The value parsers for sizes and pairs live here too. No heavy imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None, negate: bool = False,
           cli: bool = True, **argparse_options: Any) -> Any:  # fmt: skip
    """A dataclass field with its command-line option (``--field-name`` unless ``flag``; a True boolean given
    ``negate`` becomes ``--no-field-name``; ``cli=False`` keeps it off the command line)."""
    meta = {"help": help, "flag": flag, "negate": negate, "cli": cli, "argparse": argparse_options}
    return dataclasses.field(default=default, metadata={"option": meta})


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per :func:`option` field of ``cls`` (type, default and ``required`` from the field)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        meta = field.metadata.get("option")
        if meta is None or not meta["cli"]:
            continue
        name = field.name.replace("_", "-")
        extra = dict(meta["argparse"])
        if hints[field.name] is bool:
            flag = meta["flag"] or (f"--no-{name}" if meta["negate"] else f"--{name}")
            extra["action"] = "store_false" if meta["negate"] else "store_true"
        else:
            flag = meta["flag"] or f"--{name}"
            extra.setdefault("type", _scalar(hints[field.name]))
            if field.default is dataclasses.MISSING:
                extra["required"] = True
            else:
                extra["default"] = field.default
        parser.add_argument(flag, dest=field.name, help=meta["help"], **extra)


def from_options(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """The dataclass ``cls`` built from parsed arguments (fields not on the command line keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **overrides})


def _scalar(hint: Any) -> Callable[[str], Any] | None:
    """The parser of a plain annotation (``int``, ``float | None``, ...); None leaves the string as it is."""
    for candidate in (hint, *typing.get_args(hint)):
        if candidate in (int, float):
            return candidate
    return None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def input_size(text: str) -> tuple[int, int]:
    """``HxW`` or a single side ``S`` (square) as (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 224x224) or a single side, got {text!r}")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"input sides must be at least 1, got {text!r}")
    return height, width


def number_pair(text: str) -> tuple[float, float]:
    """``LOW,HIGH``: two positive numbers."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected two positive numbers like 1,2, got {text!r}")
    return values  # type: ignore[return-value]
