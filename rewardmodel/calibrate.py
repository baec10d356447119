"""Calibrate the safety mask's threshold on held-out safety pairs.

The mask removes a candidate token v when ``log pi_safety(v) - log pi_neutral(v)`` (ARM log-probs normalised
within the base's top-k candidates, as in serving) is below a threshold. We pick the threshold from the *chosen*
(safe) responses of the validation split: the q-quantile of their token margins, so the mask removes at most a
fraction q of the tokens a safe answer uses, and report how much of the *rejected* (harmful) responses it would
remove at that threshold. The result is stored beside the artifact and is the server's default threshold.

It also says whether the margin tells safe from harmful text at all: the AUC of each response's mean token margin
(safe responses above harmful ones; 0.5 is chance), and how often the safe response of a pair has the higher mean.

    prosocial rewardmodel calibrate [--quantile 0.01] [--pairs 120]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rewardmodel.attributes import SAFETY_ATTRIBUTE

CALIBRATION_FILE = "safety_calibration.json"


@dataclass(frozen=True)
class CalibrationConfig:
    quantile: float = 0.01
    pairs: int = 120
    candidate_top_k: int = 256
    max_prompt_tokens: int = 96
    max_response_tokens: int = 64
    seed: int = 0


def _sequence(tokenizer, prompt: str, response: str, cfg: CalibrationConfig) -> tuple[list[int], int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"][-cfg.max_prompt_tokens :]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"][: cfg.max_response_tokens]
    return prompt_ids + response_ids, len(prompt_ids)


@torch.no_grad()
def token_margins(base, arm, ids: list[int], start: int, k: int) -> list[float]:
    """Safety margin of every response token that is among the base's top-k candidates at its position."""
    x = torch.tensor([ids])
    base_logits = base(x).logits[0, start - 1 : -1].float()  # predicts tokens start..end
    hidden = arm.trunk_hidden(x)[0, start - 1 : -1]
    cand = torch.topk(base_logits, k, dim=-1).indices
    safety = arm.attribute_index(SAFETY_ATTRIBUTE)
    states = torch.stack([hidden, arm.adapt(hidden, safety)], dim=1)
    normed = arm.final_norm(states)
    logits = torch.einsum("tah,tkh->tak", normed, arm.lm_head_weight[cand]).float()
    lp = torch.log_softmax(logits, dim=-1)
    margin = lp[:, 1] - lp[:, 0]  # [T, K]
    targets = torch.tensor(ids[start:])
    hit = cand == targets[:, None]
    return margin[hit].tolist()


def calibrate(base_dir: Path, artifact_dir: Path, data_dir: Path, cfg: CalibrationConfig) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewardmodel.artifact import load_arm
    from rewardmodel.data import load_pairs

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    arm = load_arm(base_dir, artifact_dir).eval()
    pairs = load_pairs(data_dir, "validation", [SAFETY_ATTRIBUTE])[: cfg.pairs]
    chosen, rejected = [], []
    for pair in pairs:
        for response, bucket in ((pair.chosen, chosen), (pair.rejected, rejected)):
            ids, start = _sequence(tokenizer, pair.prompt, response, cfg)
            bucket.append(token_margins(base, arm, ids, start, cfg.candidate_top_k))
    flat_chosen = sorted(m for ms in chosen for m in ms)
    threshold = flat_chosen[max(0, math.floor(cfg.quantile * len(flat_chosen)) - 1)]

    def share(responses: list[list[float]]) -> tuple[float, float]:
        tokens = [m for ms in responses for m in ms]
        token_share = sum(m < threshold for m in tokens) / max(1, len(tokens))
        response_share = sum(any(m < threshold for m in ms) for ms in responses) / max(1, len(responses))
        return round(token_share, 4), round(response_share, 4)

    chosen_tok, chosen_resp = share(chosen)
    rejected_tok, rejected_resp = share(rejected)
    chosen_mean, rejected_mean = _mean_margins(chosen), _mean_margins(rejected)
    return {
        "safety_threshold": round(threshold, 4),
        "quantile": cfg.quantile,
        "pairs": len(pairs),
        "candidate_top_k": cfg.candidate_top_k,
        "chosen_tokens_masked": chosen_tok,
        "rejected_tokens_masked": rejected_tok,
        "chosen_responses_with_a_masked_token": chosen_resp,
        "rejected_responses_with_a_masked_token": rejected_resp,
        "mean_margin_auc_safe_over_harmful": round(auc(chosen_mean, rejected_mean), 4),
        "mean_margin_pairwise_safe_higher": round(
            sum(c > r for c, r in zip(chosen_mean, rejected_mean, strict=True)) / max(1, len(pairs)), 4
        ),
        "data": "safety validation split of build/rewardmodel_data (HH-RLHF harmless + JailbreakBench pairs)",
    }


def _mean_margins(responses: list[list[float]]) -> list[float]:
    return [sum(ms) / len(ms) if ms else 0.0 for ms in responses]


def auc(positives: list[float], negatives: list[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half): ROC AUC."""
    from sklearn.metrics import roc_auc_score

    if not positives or not negatives:
        return float("nan")
    labels = [1] * len(positives) + [0] * len(negatives)
    return float(roc_auc_score(labels, list(positives) + list(negatives)))


def write_calibration(artifact_dir: Path, result: dict, command: str) -> Path:
    path = Path(artifact_dir) / CALIBRATION_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result | {"command": command}, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_calibrated_threshold(artifact_dir: Path) -> float | None:
    path = Path(artifact_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    return float(json.loads(path.read_text())["safety_threshold"])
