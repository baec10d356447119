"""vLLM V1 logits-processor adapter for the lexicographic scorer.

vLLM builds this class inside the engine's worker process (the ARM lives there) and calls ``update_state`` with
the batch changes before every step, then ``apply`` with the step's logits. Requests without a guidance spec in
``SamplingParams.extra_args["prosocial"]`` are left alone; a step with no guided row returns at once.
"""

from __future__ import annotations

import functools

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from server.guided.config import ProcessorConfig
from server.guided.scorer import LexicographicScorer, symbol_token_mask

SPEC_KEY = "prosocial"
_SPEC_FIELDS = {
    "request_id",
    "prefs",
    "safety_mask",
    "safety_threshold",
    "response_threshold",
    "guard_tokens",
    "coherence_guard",
    "beta",
}


def guidance_spec(sampling_params) -> dict | None:
    extra = sampling_params.extra_args or {}
    spec = extra.get(SPEC_KEY)
    if spec is None or not (spec.get("prefs") is not None or spec.get("safety_mask")):
        return None
    return spec


def _cpu_linear(weight: torch.Tensor):
    """vLLM's CPU matrix product for the base model's layers: oneDNN with prepacked weights (1.5-2.5x PyTorch's
    product at the ARM's sizes)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


class VllmCpuAttention:
    """The ARM's attention through vLLM's own paged CPU attention kernels (the ones serving the base model).

    Each cache slot is one vLLM block of ``max_len`` positions, so the block table is just the slot number. One
    fused kernel reads every row's keys and values once; the PyTorch path packs them first, which made a step's cost
    grow with the context (`python -m bench.guided` reports ARM ms per token at 32 and 512 tokens).
    """

    length_multiple = 32  # the kernels' block sizes

    def __init__(self) -> None:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.ops = ops
        self._isa = functools.cache(_get_attn_isa)  # fixed per cache: looked up once, not every step

    def plan(self, cache, slots: torch.Tensor, positions: torch.Tensor) -> dict:
        B, T = positions.shape
        shape, dtype = cache.shape, cache.kv.dtype
        isa = self._isa(dtype, cache.max_len, shape.head_dim)
        seq_lens = (positions[:, -1] + 1).to(torch.int32)
        query_start = torch.arange(B + 1, dtype=torch.int32) * T
        return {
            "isa": isa,
            "seq_lens": seq_lens,
            "query_start": query_start,
            "block_table": slots.to(torch.int32)[:, None],
            "slot_mapping": (slots[:, None] * cache.max_len + positions).reshape(-1),
            # How the kernel splits the rows over threads, shared by every layer of the pass.
            "metadata": self.ops.cpu_attn_get_scheduler_metadata(
                B,
                shape.heads,
                shape.kv_heads,
                shape.head_dim,
                seq_lens,
                dtype,
                query_start,
                True,
                -1,
                isa,
                False,
            ),
            # One output buffer for every layer: each layer's output projection reads it before the next writes.
            "out": torch.empty(B * T, shape.heads, shape.head_dim, dtype=dtype),
        }

    def __call__(self, cache, layer: int, step, q, k, v) -> torch.Tensor:
        B, T, heads, D = q.shape
        plan, ops = step.plan, self.ops
        keys, values = cache.keys(layer), cache.values(layer)
        ops.cpu_attn_reshape_and_cache(
            k.reshape(B * T, -1, D), v.reshape(B * T, -1, D), keys, values, plan["slot_mapping"], plan["isa"]
        )
        ops.cpu_attention_with_kv_cache(
            q.reshape(B * T, heads, D),
            keys,
            values,
            plan["out"],
            plan["query_start"],
            plan["seq_lens"],
            D**-0.5,
            True,
            None,
            -1,
            plan["block_table"],
            0.0,
            plan["metadata"],
            None,
        )
        return plan["out"].view(B, T, heads * D)


class VllmCpuTrunkOps:
    """The trunk's RMSNorm (with the residual add), rotary embedding and SwiGLU through vLLM's fused CPU kernels.

    One kernel each instead of the 5-12 PyTorch operations of ``rewardmodel.runtime.TorchTrunkOps``: at the ARM's
    sizes a decode step is dominated by per-operation overhead. ``add_rms_norm`` works in place (``x`` becomes the
    normed sum, ``residual`` the sum), which the runtime allows: it uses only what the call returns.
    """

    def __init__(self, shape, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        from rewardmodel.runtime import rope_inv_freq

        self.C = torch.ops._C
        self.head_dim = shape.head_dim
        freqs = torch.arange(max_len, dtype=torch.float32, device=device)[:, None] * rope_inv_freq(
            shape, device
        )
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)  # [max_len, head_dim]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        self.C.rms_norm(out.view(-1, x.shape[-1]), x.view(-1, x.shape[-1]), weight, eps)
        return out

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple:
        self.C.fused_add_rms_norm(x, residual, weight, eps)
        return x, residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        out = gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
        self.C.silu_and_mul(out, gate_up)
        return out

    @staticmethod
    def rope_tables(positions: torch.Tensor) -> torch.Tensor:
        return positions  # the kernel reads the cos/sin cache at these positions

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple:
        self.C.rotary_embedding(positions, q, k, self.head_dim, self.cos_sin, True)  # in place, NeoX layout
        return q, k


def engine_kernels() -> tuple:
    """The (matrix product, attention, element-wise ops) the engine uses on this platform, for the ARM's trunk.

    On the CPU, vLLM's own kernels; elsewhere PyTorch's, which already are the engine's.
    """
    from vllm.platforms import current_platform

    from rewardmodel.runtime import TorchAttention, TorchTrunkOps, torch_linear

    if current_platform.is_cpu():
        return _cpu_linear, VllmCpuAttention(), VllmCpuTrunkOps
    return torch_linear, TorchAttention(), TorchTrunkOps


def _symbol_tokens(base_dir: str, vocab_size: int) -> torch.Tensor:
    """The coherence guard's symbol tokens of the served vocabulary (ids past the tokenizer's: not symbols)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    decoded = [tokenizer.decode([i]) for i in range(min(vocab_size, len(tokenizer)))]
    decoded += ["x"] * (vocab_size - len(decoded))
    return symbol_token_mask(decoded)


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
        if int(spec["guard_tokens"]) < 1:
            raise ValueError("prosocial guard_tokens must be at least 1")

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
                *engine_kernels(),
            )

        self.scorer = LexicographicScorer(
            load_runtime,
            slots=config.slots,
            candidate_top_k=config.candidate_top_k,
            eos_token_id=config.eos_token_id,
            publish=publisher.send,
            fault_after_steps=config.fault_after_steps,
            symbol_tokens=_symbol_tokens(config.base_dir, vllm_config.model_config.get_vocab_size()),
        )

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
