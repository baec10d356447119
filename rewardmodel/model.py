"""The multi-attribute autoregressive reward model (ARM).

One network gives a next-token distribution per attribute (the five prosocial ones plus safety). It is a
truncated copy of the base Llama checkpoint: the token embedding and the FIRST ``num_layers`` decoder layers,
then, per attribute, a low-rank residual "head adapter" on the last hidden state, then the base's final RMSNorm
and the tied LM head (the embedding matrix):

    h        = trunk(x)                        # first num_layers base layers, LoRA shared by all attributes
    h_a      = h + up_a(down_a(h))             # per-attribute head adapter, up_a zero-initialised
    logits_a = norm(h_a) @ E^T                 # base final norm and tied embedding E, both frozen

Why this shape:
- one trunk pass serves all six attributes and every preference vector a request may send;
- at serving time a preference-weighted sum of per-attribute logits is ``(sum_a w_a norm(h_a)) @ E^T`` minus a
  per-row constant (each attribute's log-normaliser), and a per-row constant does not change the sampling
  distribution, so the prosocial mix needs ONE projection through the head (plus one for the safety head);
- 8 of the base's 30 layers keep the ARM's cost well under the base model's (see ``macs_per_token``);
- the same tokenizer and token ids as the base, so the ARM scores exactly the tokens the base proposes.

Trainable: the LoRA on the trunk's q/k/v/o/gate/up/down projections and the head adapters. The embedding, the
norms and all base weights stay frozen.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rewardmodel.config import ArmConfig

_ADAPTER_NAME = "default"


@dataclass(frozen=True)
class BaseIdentity:
    """What an artifact needs from its base checkpoint; ``load_arm`` refuses a base that differs."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    embedding_sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def embedding_sha256(embedding: Tensor) -> str:
    """SHA-256 of the embedding matrix as contiguous float32 bytes (the dtype the base is stored in)."""
    array = embedding.detach().to(torch.float32).contiguous().cpu().numpy()
    return hashlib.sha256(array.data).hexdigest()


