"""``prosocial harmvec {build,restrict,merge,sweep}``: the directional-regulation commands.

Heavy imports (torch, transformers, vllm) happen inside the handlers so ``prosocial --help`` stays fast.
``python -m harmvec.cli ...`` runs the same commands without the top-level console script.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from harmvec.paths import (
    DEFAULT_BUILD_WORK_DIR,
    DEFAULT_CONTRASTIVE_WORK_DIR,
    DEFAULT_PLOT,
    DEFAULT_REDIRECT_ADAPTER_DIR,
    DEFAULT_REDIRECT_WORK_DIR,
    DEFAULT_REPORT,
    DEFAULT_SWEEP_WORK_DIR,
    DEFAULT_VECTOR_DIR,
)


def _fraction_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error


def _point_list(text: str) -> list[tuple[float, float]]:
    try:
        pairs = [part.split(":") for part in text.split(",") if part.strip()]
        return [(float(lam), float(top_k)) for lam, top_k in pairs]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected LAMBDA:TOP_K pairs separated by commas, got {text!r}"
        ) from error


def _recipe_spec(text: str):
    """``NAME=DIR;points=L:K,L:K[;layers=A-B][;modules=m1,m2]``: one recipe of a comparative sweep."""
    from harmvec.sweep import Recipe

    name, _, rest = text.partition("=")
    folder, *options = rest.split(";")
    if not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR;points=L:K,..., got {text!r}")
    fields = {}
    for option in options:
        key, _, value = option.partition("=")
        fields[key.strip()] = value.strip()
    unknown = sorted(set(fields) - {"points", "layers", "modules"})
    if unknown or "points" not in fields:
        raise argparse.ArgumentTypeError(
            f"{text!r}: needs points=..., may have layers=, modules= (got {unknown})"
        )
    return Recipe(
        name,
        Path(folder),
        _point_list(fields["points"]),
        _layer_range(fields["layers"]) if "layers" in fields else None,
        tuple(m for m in fields["modules"].split(",") if m) if "modules" in fields else None,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _command_line() -> str:
    """The command as a user would type it, whichever entry point ran it."""
    args = sys.argv[1:]
    if args[:1] != ["harmvec"]:
        args = ["harmvec", *args]
    return "prosocial " + " ".join(shlex.quote(arg) for arg in args)


def _setup_logging() -> None:
    """Progress logs at INFO unless the top-level CLI configured logging already (basicConfig is then a no-op)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _resolve_base(base: str | None) -> Path:
    if base:
        return Path(base)
    from prosocialalign.core.models import prepare_default_model

    return prepare_default_model()


def _run_build(args: argparse.Namespace) -> int:
    _setup_logging()
    from harmvec.build import (
        BuildConfig,
        build_contrastive_vector,
        build_harm_vector,
        build_redirect_adapter,
        contrastive_config,
        redirect_config,
    )

    settings = {"seed": args.seed, "rank": args.rank, "alpha": args.alpha}
    if args.max_length is not None:  # else the recipe's own length
        settings["max_length"] = args.max_length
    out = args.out or DEFAULT_VECTOR_DIR
    if args.recipe == "contrastive":
        config, build = contrastive_config(**settings), build_contrastive_vector
        work_dir = args.work_dir or DEFAULT_CONTRASTIVE_WORK_DIR
        checkpoints = [work_dir / side / "checkpoint.pt" for side in ("harmful", "safe")]
    elif args.recipe == "redirect":
        config, build = redirect_config(**settings), build_redirect_adapter
        work_dir = args.work_dir or DEFAULT_REDIRECT_WORK_DIR
        checkpoints = [work_dir / "checkpoint.pt"]
        out = args.out or DEFAULT_REDIRECT_ADAPTER_DIR
    else:
        config, build = BuildConfig(**settings), build_harm_vector
        work_dir = args.work_dir or DEFAULT_BUILD_WORK_DIR
        checkpoints = [work_dir / "checkpoint.pt"]
    if args.restart:
        for checkpoint in checkpoints:
            checkpoint.unlink(missing_ok=True)
    try:
        written = build(
            _resolve_base(args.base),
            out_dir=out,
            work_dir=work_dir,
            data_dir=args.data_dir,
            config=config,
            command=_command_line(),
            overwrite=args.overwrite,
            max_steps=args.max_steps,
            checkpoint_every=args.checkpoint_every,
            threads=args.threads,
        )
    except (FileExistsError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{args.recipe} build written to {written}"
        if written
        else "stopped early; rerun the same command to resume"
    )
    return 0


