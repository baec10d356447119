"""GenARM's pairwise loss and the response log-likelihood it is built on.

The reward of a response under attribute a is ``r_a(x, y) = beta_r * sum_t log pi_a(y_t | x, y_<t)`` over the
response tokens only, and the loss per pair is ``-log sigmoid(r_a(x, y_w) - r_a(x, y_l))`` (Xu et al., GenARM,
ICLR 2025).

``DEFAULT_BETA_R = 0.1``: the gap between two responses' summed log-likelihoods (up to 64 tokens each) is tens of
nats, so beta_r = 0.1 maps typical gaps into the sigmoid's informative range (|beta_r * gap| <= ~3), where
every pair still carries gradient; beta_r = 1 would saturate most pairs from the first step and the loss would
be driven by a few badly ordered ones. (A FRESH 8-layer ARM is far from this regime: its gaps are hundreds of
nats, which the chosen-response NLL term in training brings down; see ``chosen_nll``.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rewardmodel.encoding import SequenceBatch


def select_response_positions(hidden: Tensor, batch: SequenceBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Hidden states that predict response tokens, their target ids and their row in the batch.

    Position t predicts token t+1, so the prediction for response token t+1 is read at position t. Only
    those positions are projected through the vocabulary-sized head: prompt positions would cost the same and
    be masked away.
    """
    target_mask = batch.response_mask[:, 1:]
    selected_hidden = hidden[:, :-1][target_mask]
    targets = batch.input_ids[:, 1:][target_mask]
    rows = torch.arange(len(batch), device=hidden.device).unsqueeze(1).expand_as(target_mask)[target_mask]
    return selected_hidden, targets, rows


def sum_response_log_probs(
    hidden: Tensor, batch: SequenceBatch, log_probs_fn: Callable[[Tensor], Tensor]
) -> Tensor:
    """``sum_t log p(y_t | x, y_<t)`` per row [N], where ``log_probs_fn`` maps hidden [M, H] -> log-probs [M, V]."""
    selected_hidden, targets, rows = select_response_positions(hidden, batch)
    token_log_probs = log_probs_fn(selected_hidden).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    totals = torch.zeros(len(batch), dtype=token_log_probs.dtype, device=token_log_probs.device)
    return totals.index_add(0, rows, token_log_probs)


def arm_response_log_probs(
    arm, batch: SequenceBatch, attribute_index: int, bf16_trunk: bool = False
) -> Tensor:
    """Summed response log-likelihood per row under one attribute's distribution (one trunk pass).

    ``bf16_trunk`` runs the trunk's matrix products in bfloat16 (autocast; about 2.4x faster on this CPU) while
    the head adapter, final norm, vocabulary projection and log-softmax stay in float32, so the summed
    log-likelihood keeps float32 resolution given the hidden state.
    """
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_trunk):
        hidden = arm.trunk_hidden(batch.input_ids, batch.attention_mask)
    return sum_response_log_probs(
        hidden.float(), batch, lambda h: arm.log_probs_from_hidden(arm.adapt(h, attribute_index))
    )


def genarm_pairwise_loss(chosen_log_probs: Tensor, rejected_log_probs: Tensor, beta_r: float) -> Tensor:
    """Mean over pairs of ``-log sigmoid(beta_r * (log pi(y_w|x) - log pi(y_l|x)))``."""
    if beta_r <= 0:
        raise ValueError(f"beta_r must be > 0, got {beta_r}")
    return -F.logsigmoid(beta_r * (chosen_log_probs - rejected_log_probs)).mean()


def chosen_nll(chosen_log_probs: Tensor, chosen_num_tokens: Tensor) -> Tensor:
    """Mean per-token negative log-likelihood of the chosen responses (the optional LM regulariser).

    Why: GenARM starts its ARM from a full language model whose likelihood is already good. Our ARM reads the
    base's head after only 8 of 30 layers and starts near 18 nats/token, worse than a uniform guess over the
    vocabulary (10.8); the pairwise loss only shapes DIFFERENCES between responses, so without this term each
    head may stay a poor language model, and decoding adds its log-probabilities to the base's.
    """
    return -(chosen_log_probs / chosen_num_tokens.clamp(min=1)).mean()


def pairwise_accuracy(chosen_scores: Tensor, rejected_scores: Tensor) -> float:
    """Share of pairs where the chosen response scores higher; an exact tie counts one half."""
    wins = (chosen_scores > rejected_scores).float() + 0.5 * (chosen_scores == rejected_scores).float()
    return float(wins.mean())
