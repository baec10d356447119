"""The ARM's configs: its shape (``ArmConfig``) and its training run (``TrainConfig``). Torch-free, so that the
command line is generated from them (``prosocialalign.core.configs``) without loading a model library."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from prosocialalign.core.configs import option, positive_float, positive_int
from prosocialalign.core.paths import BUILD_DIR, REPORTS_DIR
from rewardmodel.attributes import ALL_ATTRIBUTES
from rewardmodel.paths import NO_PCGRAD_ARM, TRAINED_ARM

DEFAULT_BETA_R = 0.1
"""The GenARM reward scale (why 0.1: ``rewardmodel.loss``)."""
DEFAULT_PAIR_DIR = BUILD_DIR / "rewardmodel_data"
"""Where ``prosocial rewardmodel data`` writes the preference-pair splits."""
LORA_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclass
class ArmConfig:
    """Shape of the ARM. Saved with every artifact; a loaded artifact rebuilds exactly this model."""

    num_layers: int = option(8, help="trunk depth (the first N base layers)", type=positive_int)
    lora_rank: int = option(16, help="LoRA rank of the trunk (alpha: twice the rank)", type=positive_int)
    lora_alpha: float = option(32.0, cli=False)
    head_rank: int = option(16, help="rank of each attribute's head adapter", type=positive_int)
    attributes: tuple[str, ...] = option(ALL_ATTRIBUTES, cli=False)
    lora_target_modules: tuple[str, ...] = option(LORA_TARGET_MODULES, cli=False)

    def __post_init__(self) -> None:
        self.attributes = tuple(self.attributes)
        self.lora_target_modules = tuple(self.lora_target_modules)
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.lora_rank < 1 or self.head_rank < 1:
            raise ValueError(f"lora_rank and head_rank must be >= 1, got {self.lora_rank}, {self.head_rank}")
        if not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes must be non-empty and unique, got {self.attributes}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["attributes"] = list(self.attributes)
        data["lora_target_modules"] = list(self.lora_target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ArmConfig:
        return cls(**data)


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved in the artifact and every checkpoint)."""

    data_dir: Path = option(DEFAULT_PAIR_DIR, help="pair splits", flag="--data")
    out_dir: Path = option(TRAINED_ARM, help="artifact folder", flag="--out")
    checkpoint_dir: Path | None = option(
        None, help="checkpoints; none: build/rewardmodel_checkpoints/<out name>"
    )
    log_path: Path | None = option(
        None, help="JSONL log; none: <checkpoint-dir>/train_log.jsonl", flag="--log"
    )
    base_dir: Path | None = option(None, help="base HF folder; none: the prepared default model")
    seed: int = option(0, help="seed of the adapters' initialisation and the pair order")
    steps: int = option(150, help="optimizer steps", type=positive_int)
    pairs_per_attribute: int = option(4, help="pairs per attribute per step", type=positive_int)
    lr: float = option(1e-3, help="peak learning rate (AdamW, cosine after warm-up)", type=positive_float)
    weight_decay: float = option(0.0, help="AdamW weight decay")
    warmup_steps: int = option(10, help="linear warm-up steps")
    max_grad_norm: float = option(1.0, help="gradient clipping norm")
    beta_r: float = option(DEFAULT_BETA_R, help="GenARM reward scale", type=positive_float)
    nll_weight: float = option(1.0, help="weight of the chosen-response NLL term (0: pure GenARM)")
    max_prompt_tokens: int = option(96, help="prompt tokens kept (the last ones)", type=positive_int)
    max_response_tokens: int = option(64, help="response tokens kept", type=positive_int)
    log_every: int = option(10, help="steps between log lines", type=positive_int)
    checkpoint_every: int = option(25, help="steps between checkpoints", type=positive_int)
    num_threads: int = option(2, help="torch threads", type=positive_int)
    use_pcgrad: bool = option(
        True,
        help="PCGrad on the shared trunk (--no-pcgrad: sum the gradients, the ablation)",
        flag="--pcgrad",
    )
    bf16_trunk: bool = option(
        True, help="bfloat16 autocast for the trunk only (weights, heads, optimizer stay float32)"
    )
    resume: bool = option(False, help="continue from the latest checkpoint")
    max_minutes: float | None = option(
        None, help="wall-clock budget: stop early (and still save)", type=positive_float
    )
    arm: ArmConfig = field(default_factory=ArmConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "pairs_per_attribute", "log_every", "checkpoint_every", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.beta_r <= 0 or self.nll_weight < 0:
            raise ValueError("lr and beta_r must be > 0 and nll_weight >= 0")
        self.data_dir, self.out_dir = Path(self.data_dir), Path(self.out_dir)
        if self.checkpoint_dir is None:
            self.checkpoint_dir = BUILD_DIR / "rewardmodel_checkpoints" / self.out_dir.name
        self.checkpoint_dir = Path(self.checkpoint_dir)
        self.log_path = Path(self.log_path) if self.log_path else self.checkpoint_dir / "train_log.jsonl"
        if self.base_dir is not None:
            self.base_dir = Path(self.base_dir)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["arm"] = self.arm.to_dict()
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


@dataclass
class EvalConfig:
    """A held-out evaluation of an ARM artifact against its baselines (``prosocial rewardmodel eval``)."""

    data_dir: Path = option(DEFAULT_PAIR_DIR, help="pair splits", flag="--data")
    artifact_dir: Path = option(TRAINED_ARM, help="the ARM artifact", flag="--artifact")
    ablation_artifact_dir: Path | None = option(
        NO_PCGRAD_ARM, help="the no-PCGrad ablation artifact (skipped if absent)", flag="--ablation-artifact"
    )
    base_dir: Path | None = option(None, help="base HF folder; none: the prepared default model")
    report_path: Path = option(REPORTS_DIR / "rewardmodel.json", help="report file", flag="--report")
    split: str = option("test", help="split to score", choices=("test", "validation"))
    max_pairs_per_attribute: int | None = option(
        None, help="seeded subset per attribute (none: every pair)", type=positive_int
    )
    batch_pairs: int = option(8, help="pairs per forward batch", type=positive_int)
    seed: int = option(0, help="seed of the capped subset")
    num_threads: int = option(2, help="torch threads", type=positive_int)
    include_base_baseline: bool = option(
        True, help="the (slow) full base-LM baseline", flag="--base-baseline"
    )
    command: str = option("", cli=False)

    def __post_init__(self) -> None:
        if self.max_pairs_per_attribute is not None and self.max_pairs_per_attribute < 1:
            raise ValueError(f"max_pairs_per_attribute must be >= 1, got {self.max_pairs_per_attribute}")
        if self.batch_pairs < 1:
            raise ValueError(f"batch_pairs must be >= 1, got {self.batch_pairs}")
