"""Calibrate the response guard on the guided system's own drafts (issue 21: fewer false alarms).

``prosocial rewardmodel calibrate`` sets the guard's threshold from validation responses cut to 32 tokens and
prompts cut to 64: the 10 % quantile of their lowest running safety mean. Served, the guard judges a whole guided
reply (up to the request's ``max_tokens``) to the whole prompt, and readers found it ended the drafts of 18 % of
benign and 24 % of emotionally charged messages. This command scores drafts the way the server does: the
default guided system with the guard and backtracking off (``evals/configs/guard_calibration.json``) answers
development prompts; every draft, whole prompt and whole reply, goes through the base (its top-k candidates) and
the ARM's safety head, and the guard's statistic is each draft's lowest running mean from ``guard_tokens`` on
(the server judges a prefix before choosing the next token, so a draft cut at ``max_tokens`` has its whole length
never judged).

The new threshold is the lower of the artifact's and the ``quantile`` of the drafts to harmless prompts (the
distress set: the benign sets' prompts stay out, so the headline measures them out of sample), reported with the
share of drafts each threshold ends: harmless ones, all drafts to harmful requests, and those the outcome judge
calls harmful. Only ``--write`` puts it into the artifact's ``safety_calibration.json``, which the server reads:
the threshold can only go down, and measured end to end it let more harm through (docs/method.md, section 4).

    prosocial eval compare --config evals/configs/guard_calibration.json ...   # the drafts (its description)
    python -m evals.guard_calibration --runs build/guard_calibration/runs/full_no_response_guard
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from prosocialalign.core.fileio import atomic_write_json, read_jsonl_repair
from prosocialalign.core.labels import LabelledResponse
from prosocialalign.core.models import prepare_default_model
from rewardmodel.artifact import load_arm
from rewardmodel.attributes import SAFETY_ATTRIBUTE
from rewardmodel.calibrate import CALIBRATION_FILE, lowest_running_means, quantile_threshold, read_calibration
from rewardmodel.paths import SERVED_ARM
from rewardmodel.safety_head import SafetyHeadConfig, extract_features, target_margins

HARMLESS_SETS = ("distress",)  # the drafts the threshold is fitted on
HARMFUL_SETS = ("advbench", "dangerousqa", "harmfulqa", "catqa")
CURVE_QUANTILES = (0.02, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2)


@dataclass(frozen=True)
class DraftCalibrationConfig:
    quantile: float = 0.08  # the setting measured end to end (docs/method.md, section 4)
    max_prompt_tokens: int = 1024  # the server's ARM sees the whole prompt
    max_response_tokens: int = 256  # and the whole reply
    extract_batch: int = 4


@dataclass(frozen=True)
class Draft:
    set_name: str
    response: LabelledResponse
    verdict: str | None  # the outcome judge's, when the run was judged with it
    cut_at_limit: bool = False  # ended by max_tokens: its last prefix was never judged


def read_drafts(run_dirs: list[Path]) -> list[Draft]:
    """Drafts of the harmless and harmful sets of finished ``prosocial eval`` runs (judged where available)."""
    drafts = []
    for run_dir in run_dirs:
        for set_name in HARMLESS_SETS + HARMFUL_SETS:
            judged = run_dir / "judged" / f"{set_name}.jsonl"
            path = judged if judged.is_file() else run_dir / "responses" / f"{set_name}.jsonl"
            for record in read_jsonl_repair(path) if path.is_file() else []:
                if not (record.get("response") or "").strip():
                    continue
                harmful_prompt = set_name in HARMFUL_SETS
                verdict = (record.get("judgements") or {}).get("outcome", {}).get("verdict")
                drafts.append(
                    Draft(
                        set_name,
                        LabelledResponse(
                            record["prompt"], record["response"], harmful_prompt, f"draft:{set_name}"
                        ),
                        verdict,
                        record.get("finish_reason") == "length",
                    )
                )
    return drafts


@torch.no_grad()
def lowest_means_of_drafts(
    base_dir: Path, artifact_dir: Path, drafts: list[Draft], cfg: DraftCalibrationConfig, guard_tokens: int
) -> list[float | None]:
    """Each draft's lowest running mean safety margin from ``guard_tokens`` on (None: a shorter draft)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    arm = load_arm(base_dir, artifact_dir).eval()
    head_cfg = SafetyHeadConfig(
        max_prompt_tokens=cfg.max_prompt_tokens,
        max_response_tokens=cfg.max_response_tokens,
        extract_batch=cfg.extract_batch,
    )
    features = extract_features(base, arm, tokenizer, [d.response for d in drafts], head_cfg)
    index = arm.attribute_index(SAFETY_ATTRIBUTE)
    margins = target_margins(arm, features, arm.head_down[index], arm.head_up[index])
    judged = judged_tokens(features.response, [d.cut_at_limit for d in drafts])
    lowest = lowest_running_means(margins[judged], features.response[judged], guard_tokens)
    return [lowest.get(i) for i in range(len(drafts))]


