"""vLLM's ``AsyncLLM``, built in-process from the operator's settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmvec.merge import DEFAULT_CONFIG_FILE, ensure_merged_default
from harmvec.paths import DEFAULT_VECTOR_DIR
from prosocialalign.core.models import DEFAULT_MODEL_NAME, prepare_default_model
from prosocialalign.core.paths import cache_dir
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

GiB = 1 << 30
CPU_MIN_BATCHED_TOKENS = 2048  # vLLM's default step budget on the CPU


@dataclass(frozen=True)
class ServedModel:
    """What the server serves: the checkpoint folder and the name clients use for it."""

    path: Path
    name: str


def resolve_model(settings: ServerSettings) -> ServedModel:
    """The checkpoint to serve: ``--model`` if given, else the embedded default (prepared on first use).

    The default is the harm-vector-merged checkpoint at the sweep's chosen point (merged once, cached), unless
    ``--base-model`` asks for the unmodified base. Without a shipped vector and default point, the base is served
    and the log says so.
    """
    if settings.model is not None:
        path = settings.model.expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {path}: not a Hugging Face checkpoint folder (no config.json)")
        return ServedModel(path, settings.served_model_name or path.name)
    base = prepare_default_model()
    if settings.base_model:
        return ServedModel(base, settings.served_model_name or DEFAULT_MODEL_NAME)
    if not (DEFAULT_VECTOR_DIR / DEFAULT_CONFIG_FILE).is_file():
        logger.warning("no harm-vector default point in %s: serving the unmodified base", DEFAULT_VECTOR_DIR)
        return ServedModel(base, settings.served_model_name or DEFAULT_MODEL_NAME)
    merged = ensure_merged_default(base, cache_dir() / "models", DEFAULT_VECTOR_DIR)
    return ServedModel(merged, settings.served_model_name or DEFAULT_MODEL_NAME)


def engine_args(
    settings: ServerSettings,
    model: ServedModel,
    logits_processors: list[Any] | None = None,
    additional_config: dict[str, Any] | None = None,
):
    """AsyncEngineArgs for the CPU or GPU build; the KV cache is sized explicitly (the CPU backend needs it)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    # vLLM's model runner rewinds a seeded request's random generator after a partial (chunked) prefill step;
    # the CPU generator cannot (RuntimeError "CPU Generator does not use offset"), which kills the engine as
    # soon as a request with a `seed` is prefilled in chunks next to other requests. On the CPU every prefill
    # therefore runs in one step: chunked prefill off, and a step budget that holds the longest prompt.
    prefill: dict[str, Any] = {}
    if current_platform.is_cpu():
        prefill = {
            "enable_chunked_prefill": False,
            "max_num_batched_tokens": max(settings.max_model_len, CPU_MIN_BATCHED_TOKENS),
        }
    # An explicit KV-cache size: the CPU backend otherwise reserves most of the machine's memory. (If the
    # legacy VLLM_CPU_KVCACHE_SPACE variable is set, vLLM's CPU backend lets it win.)
    return AsyncEngineArgs(
        model=str(model.path),
        served_model_name=[model.name],
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        tensor_parallel_size=settings.tensor_parallel_size,
        kv_cache_memory_bytes=int(settings.kv_cache_gib * GiB),
        enforce_eager=True,
        seed=settings.seed,
        disable_log_stats=False,
        logits_processors=logits_processors,
        additional_config=additional_config or {},
        **prefill,
    )


def build_engine(
    settings: ServerSettings,
    model: ServedModel,
    logits_processors: list[Any] | None = None,
    additional_config: dict[str, Any] | None = None,
):
    """Start the engine (about 30 s for the 135M model on 2 CPU cores)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    args = engine_args(settings, model, logits_processors, additional_config)
    logger.info("starting vLLM AsyncLLM on %s (%s)", model.path, settings.dtype)
    return AsyncLLM.from_engine_args(args)
