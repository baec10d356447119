"""``prosocial serve``: its flags are generated from ``ServerSettings``, so each default and help text is written
once (in the settings class) and every flag is also a ``PROSOCIAL_<FIELD>`` environment variable."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import types
import typing
from pathlib import Path

from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo

from server.settings import ServerSettings

_LONGEST_SHOWN_DEFAULT = 60


def _flag_type(annotation: typing.Any) -> dict[str, typing.Any]:
    """argparse keywords for a settings field's type (``X | None`` reads as ``X``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if typing.get_origin(annotation) is dict:
        return {"type": json.loads, "metavar": "JSON"}
    if annotation in (int, float):
        return {"type": annotation}
    if annotation in (str, Path, SecretStr):
        return {"type": str}
    raise TypeError(f"no command-line form for a setting of type {annotation!r}")


def _help(name: str, info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    if isinstance(default, dict):
        default = json.dumps(default) if default else "{}"
    shown = "none" if default is None else str(default)
    if len(shown) > _LONGEST_SHOWN_DEFAULT:
        shown = "built in"
    description = (info.description or name.replace("_", " ")).rstrip(".")
    env = f"env PROSOCIAL_{name.upper()}"
    if default is None and "default" in description:  # the description says what None means
        return f"{description} ({env})".replace("%", "%%")
    return f"{description} (default: {shown}; {env})".replace("%", "%%")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server", description=__doc__)
    for name, info in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, default=None, help=_help(name, info), **_flag_type(info.annotation))
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Flags override environment variables; pydantic errors name the flag."""
    overrides = {
        name: getattr(args, name)
        for name in ServerSettings.model_fields
        if getattr(args, name, None) is not None
    }
    try:
        return ServerSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first.get("loc") else "settings"
        raise SystemExit(f"prosocial serve: argument {flag}: {first['msg']}") from None


def _serve(args: argparse.Namespace) -> int:
    from server.runner import run_server  # vLLM loads only when serving, not for every `prosocial` command

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = settings_from_args(args)
    return asyncio.run(run_server(settings, log_level=args.log_level))
