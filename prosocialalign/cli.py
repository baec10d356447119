"""``prosocial`` — the project's single command line, the top of the import graph.

``prosocial serve`` starts the OpenAI-compatible server and ``prosocial model prepare`` builds the default model;
the reward model, harm vector and evaluation packages each add their sub-commands through ``register``. This module
is the only one that imports every layer (see ``docs/architecture.md``).
"""

from __future__ import annotations

import argparse
import sys

from evals import cli as evals_cli
from harmvec import cli as harmvec_cli
from prosocialalign.core.models import ModelPrepError, prepare_default_model
from rewardmodel import cli as rewardmodel_cli
from server import cli as server_cli


def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="manage the embedded default model")
    msub = p.add_subparsers(dest="model_command", required=True)
    prep = msub.add_parser("prepare", help="convert the embedded GGUF into a HF checkpoint folder (once)")
    prep.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    prep.set_defaults(func=_model_prepare)


def _model_prepare(args: argparse.Namespace) -> int:
    try:
        print(prepare_default_model(force=args.force))
    except ModelPrepError as exc:
        print(f"prosocial model prepare: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prosocial", description="ProSocialAlign: safe, prosocial decoding on vLLM"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    server_cli.register(sub)
    _add_model(sub)
    for package_cli in (rewardmodel_cli, harmvec_cli, evals_cli):
        package_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
