"""``prosocial`` — the project's single command line.

``prosocial serve`` starts the OpenAI-compatible server; ``prosocial model prepare`` builds the default model;
the reward model, harm vector and evaluation packages add their own sub-commands.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys

from pydantic import ValidationError

logger = logging.getLogger("prosocial")

# Packages that contribute sub-commands through a ``register(subparsers)`` function in their ``cli`` module.
SUBCOMMAND_PACKAGES = ("rewardmodel", "harmvec", "evals")

# serve flag -> ServerSettings field (every field is also a PROSOCIAL_<FIELD> environment variable).
_SERVE_FLAGS: dict[str, dict] = {
    "host": {"help": "bind address (PROSOCIAL_HOST, default 127.0.0.1)"},
    "port": {"type": int, "help": "port (PROSOCIAL_PORT, default 8000)"},
    "model": {"help": "HF checkpoint folder to serve (default: the embedded SmolLM2-135M-Instruct)"},
    "served_model_name": {"help": "model name clients send (default: the folder name)"},
    "dtype": {
        "choices": ["auto", "bfloat16", "float16", "float32"],
        "help": "weights dtype (default bfloat16)",
    },
    "kv_cache_gib": {"type": float, "help": "KV-cache size in GiB (default 1)"},
    "max_model_len": {"type": int, "help": "context length (default 2048)"},
    "max_num_seqs": {"type": int, "help": "max concurrent sequences in the engine (default 64)"},
    "tensor_parallel_size": {"type": int, "help": "GPUs to shard the model over (default 1)"},
    "api_key": {"help": "require 'Authorization: Bearer KEY' on /v1/* (PROSOCIAL_API_KEY)"},
    "safety_threshold": {
        "type": float,
        "help": "safety-margin threshold of the mask (default: the ARM's calibrated one)",
    },
    "response_threshold": {
        "type": float,
        "help": "response guard threshold on the mean safety margin (default: the ARM's calibrated one)",
    },
    "guard_tokens": {"type": int, "help": "tokens after which the response guard judges (default 8)"},
    "beta": {"type": float, "help": "reward temperature beta (default 1)"},
    "default_prefs": {
        "type": json.loads,
        "help": "JSON preferences for requests without any (default: all five equal; '{}': none, "
        "the safety mask only), e.g. '{\"empathy\":1}'",
    },
    "backtrack_attempts": {
        "type": int,
        "help": "regeneration attempts before the fallback message (default 2)",
    },
    "redirect_prefs": {
        "type": json.loads,
        "help": 'JSON preferences of the redirect regime (default \'{"empathy":1,"sensitivity":1}\')',
    },
    "redirect_preamble": {"help": "system text of the redirect regime (default: see docs/method.md)"},
    "redirect_opening": {
        "help": 'first words of a redirected reply (default: "I can\'t help with that, ...")'
    },
    "redirect_max_tokens": {"type": int, "help": "token limit of one redirect attempt (default 64)"},
    "system_prompt": {
        "help": "system message of guided chat requests that bring none (default: the template's)"
    },
    "stream_lag_tokens": {
        "type": int,
        "help": "a guided stream releases a token once this many later tokens were judged (default 16)",
    },
    "fallback_message": {"help": "answer when every attempt was ended too (default: a kind decline)"},
    "crisis_message": {"help": "fallback for requests with a self-harm signal (default: points to help)"},
    "arm_artifact": {"help": "ARM artifact folder (default: the shipped arm-v2)"},
    "candidate_top_k": {
        "type": int,
        "help": "guided rows choose among the base's top-k tokens + EOS (default 256)",
    },
    "max_body_bytes": {"type": int, "help": "largest request body accepted (default 1 MiB)"},
    "max_tokens_limit": {"type": int, "help": "largest max_tokens a request may ask for (default 4096)"},
    "max_n": {"type": int, "help": "largest n a request may ask for (default 8)"},
    "drain_timeout_s": {"type": float, "help": "seconds in-flight requests get after SIGTERM (default 30)"},
}
_SERVE_SWITCHES = {
    "guidance": "load the ARM logits processor (--no-guidance: plain unguided serving)",
    "safety_mask": "apply the ARM safety mask to every request",
    "response_guard": "apply the response guard (mean safety margin of the response) with the mask",
    "coherence_guard": "end a guided draft that loops or runs into symbols (emoji, punctuation)",
    "backtrack": "regenerate a choice guidance ended instead of returning it empty (content_filter)",
    "base_model": "serve the unmodified base weights instead of the harm-vector-merged default",
    "metrics_public": "serve /metrics without the API key",
    "log_requests": "log prompts and completions (off by default)",
}


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server", description=__doc__)
    for field, kwargs in _SERVE_FLAGS.items():
        p.add_argument("--" + field.replace("_", "-"), dest=field, default=None, **kwargs)
    for field, help_text in _SERVE_SWITCHES.items():
        p.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            default=None,
            action=argparse.BooleanOptionalAction,
            help=help_text,
        )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)


def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="manage the embedded default model")
    msub = p.add_subparsers(dest="model_command", required=True)
    prep = msub.add_parser("prepare", help="convert the embedded GGUF into a HF checkpoint folder (once)")
    prep.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    prep.set_defaults(func=_model_prepare)


def _model_prepare(args: argparse.Namespace) -> int:
    from server.model_prep import ModelPrepError, prepare_default_model

    try:
        print(prepare_default_model(force=args.force))
    except ModelPrepError as exc:
        print(f"prosocial model prepare: {exc}", file=sys.stderr)
        return 1
    return 0


def settings_from_args(args: argparse.Namespace):
    """Flags override environment variables; pydantic errors name the flag."""
    from server.settings import ServerSettings

    overrides = {
        field: getattr(args, field)
        for field in list(_SERVE_FLAGS) + list(_SERVE_SWITCHES)
        if getattr(args, field, None) is not None
    }
    try:
        return ServerSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first.get("loc") else "settings"
        raise SystemExit(f"prosocial serve: argument {flag}: {first['msg']}") from None


def _serve(args: argparse.Namespace) -> int:
    from server.runner import run_server

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = settings_from_args(args)
    return asyncio.run(run_server(settings, log_level=args.log_level))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prosocial", description="ProSocialAlign: safe, prosocial decoding on vLLM"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_model(sub)
    for package in SUBCOMMAND_PACKAGES:
        importlib.import_module(f"{package}.cli").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
