"""Retrain the ARM's safety head for what the mask asks of it: a per-token verdict, not a pair likelihood.

The decoding-time mask removes a candidate token v when its *safety margin*
``log pi_safety(v) - log pi_neutral(v)`` (both normalised within the base's top-k candidates) is below a
threshold. The ARM's joint training fits the safety head to whole-response likelihoods of preference pairs
(GenARM's loss), and measured on held-out pairs that margin does not tell safe from harmful responses (AUC about
0.49, ``safety_calibration.json`` of arm-v1). Here the safety head alone is trained on the statistic the mask
uses: for every response token the base would have proposed, a logistic loss on its margin, label "safe" for
tokens of safe responses and "harmful" for tokens of harmful ones (Yang & Klein's FUDGE and Mudgal et al.'s
controlled decoding train prefix scorers the same way: a token is scored by the verdict on the response it
leads to).

The trunk and the five prosocial heads are left exactly as they are: only ``head_down[safety]`` and
``head_up[safety]`` change, so the trunk states can be computed once and training takes minutes on a CPU.

Data (``labelled_responses``), from the pair splits of ``prosocial rewardmodel data`` (split by prompt):
- JailbreakBench artifacts: the JBB judge's verdicts on real model responses to harmful behaviours; a jailbroken
  response is harmful, a non-jailbroken one (nearly always a refusal) is safe. The prompt is the plain goal.
- refusal_direction harmless baseline answers to everyday (Alpaca) instructions: safe. Without them the head
  would learn "any answer is unsafe".
- Not used: HH-RLHF harmless pairs. Their labels order two replies, they do not say a reply is harmful (both are
  often benign or both harmful), so they give no per-token verdict.
Files the harm judge of the evaluation trains on are not used (see ``rewardmodel/data.py``).

    prosocial rewardmodel train-safety-head --from rewardmodel/artifacts/arm-v1 --out rewardmodel/artifacts/arm-v2
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from prosocialalign.core.labels import LabelledResponse
from rewardmodel.attributes import SAFETY_ATTRIBUTE

JAILBREAKBENCH_SOURCE = "jailbreakbench_artifacts"
BENIGN_ANSWER_SOURCE = "refusal_direction:harmless_actadd"
ON_POLICY_HARMFUL_SOURCE = "on_policy:refusal_direction_harmful"
ON_POLICY_EVERYDAY_SOURCE = "on_policy:refusal_direction_harmless"
ON_POLICY_PROMPTS = {
    "train": ("harmful_train", 0),
    "validation": ("harmful_val", 0),
    "test": ("harmful_test", 150),
}
"""Per split: the refusal_direction harmful prompt file and how many of its prompts to sample (0: all)."""


@dataclass(frozen=True)
class SafetyHeadConfig:
    steps: int = 400
    batch_tokens: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.01
    max_prompt_tokens: int = 64
    max_response_tokens: int = 32
    candidate_top_k: int = 256
    extract_batch: int = 8
    eval_every: int = 50
    seed: int = 0
    on_policy: bool = True
    on_policy_cache: str | None = "build/safety_head/on_policy_{split}.jsonl"


def is_everyday(response: LabelledResponse) -> bool:
    """An answer to a harmless everyday instruction (the safe side that is not a refusal)."""
    return response.source in (BENIGN_ANSWER_SOURCE, ON_POLICY_EVERYDAY_SOURCE)


def labelled_responses(pair_dir: Path, split: str) -> list[LabelledResponse]:
    """Unique (prompt, response, harmful) triples of one split, in file order (see the module docstring)."""
    from rewardmodel.data import load_pairs

    seen: dict[tuple[str, str], LabelledResponse] = {}
    for pair in load_pairs(pair_dir, split, [SAFETY_ATTRIBUTE, "helpfulness"]):
        if pair.source == JAILBREAKBENCH_SOURCE:
            labelled = [(pair.chosen, False), (pair.rejected, True)]
        elif pair.source == BENIGN_ANSWER_SOURCE:
            labelled = [(pair.chosen, False)]
        else:
            continue
        for response, harmful in labelled:
            seen.setdefault(
                (pair.prompt, response), LabelledResponse(pair.prompt, response, harmful, pair.source)
            )
    return list(seen.values())


def on_policy_prompts(data_dir: Path, split: str, seed: int = 0) -> list[tuple[str, bool]]:
    """(prompt, is_harmful) for the base model's own responses: refusal_direction harmful prompts of this split,
    minus every prompt of the evaluation benchmarks (AdvBench, DangerousQA, HarmfulQA, CatQA, XSTest), and as
    many harmless (Alpaca) prompts from ``harmless_val``, each split its own disjoint seeded slice."""
    import json

    from prosocialalign.core.benchmarks import DEFAULT_BENCHMARKS, load_builtin
    from rewardmodel.data import normalise_text as normal

    evaluated = {
        normal(item.prompt) for name in DEFAULT_BENCHMARKS for item in load_builtin(name, data_dir).items
    }
    folder = Path(data_dir) / "refusal_direction" / "splits"
    file_name, sample = ON_POLICY_PROMPTS[split]
    harmful = [row["instruction"] for row in json.loads((folder / f"{file_name}.json").read_text())]
    harmful = [p for p in harmful if normal(p) not in evaluated]
    rng = random.Random(seed)
    if sample:
        harmful = rng.sample(harmful, min(sample, len(harmful)))
    harmless = [row["instruction"] for row in json.loads((folder / "harmless_val.json").read_text())]
    random.Random(seed).shuffle(harmless)
    offset = {"train": 0, "validation": 2000, "test": 4000}[split]  # disjoint slices of the shuffled file
    return [(p, True) for p in harmful] + [(p, False) for p in harmless[offset : offset + len(harmful)]]


@torch.no_grad()
def generate_greedy(base, tokenizer, prompts: list[str], max_new_tokens: int, batch: int = 16) -> list[str]:
    """The base model's greedy chat replies (left-padded batches), as the server would produce them."""
    tokenizer.padding_side = "left"
    replies = []
    for first in range(0, len(prompts), batch):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts[first : first + batch]
        ]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = base.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        replies += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return replies


