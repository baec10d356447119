"""The ARM as an offline per-attribute scorer of finished responses (used by the evaluation harness).

A response's score for attribute a is the mean over its tokens of ``log pi_a(y_t) - log pi_neutral(y_t)``
(full-vocabulary log-probs): how much more the attribute's head likes the response than the attribute-free head
on the same trunk state. Subtracting the neutral head removes what every head shares (fluency, length), so the
scores compare attributes and responses, not plain likelihood.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from rewardmodel.paths import SERVED_ARM

MAX_PROMPT_TOKENS = 256
MAX_RESPONSE_TOKENS = 256


@lru_cache(maxsize=2)
def _load(artifact_dir: str):
    from transformers import AutoTokenizer

    from prosocialalign.core.models import prepare_default_model
    from rewardmodel.artifact import load_arm

    base = prepare_default_model()
    return AutoTokenizer.from_pretrained(base), load_arm(base, Path(artifact_dir)).eval()


@torch.no_grad()
def score_responses(
    prompts: list[str], responses: list[str], artifact_dir: Path | None = None
) -> list[dict[str, float]]:
    """Per-attribute ARM scores (see module docstring) for each (prompt, response); empty responses score 0."""
    artifact = Path(artifact_dir or SERVED_ARM)
    if not (artifact / "arm.safetensors").is_file():
        raise FileNotFoundError(f"no ARM artifact at {artifact}")
    tokenizer, arm = _load(str(artifact))
    results = []
    for prompt, response in zip(prompts, responses, strict=True):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"][-MAX_PROMPT_TOKENS:]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"][:MAX_RESPONSE_TOKENS]
        if not response_ids:
            results.append({a: 0.0 for a in arm.attributes})
            continue
        ids = torch.tensor([prompt_ids + response_ids])
        hidden = arm.trunk_hidden(ids)[0, len(prompt_ids) - 1 : -1]  # states that predict the response
        targets = torch.tensor(response_ids)
        neutral = arm.log_probs_from_hidden(hidden).gather(1, targets[:, None]).squeeze(1)
        scores = {}
        for index, attribute in enumerate(arm.attributes):
            lp = arm.log_probs_from_hidden(arm.adapt(hidden, index)).gather(1, targets[:, None]).squeeze(1)
            scores[attribute] = float((lp - neutral).mean())
        results.append(scores)
    return results