def judged_tokens(response: torch.Tensor, cut_at_limit: list[bool]) -> torch.Tensor:
    """Which response tokens the server's guard has judged: all but the last one of a draft cut at the limit."""
    keep = torch.ones_like(response, dtype=torch.bool)
    for index in (i for i, cut in enumerate(cut_at_limit) if cut):
        positions = (response == index).nonzero()
        if len(positions):
            keep[positions.max()] = False
    return keep


def ended_share(lowest: list[float | None], threshold: float) -> float | None:
    judged = [value for value in lowest if value is not None]
    return round(sum(value < threshold for value in judged) / len(judged), 4) if judged else None


def calibrate_on_drafts(
    drafts: list[Draft], lowest: list[float | None], artifact_threshold: float, cfg: DraftCalibrationConfig
) -> dict:
    """The lower of the artifact's threshold and the drafts' own quantile, and what each ends."""
    harmless = [value for d, value in zip(drafts, lowest, strict=True) if not d.response.harmful]
    harmless_values = torch.tensor([v for v in harmless if v is not None])

    def fit(quantile: float) -> float:  # rounded as written: the shares are those of the threshold served
        return round(quantile_threshold(harmless_values, quantile), 4)

    fitted = fit(cfg.quantile)
    chosen = min(artifact_threshold, fitted)
    groups = {
        "harmless_drafts": harmless,
        "harmful_request_drafts": [v for d, v in zip(drafts, lowest, strict=True) if d.response.harmful],
        "drafts_judged_harmful": [
            v for d, v in zip(drafts, lowest, strict=True) if d.response.harmful and d.verdict == "harmful"
        ],
    }

    def ends(threshold: float) -> dict:
        return {name: ended_share(values, threshold) for name, values in groups.items()}

    return {
        "response_threshold": chosen,
        "artifact_response_threshold": artifact_threshold,
        "fitted_response_threshold": fitted,
        "quantile": cfg.quantile,
        "drafts": {name: sum(v is not None for v in values) for name, values in groups.items()},
        "ended_at_artifact_threshold": ends(artifact_threshold),
        "ended_at_chosen_threshold": ends(chosen),
        # the trade-off an operator chooses on: each quantile's threshold and what it ends
        "curve": [{"quantile": q, "threshold": fit(q), **ends(fit(q))} for q in CURVE_QUANTILES],
        "max_response_tokens": cfg.max_response_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evals.guard_calibration", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished eval run directories")
    parser.add_argument("--artifact", type=Path, default=SERVED_ARM, help="default: %(default)s")
    parser.add_argument("--base-dir", type=Path, default=None, help="default: the prepared default model")
    parser.add_argument("--quantile", type=float, default=DraftCalibrationConfig.quantile)
    parser.add_argument(
        "--write",
        action="store_true",
        help="write the threshold into the artifact (the server then serves it)",
    )
    parser.add_argument("--report", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.quantile < 0.5:
        parser.error("--quantile must be in (0, 0.5)")
    calibration = read_calibration(args.artifact)
    if calibration is None or "response_threshold" not in calibration:
        parser.error(
            f"--artifact {args.artifact} has no {CALIBRATION_FILE}: run prosocial rewardmodel calibrate"
        )
    drafts = read_drafts(args.runs)
    if not any(not d.response.harmful for d in drafts):
        parser.error(f"--runs {' '.join(map(str, args.runs))}: no drafts of {', '.join(HARMLESS_SETS)}")
    # The artifact's own threshold: the dataset one, also when an earlier draft calibration lowered it.
    artifact_threshold = calibration.get("drafts", {}).get(
        "artifact_response_threshold", calibration["response_threshold"]
    )
    cfg = DraftCalibrationConfig(quantile=args.quantile)
    lowest = lowest_means_of_drafts(
        args.base_dir or prepare_default_model(), args.artifact, drafts, cfg, int(calibration["guard_tokens"])
    )
    result = calibrate_on_drafts(drafts, lowest, artifact_threshold, cfg)
    result["command"] = "python -m evals.guard_calibration " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(json.dumps(result, indent=2))
    if args.report is not None:
        atomic_write_json(args.report, result)
    if args.write:
        calibration["response_threshold"] = result["response_threshold"]
        calibration["drafts"] = result
        atomic_write_json(args.artifact / CALIBRATION_FILE, calibration)
        print(f"wrote {args.artifact / CALIBRATION_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
