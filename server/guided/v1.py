"""vLLM V1 logits-processor adapter for the lexicographic scorer.

vLLM builds this class inside the engine's worker process (the ARM lives there) and calls ``update_state`` with
the batch changes before every step, then ``apply`` with the step's logits. Requests without a guidance spec in
``SamplingParams.extra_args["prosocial"]`` are left alone; a step with no guided row returns at once.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from server.guided.common import build_scorer, guidance_spec, validate_spec


class ProsocialLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_spec(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.scorer = build_scorer(vllm_config, device)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token wins, so it must run for greedy batches too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.scorer.remove(index)
        # An added or moved request may take the index of a removed one that is then not listed in ``removed``
        # (``BatchUpdateBuilder.pop_removed``): the scorer parks whatever request held the slot.
        for index, params, prompt_ids, output_ids in batch_update.added:
            spec = guidance_spec(params)
            if spec is None:
                self.scorer.remove(index)
            else:
                self.scorer.add(index, spec, prompt_ids or [], output_ids)
        for src, dst, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.scorer.swap(src, dst)
            else:
                self.scorer.move(src, dst)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.scorer.apply(logits)
