"""A lean, KV-cached runtime for the trained ARM, batched over the engine's running requests.

It reads like a small Llama: embedding -> ``num_layers`` decoder blocks (RMSNorm, rotary GQA attention, SwiGLU
MLP) -> per-attribute head adapters -> final norm -> tied head. Each running request owns one *slot* of a
preallocated KV cache; its prompt is prefilled once, then every step feeds only the newly sampled token. Heads
are evaluated on a small candidate set per row (the base model's top-k), so one step costs the trunk on one
token per row plus ``(attributes + 1) x k`` dot products.

The matrix product, the attention and the small fused operations (RMSNorm with the residual add, rotary
embedding, SwiGLU) are injectable (``linear=``, ``attention=``, ``ops=``): the defaults are plain PyTorch and run on
any device; the vLLM adapters pass the engine's own CPU kernels (``server/guided/kernels.py``).

Weights come from ``rewardmodel.artifact.arm_weights_for_serving`` (LoRA already merged into the trunk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ArmShape:
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    vocab: int
    attributes: tuple[str, ...]

    @classmethod
    def from_llama_config(cls, cfg, attributes: tuple[str, ...]) -> ArmShape:
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            eps=float(cfg.rms_norm_eps),
            rope_theta=float(theta),
            vocab=cfg.vocab_size,
            attributes=tuple(attributes),
        )


class ArmKVCache:
    """Keys and values of every slot, one block per slot in the layout of vLLM's paged CPU attention.

    Per layer ``[slots, kv_heads, 2 * max_len, head_dim]``: a slot's keys, then its values. How the key half is laid
    out inside is the attention implementation's business (vLLM's kernel packs it), so slots are moved whole.
    """

    def __init__(
        self, shape: ArmShape, slots: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.kv = torch.zeros(
            (shape.num_layers, slots, shape.kv_heads, 2 * max_len, shape.head_dim), dtype=dtype, device=device
        )
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.shape = shape
        self.max_len = max_len

    @property
    def slots(self) -> int:
        return self.lengths.numel()

    def keys(self, layer: int) -> Tensor:
        """``[slots, kv_heads, max_len, head_dim]`` view of one layer's keys."""
        return self.kv[layer, :, :, : self.max_len]

    def values(self, layer: int) -> Tensor:
        return self.kv[layer, :, :, self.max_len :]

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        self.kv[:, dst] = self.kv[:, src]
        self.lengths[dst] = self.lengths[src]
        self.lengths[src] = 0

    def swap(self, a: int, b: int) -> None:
        self.kv[:, [a, b]] = self.kv[:, [b, a]]
        self.lengths[[a, b]] = self.lengths[[b, a]]


Linear = Callable[[Tensor], Tensor]
LinearFactory = Callable[[Tensor], Linear]  # weight [out, in] -> (x [..., in] -> x @ weight.T)


def torch_linear(weight: Tensor) -> Linear:
    """PyTorch's own matrix product (the default; an engine may pass its faster kernel, see ``server/guided``)."""
    return lambda x: F.linear(x, weight)


@dataclass
class _Step:
    """What every layer of one ARM pass needs to know about where its tokens go."""

    slots: Tensor  # [B] cache slot of each row
    positions: Tensor  # [B, T] position of each new token
    rope: object = None  # the ops' rotary tables for these positions, built once for all layers
    plan: object = None  # the attention implementation's per-pass bookkeeping, built once for all layers


def rope_inv_freq(shape: ArmShape, device: torch.device | str) -> Tensor:
    """Llama's rotary frequencies, one per pair of channels ``[head_dim / 2]``."""
    half = torch.arange(0, shape.head_dim, 2, dtype=torch.float32, device=device)
    return 1.0 / (shape.rope_theta ** (half / shape.head_dim))


