"""A plain transformers implementation of the guided decoding rule, in the style of GenARM's code.

``transformers.generate`` drives the base model and a ``LogitsProcessor`` calls the ARM on the whole sequence at
every step (no ARM cache) and applies the same lexicographic rule as ``server.guided.scorer``. One generate call
serves one preference vector, so requests with different preferences cannot share a batch. It is the yardstick
for the served path: the correctness tests compare tokens with it, the benchmark compares speed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LogitsProcessor

from rewardmodel.attributes import PROSOCIAL_ATTRIBUTES, SAFETY_ATTRIBUTE
from rewardmodel.model import MultiAttributeARM


class ReferenceGuidedProcessor(LogitsProcessor):
    def __init__(
        self,
        arm: MultiAttributeARM,
        prefs: list[float] | None,
        safety_mask: bool,
        safety_threshold: float,
        beta: float,
        candidate_top_k: int,
        eos_token_id: int,
        pad_lengths: list[int],
        response_threshold: float | None = None,
        guard_tokens: int = 8,
    ) -> None:
        self.arm = arm
        self.prefs = torch.tensor(prefs) if prefs is not None else None
        self.safety_mask = safety_mask
        self.threshold = safety_threshold
        self.beta = beta
        self.k = candidate_top_k
        self.eos = eos_token_id
        self.pad_lengths = torch.tensor(pad_lengths)
        self.response_threshold = response_threshold
        self.guard_tokens = guard_tokens
        self.margins: list[list[float]] = [[] for _ in pad_lengths]  # safety margin of each emitted token
        self.previous: tuple[Tensor, Tensor] | None = None  # last step's candidates and margins
        self.pref_index = [arm.attribute_index(a) for a in PROSOCIAL_ATTRIBUTES]
        self.safety_index = arm.attribute_index(SAFETY_ATTRIBUTE)

    @torch.no_grad()
    def _last_hidden(self, input_ids: Tensor) -> Tensor:
        """The ARM's last-position trunk state for left-padded rows: [B, H]."""
        positions = torch.arange(input_ids.shape[1])[None, :] - self.pad_lengths[:, None]
        mask = (positions >= 0).long()
        out = self.arm.trunk(
            input_ids=input_ids, attention_mask=mask, position_ids=positions.clamp(min=0), use_cache=False
        )
        return out.last_hidden_state[:, -1]

    def _record_emitted(self, input_ids: Tensor) -> None:
        """Append the margin (from the previous step) of the token each row emitted last."""
        if self.previous is None:
            return
        cand, margin = self.previous
        for row, token in enumerate(input_ids[:, -1].tolist()):
            hit = (cand[row] == token).nonzero()
            if len(hit):
                self.margins[row].append(margin[row, hit[0, 0]].item())

    def _candidate_log_probs(self, hidden: Tensor, cand: Tensor) -> Tensor:
        """[B, 1 + A, K]: neutral head then every attribute, normalised within the candidates."""
        states = [hidden] + [self.arm.adapt(hidden, a) for a in range(len(self.arm.attributes))]
        normed = self.arm.final_norm(torch.stack(states, dim=1))
        emb = self.arm.lm_head_weight[cand]
        return torch.log_softmax(torch.einsum("bah,bkh->bak", normed, emb).float(), dim=-1)

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = scores.float()
        selection = scores.clone()
        selection[:, self.eos] = float("inf")
        cand = torch.topk(selection, self.k, dim=-1).indices
        lp = self._candidate_log_probs(self._last_hidden(input_ids), cand)
        rewards = lp[:, 1:, :] - lp[:, :1, :]  # each attribute's head against the neutral head
        score = scores.gather(1, cand)
        if self.prefs is not None:
            score = score + torch.einsum("p,bpk->bk", self.prefs, rewards[:, self.pref_index, :]) / self.beta
        margin = rewards[:, self.safety_index, :]
        self._record_emitted(input_ids)
        if self.safety_mask:
            unsafe = margin < self.threshold
            if self.response_threshold is not None:
                for row, emitted in enumerate(self.margins):
                    if (
                        len(emitted) >= self.guard_tokens
                        and sum(emitted) / len(emitted) < self.response_threshold
                    ):
                        unsafe[row] = True
            score = score.masked_fill(unsafe & (cand != self.eos), float("-inf"))
        self.previous = (cand, margin)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(1, cand, score)


def reference_generate(
    base_model,
    arm: MultiAttributeARM,
    prompts: list[list[int]],
    prefs: list[float] | None,
    max_new_tokens: int,
    *,
    safety_mask: bool = True,
    safety_threshold: float = -6.0,
    response_threshold: float | None = None,
    guard_tokens: int = 8,
    beta: float = 1.0,
    candidate_top_k: int = 256,
    eos_token_id: int = 2,
    pad_token_id: int = 2,
    ignore_eos: bool = False,
) -> list[list[int]]:
    """Greedy guided generation for prompts that share one preference vector; returns the new token ids."""
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    input_ids = torch.tensor([[pad_token_id] * n + p for n, p in zip(pads, prompts, strict=True)])
    attention = torch.tensor([[0] * n + [1] * len(p) for n, p in zip(pads, prompts, strict=True)])
    processor = ReferenceGuidedProcessor(
        arm,
        prefs,
        safety_mask,
        safety_threshold,
        beta,
        candidate_top_k,
        eos_token_id,
        pads,
        response_threshold,
        guard_tokens,
    )
    out = base_model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        logits_processor=[processor],
        eos_token_id=None if ignore_eos else eos_token_id,
        pad_token_id=pad_token_id,
    )
    results = []
    for row in out[:, width:].tolist():
        tokens = []
        for t in row:
            tokens.append(t)
            if t == eos_token_id and not ignore_eos:
                break
        results.append(tokens)
    return results
