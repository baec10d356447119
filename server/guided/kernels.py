"""The engine's kernels for the ARM's trunk, shared by both vLLM adapters (``v1``, ``v2``).

On the CPU, vLLM's own kernels (the ones serving the base model); elsewhere PyTorch's, which already are the
engine's. Kept out of the adapters so that either imports without the other's vLLM interface.
"""

from __future__ import annotations

import functools

import torch


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
