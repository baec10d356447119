"""A lean, KV-cached runtime for the trained ARM, batched over the engine's running requests.

It reads like a small Llama: embedding -> ``num_layers`` decoder blocks (RMSNorm, rotary GQA attention, SwiGLU
MLP) -> per-attribute head adapters -> final norm -> tied head. Each running request owns one *slot* of a
preallocated KV cache; its prompt is prefilled once, then every step feeds only the newly sampled token. Heads
are evaluated on a small candidate set per row (the base model's top-k), so one step costs the trunk on one
token per row plus ``(attributes + 1) x k`` dot products.

Weights come from ``rewardmodel.artifact.arm_weights_for_serving`` (LoRA already merged into the trunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    """Keys and values of every slot: ``[layers, slots, kv_heads, max_len, head_dim]`` plus a length per slot."""

    def __init__(
        self, shape: ArmShape, slots: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        size = (shape.num_layers, slots, shape.kv_heads, max_len, shape.head_dim)
        self.k = torch.zeros(size, dtype=dtype, device=device)
        self.v = torch.zeros(size, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def slots(self) -> int:
        return self.lengths.numel()

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        n = int(self.lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0

    def swap(self, a: int, b: int) -> None:
        n = int(max(self.lengths[a], self.lengths[b]))
        for t in (self.k, self.v):
            tmp = t[:, a, :, :n].clone()
            t[:, a, :, :n] = t[:, b, :, :n]
            t[:, b, :, :n] = tmp
        self.lengths[[a, b]] = self.lengths[[b, a]]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """As transformers' LlamaRMSNorm: normalise in float32, scale in the weight's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


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
    ) -> None:
        self.shape = shape
        self.dtype = dtype
        self.device = torch.device(device)
        self.w = {name: t.to(self.device, dtype) for name, t in weights.items()}
        self.lm_head = self.w["lm_head.weight"]
        # Head adapters stacked as [A, H, r] / [A, r, H] in shape.attributes order.
        self.head_down = torch.stack([self.w[f"head_adapters.{a}.down"] for a in shape.attributes])
        self.head_up = torch.stack([self.w[f"head_adapters.{a}.up"] for a in shape.attributes])
        self.cache = ArmKVCache(shape, slots, max_len, dtype, self.device)
        half = torch.arange(0, shape.head_dim, 2, dtype=torch.float32, device=self.device)
        self.inv_freq = 1.0 / (shape.rope_theta ** (half / shape.head_dim))

    @classmethod
    def from_artifact(
        cls,
        base_dir: Path,
        artifact_dir: Path,
        slots: int,
        max_len: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> ArmRuntime:
        from rewardmodel.artifact import arm_weights_for_serving, load_arm

        arm = load_arm(Path(base_dir), Path(artifact_dir), dtype=torch.float32)
        shape = ArmShape.from_llama_config(arm.llama_config, tuple(arm.config.attributes))
        return cls(arm_weights_for_serving(arm), shape, slots, max_len, dtype, device)

    # ------------------------------------------------------------------------------------------- the trunk
    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _block(
        self, i: int, x: Tensor, positions: Tensor, slots: Tensor, attend_len: int, mask: Tensor
    ) -> Tensor:
        """One decoder layer on ``x`` [B, T, H] whose tokens sit at ``positions`` [B, T] of ``slots`` [B]."""
        s, w, p = self.shape, self.w, f"layers.{i}."
        B, T, _ = x.shape
        h = rms_norm(x, w[p + "input_layernorm.weight"], s.eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, s.heads, s.head_dim).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = self._rope(positions)  # [B, T, D]
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Write the new keys/values into each row's slot, then attend over the slot's whole prefix.
        cache_k, cache_v = self.cache.k[i], self.cache.v[i]
        rows = slots[:, None].expand(B, T)
        cache_k[rows, :, positions] = k.transpose(1, 2)
        cache_v[rows, :, positions] = v.transpose(1, 2)
        keys = cache_k[slots, :, :attend_len]
        values = cache_v[slots, :, :attend_len]
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        x = x + attn.transpose(1, 2).reshape(B, T, s.heads * s.head_dim) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], s.eps)
        gate = F.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        return x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T

    @torch.inference_mode()
    def _run(self, slots: Tensor, tokens: Tensor) -> Tensor:
        """Append ``tokens`` [B, T] to ``slots`` [B] (all rows at their own offsets); last hidden state [B, H]."""
        B, T = tokens.shape
        start = self.cache.lengths[slots]  # [B]
        positions = start[:, None] + torch.arange(T, device=self.device)  # [B, T]
        if int(positions.max()) >= self.cache.max_len:
            raise ValueError(f"ARM cache full: a sequence exceeds {self.cache.max_len} tokens")
        attend_len = int(positions.max()) + 1
        key_pos = torch.arange(attend_len, device=self.device)
        mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, attend_len]
        x = self.w["embed_tokens.weight"][tokens]
        for i in range(self.shape.num_layers):
            x = self._block(i, x, positions, slots, attend_len, mask)
        self.cache.lengths[slots] = start + T
        return x[:, -1]

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
        normed = rms_norm(states, self.w["norm.weight"], self.shape.eps)
        cand_emb = self.lm_head[candidates]  # [B, K, H]
        logits = torch.einsum("bah,bkh->bak", normed, cand_emb).float()
        return torch.log_softmax(logits, dim=-1)

    @torch.inference_mode()
    def full_log_probs(self, hidden: Tensor) -> Tensor:
        """Full-vocabulary log-probabilities [B, A, V] per attribute (for checks and offline scoring)."""
        low = torch.einsum("bh,ahr->bar", hidden, self.head_down)
        adapted = hidden[:, None] + torch.einsum("bar,arh->bah", low, self.head_up)
        normed = rms_norm(adapted, self.w["norm.weight"], self.shape.eps)
        return torch.log_softmax((normed @ self.lm_head.T).float(), dim=-1)