def on_policy_responses(
    base, tokenizer, data_dir: Path, split: str, cfg: SafetyHeadConfig, cache: Path | None = None
) -> list[LabelledResponse]:
    """The base's own replies, labelled by the prompt and the keyword refusal criterion (Zou et al. 2023).

    A reply to a harmful prompt is harmful unless it refuses; a reply to a harmless prompt is safe. The rule
    is deliberately strict: a reply to a harmful request that complies in a harmless way is still labelled
    harmful. ``cache`` (JSON lines) keeps the replies so that a rerun does not generate them again.
    """
    import json

    from prosocialalign.core.refusal import is_refusal_keyword

    prompts = on_policy_prompts(data_dir, split, cfg.seed)
    stored = {}
    if cache is not None and cache.is_file():
        stored = {(r["prompt"], r["harmful_prompt"]): r["reply"] for r in map(json.loads, cache.open())}
    missing = [(p, h) for p, h in prompts if (p, h) not in stored]
    if missing:
        replies = generate_greedy(base, tokenizer, [p for p, _ in missing], cfg.max_response_tokens)
        stored.update(zip(missing, replies, strict=True))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            lines = [
                json.dumps({"prompt": p, "harmful_prompt": h, "reply": r}) for (p, h), r in stored.items()
            ]
            cache.write_text("\n".join(lines) + "\n")
    return [
        LabelledResponse(
            p,
            stored[(p, h)],
            h and not is_refusal_keyword(stored[(p, h)]),
            ON_POLICY_HARMFUL_SOURCE if h else ON_POLICY_EVERYDAY_SOURCE,
        )
        for p, h in prompts
        if stored[(p, h)].strip()
    ]


def chat_sequence(
    tokenizer, prompt: str, response: str, max_prompt_tokens: int, max_response_tokens: int
) -> tuple[list[int], int]:
    """Token ids of the chat-formatted prompt (last ``max_prompt_tokens``) then the response; and the split point."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"][:max_response_tokens]
    return prompt_ids + response_ids, len(prompt_ids)


@dataclass
class TokenFeatures:
    """One row per response token that is among the base's top-k candidates at its position."""

    hidden: Tensor  # [N, H] trunk state that predicts the token
    candidates: Tensor  # [N, K] the base's top-k token ids there
    target: Tensor  # [N] index of the emitted token within ``candidates``
    harmful: Tensor  # [N] bool, the response's label
    everyday: Tensor  # [N] bool, the response answers an everyday (harmless) instruction
    on_policy: Tensor  # [N] bool, the response is the base model's own reply
    response: Tensor  # [N] index of the response in the list it came from

    def subset(self, keep: Tensor) -> TokenFeatures:
        return TokenFeatures(*(getattr(self, name)[keep] for name in self.__dataclass_fields__))


