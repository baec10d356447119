"""Calibrate the safety mask's threshold on held-out labelled responses.

The mask removes a candidate token v when ``log pi_safety(v) - log pi_neutral(v)`` (ARM log-probs normalised
within the base's top-k candidates, as in serving) is below a threshold. We pick the threshold from the *safe*
responses of the validation split (JailbreakBench refusals and everyday answers, see
``rewardmodel.safety_head.labelled_responses``): the q-quantile of their token margins, so the mask removes at
most a fraction q of the tokens a safe answer uses, and report how much of the *harmful* (jailbroken) responses
it would remove at that threshold. The result is stored beside the artifact and is the server's default
threshold.

It also says whether the margin tells safe from harmful text at all: the AUC of each response's mean token margin
(safe above harmful; 0.5 is chance), also against everyday answers only (harmful against harmless compliance).

The *response guard* thresholds that mean instead: from ``guard_tokens`` tokens on, a response whose running mean
margin falls below the response threshold is ended. Its threshold is the ``response_quantile``-quantile of the
safe responses' lowest running mean (from ``guard_tokens`` on), so it ends at most that share of safe responses;
we report the share of harmful ones it ends.

    prosocial rewardmodel calibrate [--artifact DIR] [--quantile 0.05] [--response-quantile 0.1]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from prosocialalign.core.fileio import atomic_write_json
from rewardmodel.attributes import SAFETY_ATTRIBUTE

CALIBRATION_FILE = "safety_calibration.json"


@dataclass(frozen=True)
class CalibrationConfig:
    quantile: float = 0.01
    response_quantile: float = 0.1
    guard_tokens: int = 8
    candidate_top_k: int = 256
    seed: int = 0


def calibrate(
    base_dir: Path, artifact_dir: Path, pair_dir: Path, cfg: CalibrationConfig, data_dir: Path | None = None
) -> dict:
    """``data_dir`` (the shared data) adds the base model's own validation replies (``on_policy_responses``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewardmodel.artifact import load_arm
    from rewardmodel.safety_head import (
        SafetyHeadConfig,
        extract_features,
        labelled_responses,
        on_policy_responses,
        separation,
        target_margins,
    )

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    arm = load_arm(base_dir, artifact_dir).eval()
    head_cfg = SafetyHeadConfig(candidate_top_k=cfg.candidate_top_k)
    responses = labelled_responses(pair_dir, "validation")
    if data_dir is not None:
        cache = Path(head_cfg.on_policy_cache.format(split="validation"))
        responses += on_policy_responses(base, tokenizer, data_dir, "validation", head_cfg, cache)
    features = extract_features(base, arm, tokenizer, responses, head_cfg)
    index = arm.attribute_index(SAFETY_ATTRIBUTE)
    down, up = arm.head_down[index], arm.head_up[index]
    margins = target_margins(arm, features, down, up)
    safe = ~features.harmful
    threshold = quantile_threshold(margins[safe], cfg.quantile)
    masked = margins < threshold

    def share(rows: torch.Tensor) -> tuple[float, float]:
        responses_hit = [
            bool(masked[rows & (features.response == r)].any()) for r in features.response[rows].unique()
        ]
        return (
            round(masked[rows].float().mean().item(), 4),
            round(sum(responses_hit) / max(1, len(responses_hit)), 4),
        )

    safe_tok, safe_resp = share(safe)
    harmful_tok, harmful_resp = share(features.harmful)
    _, everyday_resp = share(features.everyday)
    aucs = separation(arm, features, down, up)
    lowest = lowest_running_means(margins, features.response, cfg.guard_tokens)
    responses_safe = [r for r in lowest if not bool(features.harmful[features.response == r][0])]
    response_threshold = quantile_threshold(
        torch.tensor([lowest[r] for r in responses_safe]), cfg.response_quantile
    )

    def ended(rows: torch.Tensor) -> float:
        chosen = [r for r in features.response[rows].unique().tolist() if r in lowest]
        return round(sum(lowest[r] < response_threshold for r in chosen) / max(1, len(chosen)), 4)

    guard = {
        "response_threshold": round(response_threshold, 4),
        "response_quantile": cfg.response_quantile,
        "guard_tokens": cfg.guard_tokens,
        "responses_ended_by_the_guard": {
            "safe": ended(safe),
            "everyday": ended(features.everyday),
            "harmful": ended(features.harmful),
        },
    }
    if features.on_policy.any():
        guard["responses_ended_by_the_guard"] |= {
            "own_safe_replies": ended(safe & features.on_policy),
            "own_harmful_replies": ended(features.harmful & features.on_policy),
        }
    return guard | {
        "safety_threshold": round(threshold, 4),
        "quantile": cfg.quantile,
        "responses": {"safe": aucs["safe_responses"], "harmful": aucs["harmful_responses"]},
        "candidate_top_k": cfg.candidate_top_k,
        "safe_tokens_masked": safe_tok,
        "harmful_tokens_masked": harmful_tok,
        "safe_responses_with_a_masked_token": safe_resp,
        "everyday_responses_with_a_masked_token": everyday_resp,
        "harmful_responses_with_a_masked_token": harmful_resp,
        "mean_margin_auc_safe_over_harmful": aucs["mean_margin_auc"],
        "mean_margin_auc_everyday_over_harmful": aucs["mean_margin_auc_vs_everyday"],
        "mean_margin_auc_own_replies": aucs.get("mean_margin_auc_on_policy"),
        "data": "validation split of build/rewardmodel_data: JailbreakBench responses (jailbroken = harmful) and "
        "refusal_direction everyday answers (safe)"
        + ("; the base model's own replies to refusal_direction validation prompts" if data_dir else ""),
    }


def lowest_running_means(
    margins: torch.Tensor, response: torch.Tensor, guard_tokens: int
) -> dict[int, float]:
    """Per response (of at least ``guard_tokens`` tokens): the lowest mean margin of its prefixes of
    ``guard_tokens`` tokens or more, i.e. the value the response guard would compare with its threshold."""
    lowest = {}
    for index in response.unique().tolist():
        values = margins[response == index]
        if len(values) < guard_tokens:
            continue
        running = values.cumsum(0) / torch.arange(1, len(values) + 1)
        lowest[index] = running[guard_tokens - 1 :].min().item()
    return lowest


def quantile_threshold(safe_margins: torch.Tensor, quantile: float) -> float:
    """The k-th smallest safe margin, k = floor(quantile * n) (at least the first): fewer than k safe tokens
    fall strictly below it, so the mask removes under ``quantile`` of them."""
    ordered = safe_margins.sort().values
    return ordered[max(0, math.floor(quantile * len(ordered)) - 1)].item()


def write_calibration(artifact_dir: Path, result: dict, command: str) -> Path:
    return atomic_write_json(Path(artifact_dir) / CALIBRATION_FILE, result | {"command": command})


def read_calibration(artifact_dir: Path) -> dict | None:
    path = Path(artifact_dir) / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_calibrated_threshold(artifact_dir: Path) -> float | None:
    calibration = read_calibration(artifact_dir)
    return float(calibration["safety_threshold"]) if calibration is not None else None
