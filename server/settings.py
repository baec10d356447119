"""Operator configuration: every setting is a ``prosocial serve`` flag and a ``PROSOCIAL_*`` environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rewardmodel.attributes import PROSOCIAL_ATTRIBUTES
from server.backtrack import (
    DEFAULT_CRISIS,
    DEFAULT_FALLBACK,
    DEFAULT_OPENING,
    DEFAULT_PREAMBLE,
)


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROSOCIAL_", extra="ignore")

    # --- network -------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    api_key: SecretStr | None = Field(
        None, description="If set, /v1/* requires 'Authorization: Bearer <key>'."
    )
    metrics_public: bool = Field(
        True, description="Serve /metrics without the API key (for Prometheus scrapes)."
    )

    # --- model and engine ----------------------------------------------------------------------------------
    model: Path | None = Field(None, description="HF checkpoint folder; default: the embedded SmolLM2 model.")
    served_model_name: str | None = Field(
        None, description="Model name clients send; default: the folder name."
    )
    base_model: bool = Field(
        False, description="Serve the unmodified base weights instead of the harm-vector-merged default."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights dtype.")
    kv_cache_gib: float = Field(
        1.0, gt=0, description="KV-cache size in GiB (CPU backend: VLLM_CPU_KVCACHE_SPACE)."
    )
    max_model_len: int = Field(2048, ge=64, description="Context length (prompt + completion tokens).")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences the engine runs at once.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to shard the model over (GPU builds).")
    seed: int = Field(0, description="Engine seed (sampling without a request seed).")

    # --- request limits (bad requests get 4xx, never 5xx) ----------------------------------------------------
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted, in bytes.")
    max_messages: int = Field(256, ge=1, description="Most messages a chat request may carry.")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(8, ge=1, description="Largest n (choices) a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that sets none.")

    # --- guidance (ProSocialAlign decoding) ---------------------------------------------------------------
    guidance: bool = Field(True, description="Load the ARM logits processor; off = plain unguided serving.")
    safety_mask: bool = Field(
        True, description="Apply the ARM safety mask to every request (operator floor)."
    )
    safety_threshold: float | None = Field(
        None,
        description=(
            "Safety margin below which a candidate token is masked; requests may only raise it. "
            "Default: the ARM artifact's calibrated threshold (safety_calibration.json)."
        ),
    )
    response_guard: bool = Field(
        True,
        description="Mask candidates that bring the response's mean safety margin below the response threshold "
        "once it has guard_tokens tokens (those first tokens are held back until judged).",
    )
    response_threshold: float | None = Field(
        None, description="Response guard threshold; default: the ARM artifact's calibrated one."
    )
    guard_tokens: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Tokens after which the guard judges a response (default: calibrated, 8).",
    )
    beta: float = Field(
        1.0,
        gt=0,
        description="Reward temperature: score = base + (1/beta) * sum_i w_i * r_i, r_i = log pi_i - log pi_neutral.",
    )
    default_prefs: dict[str, float] | None = Field(
        default_factory=lambda: dict.fromkeys(PROSOCIAL_ATTRIBUTES, 1.0),
        description="Preferences applied to requests without prosocial_prefs (default: the five attributes "
        "weighted equally; {} or None: no preference term, the safety mask only).",
    )
    coherence_guard: bool = Field(
        True,
        description="End a guided draft that loops or runs into symbols (emoji, punctuation) so it is redone.",
    )
    backtrack: bool = Field(
        True,
        description="Regenerate a guided choice whose draft the safety filter or coherence guard ended, instead "
        "of returning it empty (content_filter); see docs/method.md.",
    )
    backtrack_attempts: int = Field(
        2, ge=1, le=8, description="Regeneration attempts before the fallback text."
    )
    retry_response_threshold: float | None = Field(
        None,
        description="Response-guard threshold of a regeneration after a loop; only ever stricter than the "
        "request's (None: the request's own).",
    )
    redirect_prefs: dict[str, float] | None = Field(
        default_factory=lambda: {"empathy": 1.0, "sensitivity": 1.0},
        description="Preferences of the redirect regime ({} or None: the request's own).",
    )
    redirect_preamble: str = Field(DEFAULT_PREAMBLE, description="System text of the redirect regime.")
    redirect_opening: str = Field(DEFAULT_OPENING, description="First words of a redirected reply.")
    redirect_max_tokens: int = Field(64, ge=8, le=512, description="Token limit of one redirect attempt.")
    system_prompt: str | None = Field(
        None,
        description="System message of guided chat requests that bring none (None: the chat template's own). "
        "The warm persona measured in docs/method.md (section 4) made replies to distressed people kinder but, "
        "read one by one, did not keep harmful content down.",
    )
    stream_lag_tokens: int = Field(
        16,
        ge=1,
        le=256,
        description="A guided stream releases a token once this many later tokens were judged, so a draft "
        "ended later can still be backtracked there (never less than guard_tokens).",
    )
    fallback_message: str = Field(
        DEFAULT_FALLBACK, min_length=1, description="Answer when every attempt was ended too."
    )
    crisis_message: str = Field(
        DEFAULT_CRISIS,
        min_length=1,
        description="Fallback for requests with a self-harm signal: kind, and points to help.",
    )
    arm_artifact: Path | None = Field(
        None, description="ARM artifact folder; default: the served one, arm-v2."
    )
    candidate_top_k: int = Field(
        256, ge=2, le=4096, description="Guided rows choose among the base's top-k + EOS."
    )
    arm_fault_after_steps: int | None = Field(
        None, ge=0, description="Testing hook: make the ARM raise after this many guided steps."
    )

    # --- operations -----------------------------------------------------------------------------------------
    drain_timeout_s: float = Field(30.0, ge=0, description="Seconds in-flight requests get after SIGTERM.")
    log_requests: bool = Field(False, description="Log prompts and completions (off: privacy by default).")

    @field_validator("default_prefs", "redirect_prefs")
    @classmethod
    def _known_attributes(
        cls, value: dict[str, float] | None, info: ValidationInfo
    ) -> dict[str, float] | None:
        if not value:
            return None
        unknown = sorted(set(value) - set(PROSOCIAL_ATTRIBUTES))
        if unknown:
            raise ValueError(f"unknown attributes in {info.field_name}: {unknown}")
        if not any(v > 0 for v in value.values()):
            raise ValueError(f"{info.field_name} must have a positive weight")
        return value