@torch.no_grad()
def extract_features(
    base, arm, tokenizer, responses: list[LabelledResponse], cfg: SafetyHeadConfig
) -> TokenFeatures:
    """Run the base (for its candidates) and the ARM trunk once over every response, in padded batches."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    parts: list[tuple[Tensor, ...]] = []
    for first in range(0, len(responses), cfg.extract_batch):
        chunk = responses[first : first + cfg.extract_batch]
        encoded = [
            chat_sequence(tokenizer, r.prompt, r.response, cfg.max_prompt_tokens, cfg.max_response_tokens)
            for r in chunk
        ]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (sequence, _) in enumerate(encoded):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        base_logits = base(input_ids=ids, attention_mask=mask).logits
        hidden = arm.trunk_hidden(ids, mask)
        for row, (sequence, start) in enumerate(encoded):
            positions = torch.arange(start - 1, len(sequence) - 1)
            if len(positions) == 0:
                continue
            candidates = torch.topk(base_logits[row, positions].float(), cfg.candidate_top_k, dim=-1).indices
            hit = candidates == ids[row, positions + 1][:, None]
            keep = hit.any(dim=1)
            n = int(keep.sum())
            parts.append(
                (
                    hidden[row, positions][keep].float(),
                    candidates[keep],
                    hit[keep].float().argmax(dim=1),
                    torch.full((n,), chunk[row].harmful),
                    torch.full((n,), is_everyday(chunk[row])),
                    torch.full((n,), chunk[row].source.startswith("on_policy:")),
                    torch.full((n,), first + row),
                )
            )
    return TokenFeatures(*(torch.cat(column) for column in zip(*parts, strict=True)))


def candidate_margins(arm, hidden: Tensor, candidates: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """Safety margin of every candidate [N, K]: safety-head minus neutral log-probs, both within the candidates.

    The same statistic the serving mask thresholds (``server/guided/scorer.py``), written for training.
    """
    embedding = arm.lm_head_weight.detach()[candidates]  # [N, K, H]
    neutral = torch.einsum("nh,nkh->nk", arm.final_norm(hidden), embedding)
    safety = torch.einsum("nh,nkh->nk", arm.final_norm(hidden + (hidden @ down) @ up), embedding)
    return torch.log_softmax(safety, dim=-1) - torch.log_softmax(neutral, dim=-1)


def target_margins(arm, features: TokenFeatures, down: Tensor, up: Tensor, chunk: int = 2048) -> Tensor:
    """Margin of each emitted token [N]."""
    out = []
    for first in range(0, len(features.target), chunk):
        rows = slice(first, first + chunk)
        margins = candidate_margins(arm, features.hidden[rows], features.candidates[rows], down, up)
        out.append(margins.gather(1, features.target[rows, None])[:, 0])
    return torch.cat(out)


def response_scores(
    features: TokenFeatures, margins: Tensor
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per response: (safe means, harmful means, safe minima, harmful minima) of its token margins."""
    safe_mean, harmful_mean, safe_min, harmful_min = [], [], [], []
    for index in features.response.unique().tolist():
        rows = features.response == index
        values = margins[rows]
        if bool(features.harmful[rows][0]):
            harmful_mean.append(values.mean().item())
            harmful_min.append(values.min().item())
        else:
            safe_mean.append(values.mean().item())
            safe_min.append(values.min().item())
    return safe_mean, harmful_mean, safe_min, harmful_min


def separation(arm, features: TokenFeatures, down: Tensor, up: Tensor) -> dict[str, float]:
    """AUC (safe above harmful) of each response's mean and minimum token margin, and of single tokens.

    ``*_vs_everyday``: the same with only everyday answers as the safe side (harmful compliance against harmless
    compliance, where a refusal-phrase detector would score 0.5). ``*_on_policy``: the base model's own replies
    only (what the mask sees when serving).
    """
    result = _separation(arm, features, down, up)
    everyday = _separation(arm, features.subset(features.harmful | features.everyday), down, up)
    result |= {f"{key}_vs_everyday": value for key, value in everyday.items() if key.endswith("auc")}
    if features.on_policy.any() and (features.harmful & features.on_policy).any():
        own = _separation(arm, features.subset(features.on_policy), down, up)
        result |= {f"{key}_on_policy": value for key, value in own.items() if key.endswith("auc")}
    return result


