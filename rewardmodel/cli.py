"""``prosocial rewardmodel ...`` sub-commands.

Each sub-command has its own ``_add_<name>_command(sub)`` helper that adds its parser and sets ``func`` to a
handler taking the parsed ``args`` and returning an exit code; ``register`` just calls them in turn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_DATA_OUT = Path("build/rewardmodel_data")


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
        "--out", type=Path, default=DEFAULT_DATA_OUT, help=f"output folder (default: {DEFAULT_DATA_OUT})"
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


DEFAULT_ARM_OUT = Path("rewardmodel/artifacts/arm-v1")
DEFAULT_ABLATION_OUT = Path("rewardmodel/artifacts/arm-v1-no-pcgrad")
SERVING_ARM = Path(
    "rewardmodel/artifacts/arm-v2"
)  # arm-v1 with the retrained safety head (train-safety-head)


def _shared_data_dir(given: Path | None) -> Path | None:
    """``--data-dir``, else ``$PROSOCIAL_DATA_DIR``, else ``../shared/data``; ``None`` (after saying why) if absent."""
    from rewardmodel import data

    data_dir = given if given is not None else data.default_data_dir()
    if not data_dir.is_dir():
        _fail(f"--data-dir {data_dir} is not a directory (set --data-dir or PROSOCIAL_DATA_DIR)")
        return None
    return data_dir


def _fail(message: str) -> int:
    """Say what is wrong with the command line (naming the argument) and return the usage-error exit code."""
    print(f"prosocial rewardmodel: error: {message}", file=sys.stderr)
    return 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _command_line() -> str:
    import shlex

    return " ".join(["prosocial", *map(shlex.quote, sys.argv[1:])])


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    from rewardmodel.loss import DEFAULT_BETA_R

    parser = sub.add_parser(
        "train",
        help="train the multi-attribute autoregressive reward model (ARM)",
        description="Train LoRA + per-attribute head adapters on a truncated copy of the base model with the "
        "GenARM pairwise loss, one mini-batch per attribute per step, PCGrad on the shared trunk.",
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA_OUT, help=f"pair splits (default: {DEFAULT_DATA_OUT})"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_ARM_OUT, help=f"artifact folder (default: {DEFAULT_ARM_OUT})"
    )
    parser.add_argument(
        "--base-dir", type=Path, default=None, help="base HF folder (default: the prepared default model)"
    )
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="default: build/rewardmodel_checkpoints/<out name>"
    )
    parser.add_argument(
        "--log", type=Path, default=None, help="JSONL log (default: <checkpoint-dir>/train_log.jsonl)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=_positive_int, default=150)
    parser.add_argument(
        "--pairs-per-attribute", type=_positive_int, default=4, help="pairs per attribute per step"
    )
    parser.add_argument("--lr", type=_positive_float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--beta-r", type=_positive_float, default=DEFAULT_BETA_R, help="GenARM reward scale")
    parser.add_argument(
        "--nll-weight",
        type=float,
        default=1.0,
        help="weight of the chosen-response NLL term (0: pure GenARM)",
    )
    parser.add_argument("--max-prompt-tokens", type=_positive_int, default=96)
    parser.add_argument("--max-response-tokens", type=_positive_int, default=64)
    parser.add_argument(
        "--num-layers", type=_positive_int, default=8, help="trunk depth (first N base layers)"
    )
    parser.add_argument("--lora-rank", type=_positive_int, default=16)
    parser.add_argument("--head-rank", type=_positive_int, default=16)
    parser.add_argument("--log-every", type=_positive_int, default=10)
    parser.add_argument("--checkpoint-every", type=_positive_int, default=25)
    parser.add_argument("--num-threads", type=_positive_int, default=2)
    parser.add_argument("--no-pcgrad", action="store_true", help="sum the attribute gradients (ablation)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument(
        "--no-bf16-trunk", action="store_true", help="run the trunk in float32 (default: bfloat16 autocast)"
    )
    parser.add_argument(
        "--max-minutes", type=_positive_float, default=None, help="wall-clock budget; stop early and save"
    )
    parser.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from rewardmodel.model import ArmConfig
    from rewardmodel.train import TrainConfig, train

    if not (args.data / "train.jsonl").is_file():
        return _fail(f"--data {args.data} has no train.jsonl; run `prosocial rewardmodel data` first")
    if args.base_dir is not None and not (args.base_dir / "config.json").is_file():
        return _fail(f"--base-dir {args.base_dir} is not a Hugging Face model folder")
    config = TrainConfig(
        data_dir=args.data,
        out_dir=args.out,
        checkpoint_dir=args.checkpoint_dir,
        log_path=args.log,
        base_dir=args.base_dir,
        seed=args.seed,
        steps=args.steps,
        pairs_per_attribute=args.pairs_per_attribute,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        beta_r=args.beta_r,
        nll_weight=args.nll_weight,
        max_prompt_tokens=args.max_prompt_tokens,
        max_response_tokens=args.max_response_tokens,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        num_threads=args.num_threads,
        use_pcgrad=not args.no_pcgrad,
        bf16_trunk=not args.no_bf16_trunk,
        resume=args.resume,
        max_minutes=args.max_minutes,
        arm=ArmConfig(
            num_layers=args.num_layers,
            lora_rank=args.lora_rank,
            lora_alpha=2.0 * args.lora_rank,
            head_rank=args.head_rank,
        ),
    )
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
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA_OUT, help=f"pair splits (default: {DEFAULT_DATA_OUT})"
    )
    parser.add_argument("--artifact", type=Path, default=DEFAULT_ARM_OUT, help=f"default: {DEFAULT_ARM_OUT}")
    parser.add_argument(
        "--ablation-artifact",
        type=Path,
        default=DEFAULT_ABLATION_OUT,
        help=f"default: {DEFAULT_ABLATION_OUT}",
    )
    parser.add_argument(
        "--base-dir", type=Path, default=None, help="base HF folder (default: the prepared default model)"
    )
    parser.add_argument("--report", type=Path, default=Path("reports/rewardmodel.json"))
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument(
        "--max-pairs-per-attribute",
        type=_positive_int,
        default=None,
        help="seeded subset per attribute (default: all)",
    )
    parser.add_argument("--batch-pairs", type=_positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the capped subset")
    parser.add_argument("--num-threads", type=_positive_int, default=2)
    parser.add_argument(
        "--no-base-baseline", action="store_true", help="skip the (slow) full base-LM baseline"
    )
    parser.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from rewardmodel.evaluate import EvalConfig, run_evaluation

    if not (args.artifact / "arm_config.json").is_file():
        return _fail(f"--artifact {args.artifact} is not an ARM artifact folder (no arm_config.json)")
    if not (args.data / f"{args.split}.jsonl").is_file():
        return _fail(f"--data {args.data} has no {args.split}.jsonl")
    config = EvalConfig(
        data_dir=args.data,
        artifact_dir=args.artifact,
        ablation_artifact_dir=args.ablation_artifact,
        base_dir=args.base_dir,
        report_path=args.report,
        split=args.split,
        max_pairs_per_attribute=args.max_pairs_per_attribute,
        batch_pairs=args.batch_pairs,
        seed=args.seed,
        num_threads=args.num_threads,
        include_base_baseline=not args.no_base_baseline,
        command=_command_line(),
    )
    try:
        report = run_evaluation(config)
    except (FileNotFoundError, ValueError) as error:
        return _fail(str(error))
    print(f"mean accuracy {_format_share(report['mean_accuracy'])} -> {args.report}")
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
        "--data", type=Path, default=DEFAULT_DATA_OUT, help="pair splits (default: %(default)s)"
    )
    parser.add_argument(
        "--artifact", type=Path, default=SERVING_ARM, help="default: the served artifact, %(default)s"
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

    from rewardmodel.calibrate import CalibrationConfig, calibrate, write_calibration
    from server.model_prep import prepare_default_model

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
    parser.add_argument(
        "--from", dest="source", type=Path, default=DEFAULT_ARM_OUT, help="default: %(default)s"
    )
    parser.add_argument(
        "--out", type=Path, default=SERVING_ARM, help="new artifact folder (default: %(default)s)"
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA_OUT, help="pair splits (default: %(default)s)"
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
    parser.add_argument("--steps", type=_positive_int, default=400)
    parser.add_argument("--lr", type=_positive_float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=_positive_int, default=2)
    parser.set_defaults(func=_run_safety_head)


def _run_safety_head(args: argparse.Namespace) -> int:
    import json

    import torch

    from rewardmodel.safety_head import SafetyHeadConfig, run
    from server.model_prep import prepare_default_model

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