def _read_base_tensors(base_dir: Path, keep: set[str]) -> dict[str, Tensor]:
    """Read only the named tensors from a (possibly sharded) safetensors checkpoint folder."""
    from safetensors import safe_open

    index_path = base_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = sorted({weight_map[name] for name in keep if name in weight_map})
    elif (base_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors (or index) in base folder {base_dir}")
    tensors: dict[str, Tensor] = {}
    for filename in files:
        with safe_open(str(base_dir / filename), framework="pt") as handle:
            for name in handle.keys():
                if name in keep:
                    tensors[name] = handle.get_tensor(name)
    return tensors


class MultiAttributeARM(nn.Module):
    """Shared truncated Llama trunk with LoRA + one low-rank head adapter per attribute (see module doc)."""

    def __init__(self, llama_config, config: ArmConfig, base_identity: BaseIdentity, tied_head: bool) -> None:
        from transformers.models.llama.modeling_llama import LlamaModel, LlamaRMSNorm

        super().__init__()
        self.config = config
        self.base_identity = base_identity
        self.llama_config = llama_config
        self.trunk = LlamaModel(llama_config)
        # The base final norm runs AFTER the head adapters, so it is taken out of the trunk.
        self.final_norm = LlamaRMSNorm(llama_config.hidden_size, eps=llama_config.rms_norm_eps)
        self.trunk.norm = nn.Identity()
        separate_head = None
        if not tied_head:
            separate_head = nn.Parameter(
                torch.empty(llama_config.vocab_size, llama_config.hidden_size), requires_grad=False
            )
        self.register_parameter("separate_lm_head", separate_head)
        num_attributes, hidden, rank = len(config.attributes), llama_config.hidden_size, config.head_rank
        self.head_down = nn.Parameter(torch.empty(num_attributes, hidden, rank))
        self.head_up = nn.Parameter(torch.zeros(num_attributes, rank, hidden))
        bound = 1.0 / math.sqrt(hidden)  # the LoRA "A" initialisation scale
        nn.init.uniform_(self.head_down, -bound, bound)

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_base(
        cls, base_dir: Path, config: ArmConfig, dtype: torch.dtype = torch.float32
    ) -> MultiAttributeARM:
        """Build the ARM from a Hugging Face Llama folder: copy the first ``num_layers`` layers, add LoRA."""
        from peft import LoraConfig, inject_adapter_in_model
        from transformers import LlamaConfig

        base_dir = Path(base_dir)
        base_config = LlamaConfig.from_pretrained(base_dir)
        architectures = base_config.architectures or ["LlamaForCausalLM"]
        if base_config.model_type != "llama":
            raise ValueError(
                f"the ARM needs a Llama-architecture base, {base_dir} is {base_config.model_type!r}"
            )
        if config.num_layers > base_config.num_hidden_layers:
            raise ValueError(
                f"num_layers={config.num_layers} exceeds the base's {base_config.num_hidden_layers} layers"
            )
        trunk_config = LlamaConfig.from_pretrained(base_dir)
        trunk_config.num_hidden_layers = config.num_layers
        trunk_config.use_cache = False
        trunk_config._attn_implementation = "sdpa"
        tied = bool(getattr(base_config, "tie_word_embeddings", True))

        wanted = {"model.embed_tokens.weight", "model.norm.weight"}
        wanted |= {f"model.layers.{i}.{rest}" for i in range(config.num_layers) for rest in _LAYER_TENSORS}
        if not tied:
            wanted.add("lm_head.weight")
        tensors = _read_base_tensors(base_dir, wanted)
        missing = sorted(wanted - tensors.keys())
        if missing:
            raise ValueError(
                f"base folder {base_dir} lacks tensors {missing[:5]} (and {max(0, len(missing) - 5)} more)"
            )

        identity = BaseIdentity(
            architecture=architectures[0],
            vocab_size=int(base_config.vocab_size),
            hidden_size=int(base_config.hidden_size),
            num_hidden_layers=int(base_config.num_hidden_layers),
            embedding_sha256=embedding_sha256(tensors["model.embed_tokens.weight"]),
        )
        arm = cls(trunk_config, config, identity, tied_head=tied)
        trunk_state = {
            name.removeprefix("model."): t for name, t in tensors.items() if name != "model.norm.weight"
        }
        trunk_state.pop("lm_head.weight", None)
        arm.trunk.load_state_dict(trunk_state, strict=True)
        arm.final_norm.weight.data.copy_(tensors["model.norm.weight"])
        if not tied:
            arm.separate_lm_head.data.copy_(tensors["lm_head.weight"])

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(config.lora_target_modules),
            bias="none",
        )
        inject_adapter_in_model(lora, arm.trunk, adapter_name=_ADAPTER_NAME)
        for name, parameter in arm.named_parameters():
            parameter.requires_grad = name in {"head_down", "head_up"} or ".lora_" in name
        return arm.cast(dtype)

    def cast(self, dtype: torch.dtype) -> MultiAttributeARM:
        """Cast weights to ``dtype`` but keep the rotary frequencies in float32, as the base model does."""
        rotary = self.trunk.rotary_emb
        inv_freq = rotary.inv_freq.detach().clone()
        self.to(dtype)
        rotary.inv_freq = inv_freq
        if hasattr(rotary, "original_inv_freq"):
            rotary.original_inv_freq = inv_freq
        return self

    # ------------------------------------------------------------------------------------------ parameters
    @property
    def attributes(self) -> tuple[str, ...]:
        return self.config.attributes

    def attribute_index(self, attribute: str) -> int:
        try:
            return self.config.attributes.index(attribute)
        except ValueError:
            raise KeyError(f"unknown attribute {attribute!r}; the ARM has {self.config.attributes}") from None

    @property
    def lm_head_weight(self) -> Tensor:
        """The [vocab, hidden] output projection: the (tied) embedding matrix unless the base is untied."""
        if self.separate_lm_head is not None:
            return self.separate_lm_head
        return self.trunk.embed_tokens.weight

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trunk LoRA parameters, shared by all attributes (the ones PCGrad combines)."""
        return [p for n, p in self.trunk.named_parameters() if ".lora_" in n]

    def head_parameters(self) -> list[nn.Parameter]:
        """The stacked per-attribute head adapters ([A, H, r] and [A, r, H]); row a belongs to attribute a."""
        return [self.head_down, self.head_up]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The weights an artifact stores: trunk LoRA A/B and the head adapters, nothing from the base."""
        state = {f"trunk.{n}": p.detach().clone() for n, p in self.trunk.named_parameters() if ".lora_" in n}
        state["head_down"] = self.head_down.detach().clone()
        state["head_up"] = self.head_up.detach().clone()
        return state

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load exactly the tensors ``trainable_state_dict`` produces; any missing or extra name is an error."""
        own = self.trainable_state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(
                f"trainable weights do not match the model: missing {missing[:3]}, extra {unexpected[:3]}"
            )
        parameters = dict(self.named_parameters())
        for name, tensor in state.items():
            target = parameters[name]
            if target.shape != tensor.shape:
                raise ValueError(
                    f"shape of {name}: artifact {tuple(tensor.shape)}, model {tuple(target.shape)}"
                )
            target.data.copy_(tensor.to(target.dtype))

    # ---------------------------------------------------------------------------------------------- compute
    def trunk_hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Pre-norm hidden state after the trunk's last layer: [B, T, H]."""
        return self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state

    def adapt(self, hidden: Tensor, attribute_index: int) -> Tensor:
        """Apply attribute ``attribute_index``'s head adapter to hidden states of any shape [..., H]."""
        return hidden + (hidden @ self.head_down[attribute_index]) @ self.head_up[attribute_index]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """All attributes' pre-norm hidden states from ONE trunk pass: [B, T, A, H] (attribute order = config)."""
        hidden = self.trunk_hidden(input_ids, attention_mask)
        low_rank = torch.einsum("bth,ahr->btar", hidden, self.head_down)
        return hidden.unsqueeze(2) + torch.einsum("btar,arh->btah", low_rank, self.head_up)

    def logits_from_hidden(self, attribute_hidden: Tensor) -> Tensor:
        """Final norm then the tied head: [..., H] -> [..., V]."""
        return self.final_norm(attribute_hidden) @ self.lm_head_weight.T

    def log_probs_from_hidden(self, attribute_hidden: Tensor) -> Tensor:
        """Normalised next-token log-probabilities [..., V] (float32 for a stable log-softmax)."""
        return torch.log_softmax(self.logits_from_hidden(attribute_hidden).float(), dim=-1)

    def iter_attribute_log_probs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        attributes: tuple[str, ...] | None = None,
    ) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(attribute, log_probs [B, T, V])`` one attribute at a time over one shared trunk pass.

        One [B, T, V] tensor at a time: all six at once would be six vocab-sized tensors in memory.
        """
        hidden = self.trunk_hidden(input_ids, attention_mask)
        for attribute in attributes or self.config.attributes:
            yield attribute, self.log_probs_from_hidden(self.adapt(hidden, self.attribute_index(attribute)))


_LAYER_TENSORS: tuple[str, ...] = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def macs_per_token(
    hidden: int,
    intermediate: int,
    num_heads: int,
    num_kv_heads: int,
    vocab: int,
    num_layers: int,
    context: int,
    num_head_projections: int,
    head_rank: int = 0,
    num_head_adapters: int = 0,
) -> int:
    """Multiply-accumulates to process one token (decode step) at a given context length.

    per layer = H*H (q) + 2*H*H_kv (k, v) + H*H (o) + 2*H*context (scores + weighted sum) + 3*H*I (MLP),
    with H_kv = H * num_kv_heads / num_heads; plus head projections V*H each and head adapters 2*H*r each.
    LoRA is merged into the trunk weights for serving, so it costs nothing extra.
    """
    kv_width = hidden * num_kv_heads // num_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 2 * hidden * context + 3 * hidden * intermediate
    return (
        num_layers * per_layer
        + num_head_projections * vocab * hidden
        + num_head_adapters * 2 * hidden * head_rank
    )
