"""Processor settings, passed from the API process to the engine's worker through vLLM's ``additional_config``."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ADDITIONAL_CONFIG_KEY = "prosocial"
# One adapter per vLLM model-runner interface: each runner refuses the other's processor classes at start-up.
V1_PROCESSOR = "server.guided.v1:ProsocialLogitsProcessor"
V2_PROCESSOR = "server.guided.v2:ProsocialLogitsProcessor"


@dataclass(frozen=True)
class ProcessorConfig:
    base_dir: str  # the base checkpoint the ARM was trained from (tokenizer and embedding identity)
    artifact_dir: str  # the ARM artifact
    dtype: str = "bfloat16"
    slots: int = 64  # = the engine's max_num_seqs: one KV-cache slot per batch row
    max_len: int = 2048  # = the engine's max_model_len
    candidate_top_k: int = 256
    eos_token_id: int = 2
    telemetry_address: str | None = None
    fault_after_steps: int | None = None  # testing hook: make the ARM raise after N guided steps

    def to_additional_config(self) -> dict:
        return {ADDITIONAL_CONFIG_KEY: asdict(self)}

    @classmethod
    def from_vllm_config(cls, vllm_config) -> ProcessorConfig:
        raw = (getattr(vllm_config, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY)
        if raw is None:
            raise ValueError("the prosocial logits processor needs additional_config['prosocial']")
        return cls(**raw)


DEFAULT_ARM_ARTIFACT = Path(__file__).resolve().parents[2] / "rewardmodel" / "artifacts" / "arm-v2"


SPECULATIVE_DECODING_REFUSED = (
    "ProSocialAlign guidance cannot run with speculative decoding: the ARM scores one committed token per "
    "request and step, not draft tokens. Remove the speculative config (a speculators checkpoint enables it "
    "by itself) or serve with --no-guidance."
)


class GuidanceConfigError(ValueError):
    """Guidance cannot be set up for this model (the server refuses to start rather than serve unguided)."""


FALLBACK_SAFETY_THRESHOLD = -6.0
DEFAULT_GUARD_TOKENS = 8


def default_safety_threshold(settings) -> float:
    """The operator's threshold, else the artifact's calibrated one, else a conservative fallback."""
    from rewardmodel.calibrate import read_calibrated_threshold

    if settings.safety_threshold is not None:
        return settings.safety_threshold
    calibrated = read_calibrated_threshold(Path(settings.arm_artifact or DEFAULT_ARM_ARTIFACT))
    return calibrated if calibrated is not None else FALLBACK_SAFETY_THRESHOLD


def default_response_guard(settings) -> tuple[float | None, int]:
    """(threshold, tokens) of the response guard: the operator's, else the artifact's calibrated ones; off
    (None) when the operator turns it off or the artifact has no calibrated response threshold."""
    from rewardmodel.calibrate import read_calibration

    if not settings.response_guard:
        return None, 1
    calibration = read_calibration(Path(settings.arm_artifact or DEFAULT_ARM_ARTIFACT)) or {}
    threshold = settings.response_threshold
    if threshold is None:
        threshold = calibration.get("response_threshold")
    tokens = settings.guard_tokens or calibration.get("guard_tokens") or DEFAULT_GUARD_TOKENS
    return threshold, int(tokens)


def processor_setup(settings, model, telemetry_address: str) -> tuple[list[str], dict]:
    """The ``logits_processors`` and ``additional_config`` engine arguments for guided serving.

    The ARM reads the engine's token ids, so the served model must share the ARM base's tokenizer.
    """
    processor = processor_for_engine(settings, model)
    from prosocialalign.core.models import prepare_default_model

    artifact = Path(settings.arm_artifact or DEFAULT_ARM_ARTIFACT).expanduser().resolve()
    base = prepare_default_model()
    _check_same_tokenizer(Path(model.path), base)
    config = ProcessorConfig(
        base_dir=str(base),
        artifact_dir=str(artifact),
        dtype="bfloat16" if settings.dtype == "auto" else settings.dtype,
        slots=settings.max_num_seqs,
        max_len=settings.max_model_len,
        candidate_top_k=settings.candidate_top_k,
        eos_token_id=_eos_token_id(base),
        telemetry_address=telemetry_address,
        fault_after_steps=settings.arm_fault_after_steps,
    )
    return [processor], config.to_additional_config()


def processor_for_engine(settings, model) -> str:
    """The adapter for the model runner the installed vLLM will run with these settings (it says which in the
    log); refuses speculative decoding, which the guidance cannot serve."""
    from server.engine import engine_args

    vllm_config = engine_args(settings, model).create_engine_config()
    if vllm_config.speculative_config is not None:
        raise GuidanceConfigError(SPECULATIVE_DECODING_REFUSED)
    v2 = runs_model_runner_v2(vllm_config)
    processor = V2_PROCESSOR if v2 else V1_PROCESSOR
    logger.info("vLLM runs Model Runner V%d: guided decoding through %s", 2 if v2 else 1, processor)
    return processor


def runs_model_runner_v2(vllm_config) -> bool:
    """vLLM's own decision for this config; vLLM >= 0.34 has no V1 runner (nor its processor package) left."""
    if importlib.util.find_spec("vllm.v1.sample.logits_processor") is None:
        return True
    return bool(getattr(vllm_config, "use_v2_model_runner", False))


def _eos_token_id(model_dir: Path) -> int:
    eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
    return int(eos[0] if isinstance(eos, list) else eos)


def _check_same_tokenizer(model_dir: Path, base_dir: Path) -> None:
    if model_dir == base_dir:
        return
    ours, theirs = model_dir / "tokenizer.json", base_dir / "tokenizer.json"
    if not ours.is_file() or ours.read_bytes() != theirs.read_bytes():
        raise GuidanceConfigError(
            f"--model {model_dir} does not share the ARM's tokenizer ({base_dir}); serve it with --no-guidance"
        )