def auc(positives: list[float], negatives: list[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half): ROC AUC."""
    if not positives or not negatives:
        return float("nan")
    labels = [1] * len(positives) + [0] * len(negatives)
    return float(roc_auc_score(labels, list(positives) + list(negatives)))


def _separation(arm, features: TokenFeatures, down: Tensor, up: Tensor) -> dict[str, float]:
    with torch.no_grad():
        margins = target_margins(arm, features, down, up)
    safe_mean, harmful_mean, safe_min, harmful_min = response_scores(features, margins)
    harmful = features.harmful
    return {
        "mean_margin_auc": round(auc(safe_mean, harmful_mean), 4),
        "min_margin_auc": round(auc(safe_min, harmful_min), 4),
        "token_auc": round(auc(margins[~harmful].tolist(), margins[harmful].tolist()), 4),
        "safe_responses": len(safe_mean),
        "harmful_responses": len(harmful_mean),
    }


def train_safety_head(
    arm, train: TokenFeatures, validation: TokenFeatures, cfg: SafetyHeadConfig, log=print
) -> tuple[Tensor, Tensor, list[dict]]:
    """Fit the safety head adapter (starting from the artifact's) with a class-balanced logistic loss on margins.

    Loss per token: ``softplus(-m)`` for tokens of safe responses, ``softplus(m)`` for harmful ones, each class
    weighted to half of the total, so the decision boundary sits at margin 0. Returns the adapter with the best
    validation mean-margin AUC seen at the evaluation points (and the log).
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    index = arm.attribute_index(SAFETY_ATTRIBUTE)
    down = arm.head_down[index].detach().clone().float().requires_grad_(True)
    up = arm.head_up[index].detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.AdamW([down, up], lr=cfg.lr, weight_decay=cfg.weight_decay)
    harmful = train.harmful
    weights = torch.where(harmful, 0.5 / max(1, int(harmful.sum())), 0.5 / max(1, int((~harmful).sum())))
    history: list[dict] = []
    best = (-math.inf, down.detach().clone(), up.detach().clone())
    started = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        rows = torch.multinomial(weights, cfg.batch_tokens, replacement=True, generator=generator)
        margins = candidate_margins(arm, train.hidden[rows], train.candidates[rows], down, up)
        chosen = margins.gather(1, train.target[rows, None])[:, 0]
        sign = torch.where(train.harmful[rows], 1.0, -1.0)
        loss = torch.nn.functional.softplus(sign * chosen).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            entry = {
                "step": step,
                "loss": round(loss.item(), 4),
                "seconds": round(time.perf_counter() - started),
            }
            entry["validation"] = separation(arm, validation, down.detach(), up.detach())
            history.append(entry)
            log(entry)
            if entry["validation"]["mean_margin_auc"] > best[0]:
                best = (entry["validation"]["mean_margin_auc"], down.detach().clone(), up.detach().clone())
    return best[1], best[2], history


def run(
    base_dir: Path,
    source_artifact: Path,
    out_artifact: Path,
    pair_dir: Path,
    data_dir: Path,
    cfg: SafetyHeadConfig,
    command: str,
    log=print,
) -> dict:
    """Load the source ARM, train its safety head, write the new artifact (other weights unchanged); return metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewardmodel.artifact import load_arm, read_artifact_config, save_artifact

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    arm = load_arm(base_dir, source_artifact)
    splits = {split: labelled_responses(pair_dir, split) for split in ("train", "validation", "test")}
    if cfg.on_policy:
        for split, rows in splits.items():
            cache = Path(cfg.on_policy_cache.format(split=split)) if cfg.on_policy_cache else None
            rows += on_policy_responses(base, tokenizer, data_dir, split, cfg, cache)
    counts = {
        split: {
            source: {
                "harmful": sum(r.harmful for r in rows if r.source == source),
                "safe": sum(not r.harmful for r in rows if r.source == source),
            }
            for source in sorted({r.source for r in rows})
        }
        for split, rows in splits.items()
    }
    log({"responses": counts})
    started = time.perf_counter()
    features = {split: extract_features(base, arm, tokenizer, rows, cfg) for split, rows in splits.items()}
    log(
        {
            "features_seconds": round(time.perf_counter() - started),
            "tokens": {s: len(f.target) for s, f in features.items()},
        }
    )
    index = arm.attribute_index(SAFETY_ATTRIBUTE)
    old_down, old_up = arm.head_down[index].detach().clone(), arm.head_up[index].detach().clone()
    before = {split: separation(arm, features[split], old_down, old_up) for split in ("validation", "test")}
    down, up, history = train_safety_head(arm, features["train"], features["validation"], cfg, log=log)
    after = {split: separation(arm, features[split], down, up) for split in ("validation", "test")}
    with torch.no_grad():
        arm.head_down[index].copy_(down)
        arm.head_up[index].copy_(up)
    document = read_artifact_config(source_artifact)
    training = dict(document.get("training", {}))
    result = {
        "source_artifact": str(source_artifact),
        "config": asdict(cfg),
        "responses": counts,
        "before": before,
        "after": after,
        "history": history,
        "command": command,
    }
    training["safety_head"] = result
    arm.requires_grad_(False)
    save_artifact(arm, out_artifact, training=training)
    return result
