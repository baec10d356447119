"""Save and load ARM artifacts, and hand merged weights to the serving runtime.

An artifact folder holds:
- ``arm.safetensors``: the trainable weights only (trunk LoRA A/B, stacked head adapters), float32. The base
  weights are NOT stored: the artifact is a few MB and is applied to the user's own copy of the base.
- ``arm_config.json``: ``{"format", "arm_config", "base", "training"}`` where ``base`` identifies the base the
  adapters were trained on (architecture, vocab size, hidden size, number of base layers, SHA-256 of the
  embedding). ``load_arm`` refuses a different base with ``ArtifactMismatchError``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from rewardmodel.config import ArmConfig
from rewardmodel.model import BaseIdentity, MultiAttributeARM

ARTIFACT_FORMAT = "prosocial-arm/1"
WEIGHTS_FILE = "arm.safetensors"
CONFIG_FILE = "arm_config.json"
MAX_ARTIFACT_BYTES = 25 * 1024 * 1024


class ArtifactMismatchError(ValueError):
    """The base checkpoint given to ``load_arm`` is not the one the artifact was trained on."""


def save_artifact(arm: MultiAttributeARM, artifact_dir: Path, training: dict | None = None) -> Path:
    """Write the trainable weights and the config atomically (temp folder, then rename); return the folder."""
    from safetensors.torch import save_file

    artifact_dir = Path(artifact_dir)
    artifact_dir.parent.mkdir(parents=True, exist_ok=True)
    state = {
        name: t.detach().to(torch.float32).contiguous() for name, t in arm.trainable_state_dict().items()
    }
    size = sum(t.numel() * t.element_size() for t in state.values())
    if size > MAX_ARTIFACT_BYTES:
        raise ValueError(
            f"artifact weights are {size / 2**20:.1f} MiB, over the 25 MiB limit: lower the ranks"
        )
    document = {
        "format": ARTIFACT_FORMAT,
        "arm_config": arm.config.to_dict(),
        "base": arm.base_identity.to_dict(),
        "training": training or {},
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{artifact_dir.name}-", dir=artifact_dir.parent))
    try:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": ARTIFACT_FORMAT})
        (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
        artifact_dir.mkdir(parents=True, exist_ok=True)
        # Replace only our two files: the folder may also hold the model card README.md.
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(staging / name, artifact_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return artifact_dir


def read_artifact_config(artifact_dir: Path) -> dict:
    path = Path(artifact_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {artifact_dir} is not an ARM artifact folder")
    document = json.loads(path.read_text())
    if document.get("format") != ARTIFACT_FORMAT:
        raise ValueError(
            f"{path}: unsupported artifact format {document.get('format')!r}, expected {ARTIFACT_FORMAT}"
        )
    return document


def check_base_matches(expected: dict, actual: BaseIdentity, base_dir: Path, artifact_dir: Path) -> None:
    """Raise ``ArtifactMismatchError`` naming every field where the base differs from the artifact's."""
    found = actual.to_dict()
    differences = [
        f"{key}: artifact {expected.get(key)!r}, base {found[key]!r}"
        for key in found
        if expected.get(key) != found[key]
    ]
    if differences:
        raise ArtifactMismatchError(
            f"the base model at {base_dir} is not the one the ARM artifact {artifact_dir} was trained on "
            f"({'; '.join(differences)}). Load it with the original base checkpoint (not a merged or "
            "re-quantized copy)."
        )


def load_arm(base_dir: Path, artifact_dir: Path, dtype: torch.dtype = torch.float32) -> MultiAttributeARM:
    """Rebuild the ARM from the base folder plus the artifact, in eval mode with gradients off."""
    from safetensors.torch import load_file

    document = read_artifact_config(artifact_dir)
    config = ArmConfig.from_dict(document["arm_config"])
    _check_base_config(document["base"], Path(base_dir), Path(artifact_dir))
    arm = MultiAttributeARM.from_base(Path(base_dir), config, dtype=torch.float32)
    check_base_matches(document["base"], arm.base_identity, Path(base_dir), Path(artifact_dir))
    arm.load_trainable_state_dict(load_file(str(Path(artifact_dir) / WEIGHTS_FILE)))
    arm.cast(dtype)
    arm.eval()
    arm.requires_grad_(False)
    return arm


def _check_base_config(expected: dict, base_dir: Path, artifact_dir: Path) -> None:
    """Cheap early check on config.json so an obviously wrong base fails before any weight is read."""
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {base_dir} is not a Hugging Face model folder")
    config = json.loads(config_path.read_text())
    found = {
        "architecture": (config.get("architectures") or ["LlamaForCausalLM"])[0],
        "vocab_size": config.get("vocab_size"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
    }
    differences = [
        f"{key}: artifact {expected.get(key)!r}, base {value!r}"
        for key, value in found.items()
        if expected.get(key) != value
    ]
    if differences:
        raise ArtifactMismatchError(
            f"the base model at {base_dir} does not match the ARM artifact {artifact_dir} ({'; '.join(differences)})"
        )


def arm_weights_for_serving(arm: MultiAttributeARM) -> dict[str, Tensor]:
    """Plain tensors for a lean KV-cached runtime, with the LoRA merged into the trunk weights.

    Keys (H = hidden size, I = MLP width, V = vocab, r = head rank, L = ``arm.config.num_layers``):
    - ``embed_tokens.weight`` [V, H]: token embedding, also the tied output head (see ``lm_head.weight``).
    - ``layers.{i}.input_layernorm.weight`` [H], ``layers.{i}.post_attention_layernorm.weight`` [H]
    - ``layers.{i}.self_attn.{q,k,v,o}_proj.weight`` and ``layers.{i}.mlp.{gate,up,down}_proj.weight``
      ([out, in], applied as ``x @ W.T``), base weight + LoRA delta, for i in 0..L-1.
    - ``norm.weight`` [H]: the base final RMSNorm, applied after the head adapters.
    - ``lm_head.weight`` [V, H]: the output projection (the same tensor object as the embedding when tied).
    - ``head_adapters.{attribute}.down`` [H, r] and ``head_adapters.{attribute}.up`` [r, H] for every attribute in
      ``arm.config.attributes``: ``h_a = h + (h @ down) @ up`` on the last layer's output, then norm, then head.
    Rotary settings, eps, head counts and the rest come from ``arm.llama_config``.
    """
    from peft.tuners.lora import LoraLayer

    weights: dict[str, Tensor] = {}
    lora_modules = set()
    with torch.no_grad():
        for name, module in arm.trunk.named_modules():
            if isinstance(module, LoraLayer):
                lora_modules.add(name)
                base = module.get_base_layer().weight
                weights[f"{name}.weight"] = (base + module.get_delta_weight("default").to(base.dtype)).clone()
        for name, tensor in arm.trunk.state_dict().items():
            if ".lora_" in name or "rotary_emb" in name:
                continue
            plain = name.replace(".base_layer.", ".")
            if plain.removesuffix(".weight") in lora_modules:
                continue
            weights[plain] = tensor.detach().clone()
        weights["norm.weight"] = arm.final_norm.weight.detach().clone()
        weights["lm_head.weight"] = (
            weights["embed_tokens.weight"]
            if arm.separate_lm_head is None
            else arm.separate_lm_head.detach().clone()
        )
        for index, attribute in enumerate(arm.config.attributes):
            weights[f"head_adapters.{attribute}.down"] = arm.head_down[index].detach().clone()
            weights[f"head_adapters.{attribute}.up"] = arm.head_up[index].detach().clone()
    return weights
