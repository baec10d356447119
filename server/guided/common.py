"""What both vLLM adapters (``v1``, ``v2``) share: reading the guidance spec (``server.guided.spec``) from
``SamplingParams``, and the scorer built from vLLM's config on the engine's device.

Imported by the API process too (vLLM loads the processor class there for ``validate_params``): the ARM and the
telemetry socket are only touched in ``build_scorer``, which runs in the engine's worker.
"""

from __future__ import annotations

import torch

from server.guided.config import SPECULATIVE_DECODING_REFUSED, ProcessorConfig
from server.guided.kernels import engine_kernels
from server.guided.scorer import LexicographicScorer, symbol_token_mask
from server.guided.spec import GuidanceSpec


def guidance_spec(sampling_params) -> GuidanceSpec | None:
    """The spec of a request the processor must guide (None: unguided, including a spec that needs no ARM)."""
    spec = GuidanceSpec.from_extra_args(sampling_params.extra_args)
    return spec if spec is not None and spec.needs_arm else None


def validate_spec(sampling_params) -> None:
    """Both adapters' ``validate_params``: vLLM turns the ``ValueError`` into a 400 at admission."""
    GuidanceSpec.from_extra_args(sampling_params.extra_args)


def refuse_speculative_decoding(vllm_config) -> None:
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise ValueError(SPECULATIVE_DECODING_REFUSED)


def symbol_tokens(base_dir: str, vocab_size: int | None) -> torch.Tensor:
    """The coherence guard's symbol tokens of the served vocabulary (ids past the tokenizer's: not symbols;
    ``vocab_size`` None: the tokenizer's)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    vocab_size = vocab_size or len(tokenizer)
    decoded = [tokenizer.decode([i]) for i in range(min(vocab_size, len(tokenizer)))]
    decoded += ["x"] * (vocab_size - len(decoded))
    return symbol_token_mask(decoded)


def _vocab_size(vllm_config) -> int | None:
    model_config = getattr(vllm_config, "model_config", None)
    return model_config.get_vocab_size() if model_config is not None else None


def build_scorer(vllm_config, device: torch.device, slots: int | None = None) -> LexicographicScorer:
    """The scorer with its ARM runtime, both on the engine's ``device``, from the settings the API process put
    in ``additional_config``; ``slots`` overrides the configured slot count (V2 knows the engine's own)."""
    from rewardmodel.runtime import ArmRuntime
    from server.telemetry import TelemetryPublisher

    config = ProcessorConfig.from_vllm_config(vllm_config)
    slots = slots or config.slots
    publisher = TelemetryPublisher(config.telemetry_address)
    dtype = getattr(torch, config.dtype)

    def load_runtime() -> ArmRuntime:
        return ArmRuntime.from_artifact(
            config.base_dir,
            config.artifact_dir,
            slots,
            config.max_len,
            dtype,
            device,
            *engine_kernels(),
        )

    return LexicographicScorer(
        load_runtime,
        slots=slots,
        candidate_top_k=config.candidate_top_k,
        eos_token_id=config.eos_token_id,
        publish=publisher.send,
        fault_after_steps=config.fault_after_steps,
        symbol_tokens=symbol_tokens(config.base_dir, _vocab_size(vllm_config)).to(device),
        device=device,
    )