def _layer_range(text: str) -> tuple[int, int]:
    try:
        first, _, last = text.partition("-")
        low, high = int(first), int(last or first)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a layer range such as 10-19, got {text!r}") from error
    if low < 0 or high < low:
        raise argparse.ArgumentTypeError(f"expected 0 <= FIRST <= LAST, got {text!r}")
    return low, high


def _run_restrict(args: argparse.Namespace) -> int:
    from harmvec.merge import MergeError, atomic_output_dir
    from harmvec.vector import HarmVector, HarmVectorError

    modules = tuple(m for m in args.modules.split(",") if m) if args.modules else None
    try:
        vector = HarmVector.load(args.vector).restricted(args.layers, modules)
        with atomic_output_dir(args.out, args.overwrite) as tmp:
            vector.save(tmp)
    except (HarmVectorError, MergeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"restricted vector ({len(vector.weight_names())} weights) written to {args.out}")
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    _setup_logging()
    from harmvec.merge import MergeError, merge_folder

    try:
        out = merge_folder(args.base, args.vector, args.lam, args.top_k, args.out, overwrite=args.overwrite)
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    _setup_logging()
    from harmvec.merge import MergeError
    from harmvec.sweep import SweepConfig, run_sweep

    config = SweepConfig(
        lambdas=args.lambdas,
        top_ks=args.top_ks,
        points=args.points,
        n_harmful=args.n_harmful,
        n_xstest=args.n_xstest,
        n_perplexity=args.n_perplexity,
        max_tokens=args.max_tokens,
        seed=args.seed,
        max_perplexity_increase=args.max_perplexity_increase,
        max_xstest_drop=args.max_xstest_drop,
        kv_cache_gib=args.kv_cache_gib,
        point_timeout_s=args.point_timeout,
        outcome_sets=not args.no_outcomes,
        n_everyday=args.n_everyday,
        n_distress=args.n_distress,
        max_benign_drop=args.max_benign_drop,
    )
    try:
        report = run_sweep(
            _resolve_base(args.base),
            args.vector,
            config,
            report_path=args.report,
            plot_path=args.plot,
            work_dir=args.work_dir,
            data_dir=args.data_dir,
            command=_command_line(),
            write_default=not args.no_default,
            recipes=args.recipe or None,
        )
    except (MergeError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    chosen = report["chosen"]
    print(f"chosen lambda={chosen['lambda']} top_k={chosen['top_k']}; report at {args.report}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``harmvec`` with its ``build``, ``merge`` and ``sweep`` sub-commands."""
    parser = subparsers.add_parser(
        "harmvec", help="harm vector: build, merge, sweep (directional regulation)"
    )
    commands = parser.add_subparsers(dest="harmvec_command", required=True)

    build = commands.add_parser("build", help="fine-tune on harmful chats and store tau_H as LoRA factors")
    build.add_argument("--base", help="base model folder (default: the prepared default model)")
    build.add_argument(
        "--out",
        type=Path,
        help=f"folder to write (default {DEFAULT_VECTOR_DIR}; redirect: {DEFAULT_REDIRECT_ADAPTER_DIR})",
    )
    build.add_argument(
        "--recipe",
        choices=("harmful", "contrastive", "redirect"),
        default="harmful",
        help="harmful: theta_harmful - theta_base (v1); contrastive: theta_harmful - theta_safe (two fine-tunes); "
        "redirect: the redirect adapter (PEFT folder for vLLM's LoRA support)",
    )
    build.add_argument(
        "--work-dir",
        type=Path,
        help=f"checkpoint folder, resumable (default {DEFAULT_BUILD_WORK_DIR} or {DEFAULT_CONTRASTIVE_WORK_DIR})",
    )
    build.add_argument("--data-dir", type=Path, help="shared data folder (default: $PROSOCIAL_DATA_DIR)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--rank", type=_positive_int, default=8)
    build.add_argument("--alpha", type=float, default=16.0)
    build.add_argument(
        "--max-length",
        type=_positive_int,
        help="tokens per chat, truncated (default: the recipe's, 96 or 160)",
    )
    build.add_argument("--max-steps", type=_positive_int, help="stop after this many steps (resume later)")
    build.add_argument("--checkpoint-every", type=_positive_int, default=5)
    build.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's choice)")
    build.add_argument("--restart", action="store_true", help="discard an existing checkpoint")
    build.add_argument("--overwrite", action="store_true", help="replace an existing vector folder")
    build.set_defaults(func=_run_build)

    restrict = commands.add_parser(
        "restrict", help="keep a vector's weights in a layer range / module subset"
    )
    restrict.add_argument("--vector", type=Path, default=DEFAULT_VECTOR_DIR, help="harm vector folder")
    restrict.add_argument("--layers", type=_layer_range, help="inclusive layer range, e.g. 10-19")
    restrict.add_argument("--modules", help="comma-separated projections, e.g. gate_proj,up_proj,down_proj")
    restrict.add_argument("--out", type=Path, required=True, help="output vector folder")
    restrict.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    restrict.set_defaults(func=_run_restrict)

    merge = commands.add_parser("merge", help="write theta_base - lambda * trim_k(tau_H) as an HF folder")
    merge.add_argument("--base", type=Path, required=True, help="base model folder")
    merge.add_argument("--vector", type=Path, default=DEFAULT_VECTOR_DIR, help="harm vector folder")
    merge.add_argument("--lambda", dest="lam", type=float, required=True, help="scaling of tau_H (>= 0)")
    merge.add_argument(
        "--top-k", type=float, required=True, help="fraction of entries kept per tensor, (0, 1]"
    )
    merge.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    merge.set_defaults(func=_run_merge)

    sweep = commands.add_parser("sweep", help="grid over lambda x top-k, measured with vLLM; writes reports")
    sweep.add_argument("--base", help="base model folder (default: the prepared default model)")
    sweep.add_argument("--vector", type=Path, default=DEFAULT_VECTOR_DIR, help="harm vector folder")
    sweep.add_argument("--lambdas", type=_fraction_list, default=[0.5, 1.0, 2.0, 3.0])
    sweep.add_argument("--top-ks", type=_fraction_list, default=[0.1, 1.0])
    sweep.add_argument(
        "--points",
        type=_point_list,
        help="explicit LAMBDA:TOP_K pairs (e.g. 0.1:0.1,1:1) instead of the grid",
    )
    sweep.add_argument(
        "--recipe",
        action="append",
        type=_recipe_spec,
        help="NAME=DIR;points=L:K,...[;layers=A-B][;modules=m1,m2] (repeatable): compare recipes on the same "
        "prompts instead of --vector with the grid",
    )
    sweep.add_argument("--n-harmful", type=_positive_int, default=152, help="dev harmful prompts (all sets)")
    sweep.add_argument("--n-xstest", type=_positive_int, default=48, help="XSTest safe prompts (at most)")
    sweep.add_argument("--n-everyday", type=_positive_int, default=64, help="everyday dev prompts")
    sweep.add_argument("--n-distress", type=_positive_int, default=64, help="emotionally charged dev prompts")
    sweep.add_argument("--max-benign-drop", type=float, default=0.05)
    sweep.add_argument(
        "--no-outcomes", action="store_true", help="earlier samples (harmvec dev split), no outcome judge"
    )
    sweep.add_argument("--n-perplexity", type=_positive_int, default=48, help="benign chats for perplexity")
    sweep.add_argument("--max-tokens", type=_positive_int, default=64, help="greedy tokens per response")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the prompt samples")
    sweep.add_argument("--max-perplexity-increase", type=float, default=0.10)
    sweep.add_argument("--max-xstest-drop", type=float, default=0.05)
    sweep.add_argument("--kv-cache-gib", type=float, default=1.0)
    sweep.add_argument("--point-timeout", type=_positive_int, default=900, help="seconds per grid point")
    sweep.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    sweep.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    sweep.add_argument("--work-dir", type=Path, default=DEFAULT_SWEEP_WORK_DIR)
    sweep.add_argument("--data-dir", type=Path, help="shared data folder (default: $PROSOCIAL_DATA_DIR)")
    sweep.add_argument(
        "--no-default", action="store_true", help="do not write default.json beside the vector"
    )
    sweep.set_defaults(func=_run_sweep)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m harmvec.cli``), same commands as ``prosocial harmvec``."""
    parser = argparse.ArgumentParser(prog="prosocial")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main(["harmvec", *sys.argv[1:]] if sys.argv[1:2] != ["harmvec"] else sys.argv[1:]))
