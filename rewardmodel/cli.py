"""``prosocial rewardmodel ...`` sub-commands.

Each sub-command has its own ``_add_<name>_command(sub)`` helper that adds its parser and sets ``func`` to a
handler taking the parsed ``args`` and returning an exit code; ``register`` just calls them in turn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prosocialalign.core.configs import add_config_arguments, config_from_args, positive_float, positive_int
from prosocialalign.core.paths import default_data_dir
from rewardmodel.config import DEFAULT_PAIR_DIR, ArmConfig, EvalConfig, TrainConfig
from rewardmodel.paths import SERVED_ARM, TRAINED_ARM


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``rewardmodel`` command and its sub-commands to the top-level parser's sub-parsers."""
    parser = subparsers.add_parser("rewardmodel", help="build data for, train and evaluate the reward model")
    sub = parser.add_subparsers(dest="rewardmodel_command", metavar="COMMAND", required=True)
    _add_data_command(sub)
    _add_train_command(sub)
    _add_eval_command(sub)
    _add_calibrate_command(sub)
    _add_safety_head_command(sub)
    return parser


def _add_data_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "data",
        help="build the preference-pair splits from the shared data",
        description="Build (prompt, chosen, rejected) pairs for every attribute and write "
        "train/validation/test JSONL files, then print the counts per attribute and split.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with the source datasets (default: $PROSOCIAL_DATA_DIR, else <repo>/../shared/data)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_PAIR_DIR, help=f"output folder (default: {DEFAULT_PAIR_DIR})"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for sampling the capped sources (default: 0)"
    )
    parser.set_defaults(func=_run_data)


def _run_data(args: argparse.Namespace) -> int:
    from rewardmodel import data

    data_dir = _shared_data_dir(args.data_dir)
    if data_dir is None:
        return 2
    try:
        pairs = data.build_pairs(data_dir, seed=args.seed)
    except FileNotFoundError as error:
        return _fail(f"--data-dir {data_dir} lacks a source file: {error}")
    counts = data.write_splits(pairs, args.out)
    print(f"wrote {sum(cells['total'] for cells in counts.values())} pairs to {args.out}")
    print(data.format_counts_table(counts))
    print()
    print(data.format_counts_table(data.count_pairs(pairs, by_source=True), row_label="attribute / source"))
    return 0


def _shared_data_dir(given: Path | None) -> Path | None:
    """``--data-dir``, else ``$PROSOCIAL_DATA_DIR``, else ``../shared/data``; ``None`` (after saying why) if absent."""

    data_dir = given if given is not None else default_data_dir()
    if not data_dir.is_dir():
        _fail(f"--data-dir {data_dir} is not a directory (set --data-dir or PROSOCIAL_DATA_DIR)")
        return None
    return data_dir


def _fail(message: str) -> int:
    """Say what is wrong with the command line (naming the argument) and return the usage-error exit code."""
    print(f"prosocial rewardmodel: error: {message}", file=sys.stderr)
    return 2


def _command_line() -> str:
    import shlex

    return " ".join(["prosocial", *map(shlex.quote, sys.argv[1:])])


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train the multi-attribute autoregressive reward model (ARM)",
        description="Train LoRA + per-attribute head adapters on a truncated copy of the base model with the "
        "GenARM pairwise loss, one mini-batch per attribute per step, PCGrad on the shared trunk.",
    )
    train_fields = add_config_arguments(parser, TrainConfig)
    arm_fields = add_config_arguments(parser, ArmConfig)
    parser.set_defaults(func=_run_train, train_fields=train_fields, arm_fields=arm_fields)


def _run_train(args: argparse.Namespace) -> int:
    from rewardmodel.train import train

    if not (args.data_dir / "train.jsonl").is_file():
        return _fail(f"--data {args.data_dir} has no train.jsonl; run `prosocial rewardmodel data` first")
    if args.base_dir is not None and not (args.base_dir / "config.json").is_file():
        return _fail(f"--base-dir {args.base_dir} is not a Hugging Face model folder")
    arm = config_from_args(ArmConfig, args, args.arm_fields, lora_alpha=2.0 * args.lora_rank)
    config = config_from_args(TrainConfig, args, args.train_fields, arm=arm)
    try:
        train(config, command=_command_line())
    except (FileNotFoundError, ValueError) as error:
        return _fail(str(error))
    return 0


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="held-out pairwise accuracy of the ARM vs baselines; writes reports/rewardmodel.json",
        description="Score held-out preference pairs per attribute with the ARM artifact, the untrained base "
        "LM likelihood, the longer-response baseline and (if present) the no-PCGrad ablation artifact.",
    )
    parser.set_defaults(func=_run_eval, eval_fields=add_config_arguments(parser, EvalConfig))


def _run_eval(args: argparse.Namespace) -> int:
    from rewardmodel.evaluate import run_evaluation

    if not (args.artifact_dir / "arm_config.json").is_file():
        return _fail(f"--artifact {args.artifact_dir} is not an ARM artifact folder (no arm_config.json)")
    if not (args.data_dir / f"{args.split}.jsonl").is_file():
        return _fail(f"--data {args.data_dir} has no {args.split}.jsonl")
    config = config_from_args(EvalConfig, args, args.eval_fields, command=_command_line())
    try:
        report = run_evaluation(config)
    except (FileNotFoundError, ValueError) as error:
        return _fail(str(error))
    print(f"mean accuracy {_format_share(report['mean_accuracy'])} -> {config.report_path}")
    for name, row in [*report["attributes"].items(), ("hh_rlhf", report["safety_hh_rlhf_test"])]:
        print(
            f"  {name:15s} n={row['test_pairs']:4d} arm={_format_share(row['accuracy'])} "
            f"base_lm={_format_share(row['baseline_base_lm'])} length={_format_share(row['baseline_length'])}"
        )
    return 0


