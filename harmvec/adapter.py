"""Export trained LoRA factors as a PEFT adapter folder, the format vLLM's LoRA support loads (``LoRARequest``).

The redirect adapter (issue 21) is trained with the harm-vector recipe (``harmvec.build.redirect_config``) but is
served, not merged: vLLM applies it per request, to the backtracking regime's attempts only. A PEFT folder is
``adapter_config.json`` (peft's ``LoraConfig``) plus ``adapter_model.safetensors`` with the keys
``base_model.model.<module>.lora_A.weight`` (rank x in) and ``...lora_B.weight`` (out x rank).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from harmvec.merge import atomic_output_dir
from harmvec.vector import HarmVector

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def peft_key(weight_name: str, factor: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return f"base_model.model.{weight_name.removesuffix('.weight')}.{factor}.weight"


def export_peft_adapter(
    vector: HarmVector, out_dir: Path, base_name: str, card: str, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write ``vector`` as a PEFT LoRA adapter (bfloat16 by default: half the size, the serving dtype)."""
    from peft import LoraConfig

    modules = sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in vector.weight_names()})
    config = LoraConfig(
        r=vector.config.rank,
        lora_alpha=vector.config.alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=modules,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )
    tensors = {}
    for name in vector.weight_names():
        tensors[peft_key(name, "lora_A")] = vector.lora_a[name].to(dtype).contiguous()
        tensors[peft_key(name, "lora_B")] = vector.lora_b[name].to(dtype).contiguous()
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "README.md").write_text(card)
    return out_dir
