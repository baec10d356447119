"""Turn preference pairs into token ids and padded batches, exactly as the serving path formats requests.

A sequence is ``chat_template(user=prompt, add_generation_prompt=True) + response tokens (+ <|im_end|>)`` with the
base tokenizer's ChatML template, because at serving time the ARM scores the very token ids the base model
sees and proposes. Truncation keeps the LAST ``max_prompt_tokens`` tokens of the prompt text (the end of a
conversation is what the answer responds to) and the FIRST ``max_response_tokens`` tokens of each response.
``<|im_end|>`` is appended only to a response that was not cut, so the end-of-turn token is only ever
rewarded where a response really ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

END_OF_TURN = "<|im_end|>"


class PairLike(Protocol):
    """What the encoder reads from a ``rewardmodel.data.PreferencePair``."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]


@dataclass
class SequenceBatch:
    """Right-padded sequences; ``response_mask`` is True at positions that hold response tokens (the targets)."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class PairEncoder:
    """Tokenizes prompts and responses with the base tokenizer and its chat template."""

    def __init__(self, tokenizer, max_prompt_tokens: int = 96, max_response_tokens: int = 64) -> None:
        if max_prompt_tokens < 1 or max_response_tokens < 1:
            raise ValueError("max_prompt_tokens and max_response_tokens must be >= 1")
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if end_id is None or end_id == tokenizer.unk_token_id:
            raise ValueError(
                f"tokenizer has no {END_OF_TURN} token: the ARM needs the base's ChatML tokenizer"
            )
        self.end_of_turn_id: int = int(end_id)
        pad = tokenizer.pad_token_id
        self.pad_id: int = int(pad if pad is not None else self.end_of_turn_id)

    def _content_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, prompt: str) -> list[int]:
        """Chat-template token ids for a single user turn, ending with the assistant header."""
        content = self._content_ids(prompt)
        if len(content) > self.max_prompt_tokens:
            prompt = self.tokenizer.decode(content[-self.max_prompt_tokens :])
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return self._content_ids(text)

    def encode_response(self, response: str) -> list[int]:
        ids = self._content_ids(response.strip())
        if len(ids) > self.max_response_tokens:
            return ids[: self.max_response_tokens]
        return ids + [self.end_of_turn_id]

    def encode_pair(self, pair: PairLike) -> EncodedPair:
        return EncodedPair(
            prompt_ids=tuple(self.encode_prompt(pair.prompt)),
            chosen_ids=tuple(self.encode_response(pair.chosen)),
            rejected_ids=tuple(self.encode_response(pair.rejected)),
        )


def collate_sequences(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> SequenceBatch:
    """Right-pad ``prompt + response`` rows into one batch with a mask over the response positions."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("need the same, non-zero number of prompts and responses")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    response_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        ids = list(prompt) + list(response)
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        response_mask[row, len(prompt) : len(ids)] = True
    return SequenceBatch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask)


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> SequenceBatch:
    """One batch holding the chosen responses in rows ``[0, n)`` and the rejected ones in rows ``[n, 2n)``."""
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return collate_sequences(prompts, responses, pad_id)