def _format_share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _add_calibrate_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "calibrate",
        help="choose the safety mask's default threshold on held-out labelled safety responses",
        description="Pick the threshold that masks at most --quantile of the tokens of safe validation "
        "responses, and the response guard's threshold that ends at most --response-quantile of them; report "
        "how much of the harmful ones each removes. Written beside the artifact.",
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_PAIR_DIR, help="pair splits (default: %(default)s)"
    )
    parser.add_argument(
        "--artifact", type=Path, default=SERVED_ARM, help="default: the served artifact, %(default)s"
    )
    parser.add_argument("--base-dir", type=Path, default=None, help="default: the prepared default model")
    parser.add_argument("--quantile", type=float, default=0.01)
    parser.add_argument("--response-quantile", type=float, default=0.1)
    parser.add_argument("--guard-tokens", type=int, default=8, help="tokens before the response guard judges")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="shared data folder, for the base model's own replies (default: $PROSOCIAL_DATA_DIR, else ../shared/data)",
    )
    parser.add_argument("--no-on-policy", action="store_true", help="calibrate on the dataset responses only")
    parser.add_argument("--candidate-top-k", type=int, default=256)
    parser.set_defaults(func=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    import json
    import shlex

    from prosocialalign.core.models import prepare_default_model
    from rewardmodel.calibrate import CalibrationConfig, calibrate, write_calibration

    if not (args.data / "validation.jsonl").is_file():
        return _fail(f"--data {args.data} has no validation.jsonl")
    for name in ("quantile", "response_quantile"):
        if not (0 < getattr(args, name) < 0.5):
            return _fail(f"--{name.replace('_', '-')} must be in (0, 0.5)")
    if not (1 <= args.guard_tokens <= 32):
        return _fail("--guard-tokens must be in [1, 32]")
    cfg = CalibrationConfig(
        quantile=args.quantile,
        response_quantile=args.response_quantile,
        guard_tokens=args.guard_tokens,
        candidate_top_k=args.candidate_top_k,
    )
    data_dir = None
    if not args.no_on_policy and (data_dir := _shared_data_dir(args.data_dir)) is None:
        return 2
    result = calibrate(args.base_dir or prepare_default_model(), args.artifact, args.data, cfg, data_dir)
    command = "prosocial rewardmodel calibrate " + shlex.join(sys.argv[3:])
    print(json.dumps(result, indent=2))
    print(f"wrote {write_calibration(args.artifact, result, command)}")
    return 0


def _add_safety_head_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train-safety-head",
        help="retrain only the safety head on per-token harm labels (the statistic the mask thresholds)",
        description="Load --from, train its safety head adapter with a logistic loss on the safety margin of "
        "every response token (JailbreakBench verdicts, everyday answers, the base model's own replies), keep the "
        "rest, and write --out.",
    )
    parser.add_argument("--from", dest="source", type=Path, default=TRAINED_ARM, help="default: %(default)s")
    parser.add_argument(
        "--out", type=Path, default=SERVED_ARM, help="new artifact folder (default: %(default)s)"
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_PAIR_DIR, help="pair splits (default: %(default)s)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="shared data folder, for the on-policy prompts (default: $PROSOCIAL_DATA_DIR, else ../shared/data)",
    )
    parser.add_argument(
        "--no-on-policy",
        action="store_true",
        help="train on the dataset responses only (no base-model replies)",
    )
    parser.add_argument("--base-dir", type=Path, default=None, help="default: the prepared default model")
    parser.add_argument("--steps", type=positive_int, default=400)
    parser.add_argument("--lr", type=positive_float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=positive_int, default=2)
    parser.set_defaults(func=_run_safety_head)


def _run_safety_head(args: argparse.Namespace) -> int:
    import json

    import torch

    from prosocialalign.core.models import prepare_default_model
    from rewardmodel.safety_head import SafetyHeadConfig, run

    data_dir = _shared_data_dir(args.data_dir)
    if data_dir is None:
        return 2
    for name in ("train", "validation", "test"):
        if not (args.data / f"{name}.jsonl").is_file():
            return _fail(f"--data {args.data} has no {name}.jsonl; run `prosocial rewardmodel data`")
    if not (args.source / "arm_config.json").is_file():
        return _fail(f"--from {args.source} is not an ARM artifact folder (no arm_config.json)")
    if args.out.resolve() == args.source.resolve():
        return _fail("--out must differ from --from (the source artifact is kept)")
    torch.set_num_threads(args.num_threads)
    cfg = SafetyHeadConfig(steps=args.steps, lr=args.lr, seed=args.seed, on_policy=not args.no_on_policy)
    result = run(
        args.base_dir or prepare_default_model(),
        args.source,
        args.out,
        args.data,
        data_dir,
        cfg,
        _command_line(),
        log=lambda entry: print(json.dumps(entry), flush=True),
    )
    print(json.dumps({"before": result["before"], "after": result["after"]}, indent=2))
    print(f"wrote {args.out}")
    return 0
