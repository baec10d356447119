"""vLLM V1 logits-processor adapter for the lexicographic scorer.

vLLM builds this class inside the engine's worker process (the ARM lives there) and calls ``update_state`` with
the batch changes before every step, then ``apply`` with the step's logits. Requests without a guidance spec in
``SamplingParams.extra_args["prosocial"]`` are left alone; a step with no guided row returns at once.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from server.guided.config import ProcessorConfig
from server.guided.scorer import LexicographicScorer

SPEC_KEY = "prosocial"
_SPEC_FIELDS = {"request_id", "prefs", "safety_mask", "safety_threshold", "beta"}


def guidance_spec(sampling_params) -> dict | None:
    extra = sampling_params.extra_args or {}
    spec = extra.get(SPEC_KEY)
    if spec is None or not (spec.get("prefs") is not None or spec.get("safety_mask")):
        return None
    return spec


def engine_linear():
    """The matrix product vLLM uses for the base model's layers on this platform, for the ARM's trunk.

    On the CPU that is oneDNN with prepacked weights (1.5-2.5x PyTorch's product at the ARM's sizes); elsewhere
    PyTorch's own product is already the engine's.
    """
    from vllm.platforms import current_platform

    from rewardmodel.runtime import torch_linear

    if not current_platform.is_cpu():
        return torch_linear
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    def make(weight: torch.Tensor):
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        return lambda x: layer.cpu_linear(x, layer.weight, None)

    return make


class ProsocialLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = (sampling_params.extra_args or {}).get(SPEC_KEY)
        if spec is None:
            return
        if not isinstance(spec, dict) or set(spec) != _SPEC_FIELDS:
            raise ValueError(f"extra_args['{SPEC_KEY}'] must have exactly the fields {sorted(_SPEC_FIELDS)}")
        prefs = spec["prefs"]
        if prefs is not None and (len(prefs) != 5 or any(w < 0 for w in prefs) or sum(prefs) <= 0):
            raise ValueError("prosocial prefs must be 5 non-negative weights with a positive sum")
        if float(spec["beta"]) <= 0:
            raise ValueError("prosocial beta must be positive")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        from rewardmodel.runtime import ArmRuntime
        from server.telemetry import TelemetryPublisher

        config = ProcessorConfig.from_vllm_config(vllm_config)
        publisher = TelemetryPublisher(config.telemetry_address)
        dtype = getattr(torch, config.dtype)

        def load_runtime() -> ArmRuntime:
            return ArmRuntime.from_artifact(
                config.base_dir,
                config.artifact_dir,
                config.slots,
                config.max_len,
                dtype,
                device,
                engine_linear(),
            )

        self.scorer = LexicographicScorer(
            load_runtime,
            slots=config.slots,
            candidate_top_k=config.candidate_top_k,
            eos_token_id=config.eos_token_id,
            publish=publisher.send,
            fault_after_steps=config.fault_after_steps,
        )

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token wins, so it must run for greedy batches too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.scorer.remove(index)
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