class TorchTrunkOps:
    """The trunk's element-wise operations in plain PyTorch, as transformers' Llama computes them (any device).

    Activations are ``[tokens, hidden]``. ``add_rms_norm`` returns ``(norm(x + residual), x + residual)``; an engine
    may do it in place in one fused kernel (``server/guided``), so callers use only what it returns.
    """

    def __init__(self, shape: ArmShape, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        self.inv_freq = rope_inv_freq(shape, device)
        self.shape, self.dtype = shape, dtype

    @staticmethod
    def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """As transformers' LlamaRMSNorm: normalise in float32, scale in the weight's dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        residual = residual + x
        return self.rms_norm(residual, weight, eps), residual

    @staticmethod
    def silu_and_mul(gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin ``[tokens, 1, head_dim]`` for flat ``positions``."""
        freqs = positions.float()[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def rope(self, q: Tensor, k: Tensor, tables: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Rotate ``q`` [tokens, heads * D] and ``k`` [tokens, kv_heads * D] (GPT-NeoX layout, as Llama)."""
        cos, sin = tables
        D = self.shape.head_dim
        q, k = q.view(q.shape[0], -1, D), k.view(k.shape[0], -1, D)
        return (q * cos + rotate_half(q) * sin).flatten(1), (k * cos + rotate_half(k) * sin).flatten(1)


class TorchAttention:
    """Attention in plain PyTorch, on any device: SDPA for prompts, two grouped products for one-token steps.

    Keys and values are written position by position into the cache's natural ``[..., position, head_dim]``
    layout. An engine may pass its own kernel instead (``server/guided``), with the same interface.
    """

    length_multiple = 1  # cache lengths this implementation needs (a paged kernel wants whole blocks)

    def plan(self, cache: ArmKVCache, slots: Tensor, positions: Tensor) -> dict:
        B = slots.numel()
        attend_len = int(positions.max()) + 1  # one read of the longest row
        first = int(slots[0])
        consecutive = bool(torch.equal(slots, torch.arange(first, first + B, device=slots.device)))
        key_pos = torch.arange(attend_len, device=slots.device)
        return {
            # Consecutive slots (the usual batch) are read as a view of the cache, others are gathered.
            "rows": slice(first, first + B) if consecutive else slots,
            "attend_len": attend_len,
            "mask": (key_pos[None, None, :] <= positions[:, :, None])[:, None],  # [B, 1, T, attend_len]
        }

    def __call__(self, cache: ArmKVCache, layer: int, step: _Step, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store ``k``/``v`` [B, T, kv_heads, D], attend with ``q`` [B, T, heads, D]; returns [B, T, heads * D]."""
        B, T, heads, D = q.shape
        keys, values, plan = cache.keys(layer), cache.values(layer), step.plan
        rows = step.slots[:, None].expand(B, T)
        keys[rows, :, step.positions] = k
        values[rows, :, step.positions] = v
        keys = keys[plan["rows"], :, : plan["attend_len"]]
        values = values[plan["rows"], :, : plan["attend_len"]]
        if T == 1:
            out = self._decode(q, keys, values, plan["mask"])
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=plan["mask"], enable_gqa=True
            ).transpose(1, 2)
        return out.reshape(B, T, heads * D)

    @staticmethod
    def _decode(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """One query per row, grouped-query attention as two small batched products.

        CPU SDPA kernels are built for long queries; for a single one they cost several times these products.
        Keys and values are packed first: a batched product over a strided view of the cache takes a slow path,
        the packing copy costs less. Only the [B, heads, L] scores are softmaxed in float32.
        """
        B, _, heads, D = q.shape
        kv = keys.shape[1]
        grouped = q.reshape(B, kv, heads // kv, D) * D**-0.5  # query head j reads key/value head j // group
        scores = (grouped @ keys.contiguous().transpose(-1, -2)).float()  # [B, kv, group, L]
        scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, L]
        return torch.softmax(scores, dim=-1).to(values.dtype) @ values.contiguous()  # [B, kv, group, D]


class Attention(Protocol):
    """Stores a layer's new keys/values in the cache and attends over each row's prefix (see TorchAttention)."""

    length_multiple: int

    def plan(self, cache: ArmKVCache, slots: Tensor, positions: Tensor) -> object: ...

    def __call__(
        self, cache: ArmKVCache, layer: int, step: _Step, q: Tensor, k: Tensor, v: Tensor
    ) -> Tensor: ...


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ArmRuntime:
    """Batched, slot-indexed ARM inference (see module docstring)."""

    def __init__(
        self,
        weights: dict[str, Tensor],
        shape: ArmShape,
        slots: int,
        max_len: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        linear: LinearFactory = torch_linear,
        attention: Attention | None = None,
        ops: Callable[..., TorchTrunkOps] = TorchTrunkOps,
    ) -> None:
        self.shape = shape
        self.dtype = dtype
        self.device = torch.device(device)
        self.w = {name: t.to(self.device, dtype) for name, t in weights.items()}
        self.lm_head = self.w["lm_head.weight"]
        # Head adapters stacked as [A, H, r] / [A, r, H] in shape.attributes order.
        self.head_down = torch.stack([self.w[f"head_adapters.{a}.down"] for a in shape.attributes])
        self.head_up = torch.stack([self.w[f"head_adapters.{a}.up"] for a in shape.attributes])
        # Per layer, q/k/v and gate/up fused into one [out, H] matrix each: a decode step on a small batch is
        # dominated by per-op overhead, so 4 matrix products per layer instead of 7, each through ``linear``.
        self.layers = [self._fuse(i, linear) for i in range(shape.num_layers)]
        self.w = {name: t for name, t in self.w.items() if not name.startswith("layers.")}
        self.attention = attention or TorchAttention()
        self.max_len = max_len
        multiple = self.attention.length_multiple  # the cache itself may be longer than max_len
        self.cache = ArmKVCache(shape, slots, -(-max_len // multiple) * multiple, dtype, self.device)
        self.ops = ops(shape, self.cache.max_len, dtype, self.device)

    @classmethod
    def from_artifact(
        cls,
        base_dir: Path,
        artifact_dir: Path,
        slots: int,
        max_len: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        linear: LinearFactory = torch_linear,
        attention: Attention | None = None,
        ops: Callable[..., TorchTrunkOps] = TorchTrunkOps,
    ) -> ArmRuntime:
        from rewardmodel.artifact import arm_weights_for_serving, load_arm

        arm = load_arm(Path(base_dir), Path(artifact_dir), dtype=torch.float32)
        shape = ArmShape.from_llama_config(arm.llama_config, tuple(arm.config.attributes))
        weights = arm_weights_for_serving(arm)
        return cls(weights, shape, slots, max_len, dtype, device, linear, attention, ops)

    # ------------------------------------------------------------------------------------------- the trunk
    def _fuse(self, i: int, make: LinearFactory) -> dict:
        w, p = self.w, f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        return {
            "norm1": w[p + "input_layernorm.weight"],
            "norm2": w[p + "post_attention_layernorm.weight"],
            "qkv": make(torch.cat([w[attn + f"{n}_proj.weight"] for n in "qkv"]).contiguous()),
            "o": make(w[attn + "o_proj.weight"].contiguous()),
            "gate_up": make(torch.cat([w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]]).contiguous()),
            "down": make(w[mlp + "down_proj.weight"].contiguous()),
        }

    def _attend(self, i: int, h: Tensor, step: _Step) -> Tensor:
        """Layer ``i``'s attention on normed ``h`` [B * T, H] (its keys and values go into the cache)."""
        s, layer = self.shape, self.layers[i]
        B, T = step.positions.shape
        q, k, v = layer["qkv"](h).split(
            [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1
        )
        q, k = self.ops.rope(q, k, step.rope)
        heads = (B, T, -1, s.head_dim)
        attn = self.attention(self.cache, i, step, q.reshape(heads), k.reshape(heads), v.reshape(heads))
        return layer["o"](attn.reshape(B * T, -1))

    @torch.inference_mode()
    def _run(self, slots: Tensor, tokens: Tensor) -> Tensor:
        """Append ``tokens`` [B, T] to ``slots`` [B] (all rows at their own offsets); last hidden state [B, H].

        Pre-norm decoder layers with the residual stream ``x`` carried beside the normed input ``h``, so each
        residual add and the next norm are one ``add_rms_norm``.
        """
        B, T = tokens.shape
        start = self.cache.lengths[slots]  # [B]
        positions = start[:, None] + torch.arange(T, device=self.device)  # [B, T]
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"ARM cache full: a sequence exceeds {self.max_len} tokens")
        step = _Step(slots=slots, positions=positions, rope=self.ops.rope_tables(positions.reshape(-1)))
        step.plan = self.attention.plan(self.cache, slots, positions)
        ops, eps, layers = self.ops, self.shape.eps, self.layers
        x = F.embedding(tokens.reshape(-1), self.w["embed_tokens.weight"])  # [B * T, H]
        h = ops.rms_norm(x, layers[0]["norm1"], eps)
        for i, layer in enumerate(layers):
            h, x = ops.add_rms_norm(self._attend(i, h, step), x, layer["norm2"], eps)
            mlp = layer["down"](ops.silu_and_mul(layer["gate_up"](h)))
            if i + 1 < len(layers):
                h, x = ops.add_rms_norm(mlp, x, layers[i + 1]["norm1"], eps)
            else:
                x = x + mlp
        self.cache.lengths[slots] = start + T
        return x.view(B, T, -1)[:, -1]

    def prefill(self, slot: int, token_ids: list[int]) -> Tensor:
        """Feed a request's tokens into its (emptied) slot; returns the last position's hidden state [H]."""
        self.cache.free(slot)
        return self.extend(slot, token_ids)

    def extend(self, slot: int, token_ids: list[int]) -> Tensor:
        slots = torch.tensor([slot], device=self.device)
        return self._run(slots, torch.tensor([token_ids], device=self.device))[0]

    def decode(self, slots: list[int], token_ids: list[int]) -> Tensor:
        """One new token per row, all rows in one pass: hidden states [B, H]."""
        slot_t = torch.tensor(slots, device=self.device)
        return self._run(slot_t, torch.tensor(token_ids, device=self.device)[:, None])

    # ------------------------------------------------------------------------------------------- the heads
    @torch.inference_mode()
    def candidate_log_probs(self, hidden: Tensor, candidates: Tensor) -> Tensor:
        """Log-probabilities over each row's candidate tokens, normalised within the candidates.

        Returns [B, 1 + A, K]: index 0 is the attribute-neutral head (no adapter), then ``shape.attributes``.
        """
        low = torch.einsum("bh,ahr->bar", hidden, self.head_down)
        adapted = hidden[:, None] + torch.einsum("bar,arh->bah", low, self.head_up)  # [B, A, H]
        states = torch.cat([hidden[:, None], adapted], dim=1)
        normed = self.ops.rms_norm(states, self.w["norm.weight"], self.shape.eps)
        cand_emb = F.embedding(candidates, self.lm_head)  # [B, K, H]; 4x faster than lm_head[candidates]
        logits = torch.einsum("bah,bkh->bak", normed, cand_emb).float()
        return torch.log_softmax(logits, dim=-1)

    @torch.inference_mode()
    def full_log_probs(self, hidden: Tensor) -> Tensor:
        """Full-vocabulary log-probabilities [B, A, V] per attribute (for checks and offline scoring)."""
        low = torch.einsum("bh,ahr->bar", hidden, self.head_down)
        adapted = hidden[:, None] + torch.einsum("bar,arh->bah", low, self.head_up)
        normed = self.ops.rms_norm(adapted, self.w["norm.weight"], self.shape.eps)
        return torch.log_softmax((normed @ self.lm_head.T).float(), dim=-1)
