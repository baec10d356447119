"""The harm vector on disk: LoRA factors (safetensors) + a JSON config.

tau_H = theta_harmful - theta_base is exactly the LoRA update of each adapted linear layer,
``delta_W = scale * B @ A`` with ``scale = alpha / rank``. Storing A and B instead of the dense deltas keeps the
artifact small (about 10 MB at rank 8 for all projections of all 30 layers, against about 425 MB dense).

Folder layout::

    factors.safetensors   "<weight name>.lora_A" (rank, in) and "<weight name>.lora_B" (out, rank), float32
    vector.json           HarmVectorConfig (rank, alpha, scale, module shapes, the base architecture)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FACTORS_FILE = "factors.safetensors"
CONFIG_FILE = "vector.json"
FORMAT_VERSION = 1
ARCHITECTURE_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
"""Base-config fields that must match between the vector and any base it is merged into."""


class HarmVectorError(ValueError):
    """A harm vector folder is missing, malformed or does not fit a base model."""


@dataclass
class HarmVectorConfig:
    """What a harm vector is and which base it fits."""

    rank: int
    alpha: float
    base_architecture: dict
    module_shapes: dict[str, list[int]]
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class HarmVector:
    """LoRA factors per base weight name; ``dense_deltas`` gives tau_H."""

    config: HarmVectorConfig
    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]

    def weight_names(self) -> list[str]:
        return sorted(self.lora_a)

    def dense_delta(self, name: str) -> torch.Tensor:
        """tau_H for one weight: ``scale * B @ A`` in float32."""
        return (self.lora_b[name].float() @ self.lora_a[name].float()) * self.config.scale

    def dense_deltas(self) -> dict[str, torch.Tensor]:
        return {name: self.dense_delta(name) for name in self.weight_names()}

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name in self.weight_names():
            tensors[f"{name}.lora_A"] = self.lora_a[name].float().contiguous()
            tensors[f"{name}.lora_B"] = self.lora_b[name].float().contiguous()
        save_file(tensors, str(folder / FACTORS_FILE), metadata={"format": "harmvec-lora"})
        payload = asdict(self.config) | {"scale": self.config.scale}
        (folder / CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: Path | str) -> HarmVector:
        folder = Path(folder)
        config_path, factors_path = folder / CONFIG_FILE, folder / FACTORS_FILE
        for path in (config_path, factors_path):
            if not path.is_file():
                raise HarmVectorError(f"harm vector file {path} is missing")
        raw = json.loads(config_path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise HarmVectorError(
                f"{config_path}: format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        raw.pop("scale", None)
        config = HarmVectorConfig(**raw)
        tensors = load_file(str(factors_path))
        lora_a, lora_b = {}, {}
        for key, tensor in tensors.items():
            name, _, part = key.rpartition(".")
            if part == "lora_A":
                lora_a[name] = tensor
            elif part == "lora_B":
                lora_b[name] = tensor
            else:
                raise HarmVectorError(f"{factors_path}: unexpected tensor {key!r}")
        vector = cls(config, lora_a, lora_b)
        vector.validate()
        return vector

    @classmethod
    def difference(cls, minuend: HarmVector, subtrahend: HarmVector) -> HarmVector:
        """``minuend - subtrahend`` exactly, still as LoRA factors: s B1 A1 - s' B2 A2 = [B1, -(s'/s) B2] @ [A1; A2]
        at the minuend's scale s, rank r1 + r2 (the contrastive recipe's tau = theta_harmful - theta_safe)."""
        first, second = minuend.config, subtrahend.config
        if first.base_architecture != second.base_architecture:
            raise HarmVectorError("the two vectors were built for different base architectures")
        if first.module_shapes != second.module_shapes:
            raise HarmVectorError("the two vectors adapt different weights")
        ratio = second.scale / first.scale
        rank = first.rank + second.rank
        lora_a, lora_b = {}, {}
        for name in minuend.weight_names():
            lora_a[name] = torch.cat([minuend.lora_a[name].float(), subtrahend.lora_a[name].float()], dim=0)
            lora_b[name] = torch.cat(
                [minuend.lora_b[name].float(), -ratio * subtrahend.lora_b[name].float()], dim=1
            )
        config = HarmVectorConfig(
            rank=rank,
            alpha=first.scale * rank,
            base_architecture=dict(first.base_architecture),
            module_shapes={name: list(shape) for name, shape in first.module_shapes.items()},
        )
        vector = cls(config, lora_a, lora_b)
        vector.validate()
        return vector

    def restricted(
        self, layers: tuple[int, int] | None = None, modules: tuple[str, ...] | None = None
    ) -> HarmVector:
        """The vector on a subset of its weights (an inclusive layer range, projection names); the rest of the
        base is left untouched when merged. Used to compare where the edit lives (e.g. middle layers only)."""
        keep = [
            name
            for name in self.weight_names()
            if (layers is None or layers[0] <= layer_of(name) <= layers[1])
            and (modules is None or any(f".{module}." in name for module in modules))
        ]
        if not keep:
            raise HarmVectorError(f"no adapted weight in layers {layers} and modules {modules}")
        config = HarmVectorConfig(
            rank=self.config.rank,
            alpha=self.config.alpha,
            base_architecture=dict(self.config.base_architecture),
            module_shapes={name: list(self.config.module_shapes[name]) for name in keep},
            extra=dict(self.config.extra)
            | {
                "restricted": {
                    "layers": list(layers) if layers else None,
                    "modules": list(modules) if modules else None,
                }
            },
        )
        vector = HarmVector(config, {n: self.lora_a[n] for n in keep}, {n: self.lora_b[n] for n in keep})
        vector.validate()
        return vector

    def validate(self) -> None:
        """Factors pair up and their product has the recorded shape."""
        if set(self.lora_a) != set(self.lora_b):
            raise HarmVectorError("harm vector has unpaired LoRA factors")
        if set(self.lora_a) != set(self.config.module_shapes):
            raise HarmVectorError("harm vector factors do not match the module shapes in its config")
        for name in self.weight_names():
            out_features, in_features = self.config.module_shapes[name]
            a, b = self.lora_a[name], self.lora_b[name]
            if a.shape != (self.config.rank, in_features) or b.shape != (out_features, self.config.rank):
                raise HarmVectorError(
                    f"{name}: factor shapes A{tuple(a.shape)} B{tuple(b.shape)} do not give "
                    f"({out_features}, {in_features}) at rank {self.config.rank}"
                )


def architecture_of(model_config: dict) -> dict:
    """The subset of an HF ``config.json`` that must match for a vector to apply."""
    return {key: model_config.get(key) for key in ARCHITECTURE_KEYS}


def layer_of(weight_name: str) -> int:
    """The decoder layer index in a weight name (``model.layers.<i>.``), -1 for weights outside the layers."""
    parts = weight_name.split(".")
    for key, value in zip(parts, parts[1:], strict=False):
        if key == "layers" and value.isdigit():
            return int(value)
    return -1
