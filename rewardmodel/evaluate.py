"""Held-out pairwise accuracy of the ARM, against two baselines and the no-PCGrad ablation.

Reward of a response under attribute a = sum of its response-token log-probabilities under the ARM's
distribution for a, given the prompt, formatted exactly as in training (chat template + response tokens, same
truncation; the lengths are read from the artifact's training config). A pair is correct when
reward(chosen) > reward(rejected); exact ties count one half.

Baselines:
- ``baseline_base_lm``: the same score under the untrained base model (all 30 layers and its own head), i.e.
  what likelihood alone says before any preference training;
- ``baseline_length``: "the longer response wins" (characters of the full response text; ties 0.5), because
  many preference sources prefer the fuller answer.
The HH-RLHF harmless test pairs (``source == HH_RLHF_SOURCE`` within ``safety``) are also reported on their own.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from rewardmodel.config import EvalConfig
from rewardmodel.encoding import EncodedPair, PairEncoder, SequenceBatch, collate_pairs
from rewardmodel.loss import arm_response_log_probs, pairwise_accuracy, sum_response_log_probs

ScoreFn = Callable[[SequenceBatch], Tensor]


def length_baseline_accuracy(pairs: Sequence) -> float | None:
    """Share of pairs where the chosen response is longer (characters); equal lengths count one half."""
    if not pairs:
        return None
    chosen = torch.tensor([len(p.chosen) for p in pairs], dtype=torch.float64)
    rejected = torch.tensor([len(p.rejected) for p in pairs], dtype=torch.float64)
    return pairwise_accuracy(chosen, rejected)


def cap_pairs(pairs: Sequence, limit: int | None, seed: int) -> list:
    """A seeded random subset of at most ``limit`` pairs (all of them when ``limit`` is None)."""
    pairs = list(pairs)
    if limit is None or len(pairs) <= limit:
        return pairs
    rng = random.Random(seed)
    return rng.sample(pairs, limit)


@torch.inference_mode()
def score_accuracy(
    score: ScoreFn, encoded: Sequence[EncodedPair], pad_id: int, batch_pairs: int
) -> float | None:
    """Pairwise accuracy of a scoring function (None without pairs); pairs are batched by length."""
    if not encoded:
        return None
    order = sorted(
        range(len(encoded)),
        key=lambda i: (
            len(encoded[i].prompt_ids) + max(len(encoded[i].chosen_ids), len(encoded[i].rejected_ids))
        ),
    )
    chosen_scores, rejected_scores = [], []
    for start in range(0, len(order), batch_pairs):
        chunk = [encoded[i] for i in order[start : start + batch_pairs]]
        totals = score(collate_pairs(chunk, pad_id))
        chosen_scores.append(totals[: len(chunk)])
        rejected_scores.append(totals[len(chunk) :])
    return pairwise_accuracy(torch.cat(chosen_scores), torch.cat(rejected_scores))


def arm_scorer(arm, attribute: str) -> ScoreFn:
    index = arm.attribute_index(attribute)
    return lambda batch: arm_response_log_probs(arm, batch, index)


def base_lm_scorer(base_model) -> ScoreFn:
    """Summed response log-likelihood under the full base LM (its final norm and head)."""

    def score(batch: SequenceBatch) -> Tensor:
        hidden = base_model.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        return sum_response_log_probs(
            hidden, batch, lambda h: torch.log_softmax(base_model.lm_head(h).float(), dim=-1)
        )

    return score


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def run_evaluation(config: EvalConfig) -> dict:
    """Score every attribute's held-out pairs with the ARM, the baselines and the ablation; write the report."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewardmodel.artifact import load_arm, read_artifact_config
    from rewardmodel.data import HH_RLHF_SOURCE, load_pairs

    torch.set_num_threads(config.num_threads)
    started = time.monotonic()
    if config.base_dir is None:
        from prosocialalign.core.models import prepare_default_model

        config.base_dir = prepare_default_model()
    document = read_artifact_config(config.artifact_dir)
    attributes = tuple(document["arm_config"]["attributes"])
    trained_with = document.get("training", {}).get("config", {})
    encoder = PairEncoder(
        AutoTokenizer.from_pretrained(config.base_dir),
        int(trained_with.get("max_prompt_tokens", 96)),
        int(trained_with.get("max_response_tokens", 64)),
    )

    all_pairs = load_pairs(config.data_dir, config.split, attributes)
    groups: dict[str, list] = {}
    for attribute in attributes:
        pairs = [p for p in all_pairs if p.attribute == attribute]
        groups[attribute] = cap_pairs(pairs, config.max_pairs_per_attribute, config.seed)
    hh_pairs = [p for p in all_pairs if p.attribute == "safety" and p.source == HH_RLHF_SOURCE]
    hh_pairs = cap_pairs(hh_pairs, config.max_pairs_per_attribute, config.seed)
    encoded = {name: [encoder.encode_pair(p) for p in pairs] for name, pairs in groups.items()}
    encoded_hh = [encoder.encode_pair(p) for p in hh_pairs]
    print(
        f"evaluating on {config.split}: {', '.join(f'{k}={len(v)}' for k, v in groups.items())}, "
        f"hh_rlhf={len(hh_pairs)} pairs (cap per attribute: {config.max_pairs_per_attribute or 'none'})",
        flush=True,
    )

    def evaluate_arm(artifact_dir: Path, label: str) -> tuple[dict[str, float | None], float | None]:
        arm = load_arm(config.base_dir, artifact_dir)
        accuracies = {
            name: score_accuracy(arm_scorer(arm, name), encoded[name], encoder.pad_id, config.batch_pairs)
            for name in tqdm(attributes, desc=label)
        }
        hh = score_accuracy(arm_scorer(arm, "safety"), encoded_hh, encoder.pad_id, config.batch_pairs)
        return accuracies, hh

    arm_accuracy, arm_hh = evaluate_arm(config.artifact_dir, "ARM")

    base_accuracy: dict[str, float | None] = {name: None for name in attributes}
    base_hh: float | None = None
    if config.include_base_baseline:
        base = AutoModelForCausalLM.from_pretrained(config.base_dir, dtype=torch.float32).eval()
        scorer = base_lm_scorer(base)
        base_accuracy = {
            name: score_accuracy(scorer, encoded[name], encoder.pad_id, config.batch_pairs)
            for name in tqdm(attributes, desc="base LM")
        }
        base_hh = score_accuracy(scorer, encoded_hh, encoder.pad_id, config.batch_pairs)
        del base

    def row(accuracy: float, base: float | None, pairs: Sequence) -> dict:
        return {
            "test_pairs": len(pairs),
            "accuracy": accuracy,
            "baseline_base_lm": base,
            "baseline_length": length_baseline_accuracy(pairs),
        }

    report: dict = {
        "artifact": str(config.artifact_dir),
        "split": config.split,
        "max_pairs_per_attribute": config.max_pairs_per_attribute,
        "formatting": {
            "max_prompt_tokens": encoder.max_prompt_tokens,
            "max_response_tokens": encoder.max_response_tokens,
        },
        "attributes": {
            name: row(arm_accuracy[name], base_accuracy[name], groups[name]) for name in attributes
        },
        "safety_hh_rlhf_test": row(arm_hh, base_hh, hh_pairs),
        "mean_accuracy": _mean(list(arm_accuracy.values())),
        "mean_baseline_base_lm": _mean(list(base_accuracy.values())),
        "mean_baseline_length": _mean([length_baseline_accuracy(groups[name]) for name in attributes]),
    }
    ablation_dir = config.ablation_artifact_dir
    if ablation_dir is not None and (Path(ablation_dir) / "arm_config.json").is_file():
        ablation_accuracy, ablation_hh = evaluate_arm(Path(ablation_dir), "ablation")
        report["ablation_no_pcgrad"] = {
            "artifact": str(ablation_dir),
            "attributes": {
                name: {"test_pairs": len(groups[name]), "accuracy": ablation_accuracy[name]}
                for name in attributes
            },
            "safety_hh_rlhf_test": {"test_pairs": len(hh_pairs), "accuracy": ablation_hh},
            "mean_accuracy": _mean(list(ablation_accuracy.values())),
        }
    else:
        report["ablation_no_pcgrad"] = {
            "artifact": str(ablation_dir) if ablation_dir else None,
            "status": "not evaluated: no ablation artifact found",
        }
    report["seconds"] = round(time.monotonic() - started, 1)
    report["command"] = config.command
    config.report_path.parent.mkdir(parents=True, exist_ok=True)
    config.report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
