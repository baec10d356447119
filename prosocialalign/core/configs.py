"""Command-line flags generated from a config dataclass, so that each default and help text is written once.

A field becomes ``--field-name`` (or ``metadata["flag"]``) with the field's type, default and
``metadata["help"]``; a bool becomes a ``--flag / --no-flag`` pair; ``X | None`` reads as ``X``;
``metadata["type"]`` overrides the parser (e.g. a positive-int check, so argparse names the flag in its error);
``metadata["choices"]`` restricts the values; ``metadata["cli"] = False`` keeps a field off the command line. Declare fields with ``option``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def option(
    default: Any = dataclasses.MISSING, *, help: str = "", flag: str | None = None, **metadata: Any
) -> Any:
    """A dataclass field with its command-line help (and, optionally, flag name and parser)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, **metadata})


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _plain_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def add_config_arguments(
    parser: argparse.ArgumentParser, config: type, only: Iterable[str] | None = None
) -> list[str]:
    """Add a flag per field of the dataclass ``config`` (or of the fields named in ``only``); returns the names."""
    hints = typing.get_type_hints(config)
    wanted = set(only) if only is not None else None
    added = []
    for field in dataclasses.fields(config):
        if field.metadata.get("cli") is False or (wanted is not None and field.name not in wanted):
            continue
        annotation = _plain_type(hints[field.name])
        if dataclasses.is_dataclass(annotation):
            continue
        default = (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        )
        flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": field.name, "default": default}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = field.metadata.get("type") or (Path if annotation is Path else annotation)
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
            if "choices" in field.metadata:
                kwargs["choices"] = field.metadata["choices"]
        help_text = field.metadata.get("help", "")
        kwargs["help"] = f"{help_text} (default: %(default)s)".strip()
        parser.add_argument(flag, **kwargs)
        added.append(field.name)
    return added


def config_from_args(
    config: Callable[..., Any], args: argparse.Namespace, names: Iterable[str], **extra: Any
):
    """The config built from the parsed flags ``names`` (as ``add_config_arguments`` returned them) and ``extra``."""
    return config(**{name: getattr(args, name) for name in names}, **extra)
