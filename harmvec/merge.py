"""theta = theta_base - lambda * trim_k(tau_H), written as a complete Hugging Face checkpoint folder.

Trimming is **per tensor**: in each adapted weight we keep the ``ceil(top_k * numel)`` entries of tau_H with the
largest magnitude and zero the rest. Per tensor (rather than one global threshold) keeps every layer's share of
the edit: LoRA deltas of the MLP projections are several times larger than those of k/v, and a global threshold
would silently drop whole modules. It also needs only one dense delta in memory at a time.

Entries whose update is zero (trimmed away, or lambda = 0) are copied from the base bit for bit; the rest are
computed in float32 and cast back to the base dtype.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harmvec.paths import DEFAULT_VECTOR_DIR
from harmvec.vector import HarmVector, HarmVectorError, architecture_of

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PROVENANCE_FILE = "harmvec_merge.json"
DEFAULT_CONFIG_FILE = "default.json"
SKIPPED_BASE_FILES = frozenset({"prosocial_prepared.json", PROVENANCE_FILE})
"""Base-folder files not copied: another component's completion marker and an older merge's provenance."""
MERGE_FORMAT = "harmvec-merge-v1"


class MergeError(ValueError):
    """The merge cannot be done (bad arguments, mismatched base, missing file, non-finite result)."""


def validate_merge_args(lam: float, top_k: float) -> None:
    if not math.isfinite(lam) or lam < 0:
        raise MergeError(f"--lambda must be a finite number >= 0, got {lam}")
    if not math.isfinite(top_k) or not 0 < top_k <= 1:
        raise MergeError(f"--top-k must be a fraction in (0, 1], got {top_k}")


def kept_count(numel: int, top_k: float) -> int:
    """How many entries a tensor of ``numel`` keeps at fraction ``top_k`` (at least one)."""
    return min(numel, max(1, math.ceil(top_k * numel - 1e-9)))


def trim_top_k(delta: torch.Tensor, top_k: float) -> torch.Tensor:
    """Zero all but the ``kept_count`` largest-magnitude entries of ``delta`` (ties broken by torch.topk)."""
    if top_k >= 1:
        return delta.clone()
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), kept_count(flat.numel(), top_k), sorted=False).indices
    trimmed = torch.zeros_like(flat)
    trimmed[keep] = flat[keep]
    return trimmed.reshape(delta.shape)


def merge_tensor(base: torch.Tensor, delta: torch.Tensor, lam: float, top_k: float) -> torch.Tensor:
    """``base - lam * trim_k(delta)`` in the base dtype; untouched entries keep their exact base bits."""
    update = lam * trim_top_k(delta.float(), top_k)
    merged = (base.float() - update).to(base.dtype)
    return torch.where(update != 0, merged, base)


def merge_harm_vector(
    base_state: Mapping[str, torch.Tensor], tau: Mapping[str, torch.Tensor], lam: float, top_k: float
) -> dict[str, torch.Tensor]:
    """Apply ``theta_base - lam * trim_k(tau)`` to a state dict; weights absent from ``tau`` are kept as is."""
    validate_merge_args(lam, top_k)
    missing = sorted(set(tau) - set(base_state))
    if missing:
        raise MergeError(f"harm vector targets weights the base does not have: {missing[:5]}")
    merged = dict(base_state)
    for name, delta in tau.items():
        base = base_state[name]
        if tuple(base.shape) != tuple(delta.shape):
            raise MergeError(
                f"shape mismatch for {name}: base {tuple(base.shape)}, vector {tuple(delta.shape)}"
            )
        result = merge_tensor(base, delta, lam, top_k)
        if not torch.isfinite(result).all():
            raise MergeError(f"merged weight {name} has non-finite values (lambda={lam})")
        merged[name] = result
    return merged


def _weight_files(base_dir: Path) -> list[str]:
    index = base_dir / WEIGHTS_INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (base_dir / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    raise MergeError(f"base folder {base_dir} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")


def _check_base_folder(base_dir: Path) -> dict:
    if not base_dir.is_dir():
        raise MergeError(f"base model folder {base_dir} does not exist")
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise MergeError(f"base model folder {base_dir} has no config.json")
    if not any((base_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise MergeError(f"base model folder {base_dir} has no tokenizer files")
    for name in _weight_files(base_dir):
        if not (base_dir / name).is_file():
            raise MergeError(f"base weight file {base_dir / name} is missing")
    return json.loads(config_path.read_text())


def _check_architecture(base_config: dict, vector: HarmVector) -> None:
    expected = vector.config.base_architecture
    actual = architecture_of(base_config)
    mismatched = {
        key: (expected.get(key), actual.get(key)) for key in expected if expected[key] != actual.get(key)
    }
    if mismatched:
        details = ", ".join(f"{key}: vector {v} vs base {b}" for key, (v, b) in mismatched.items())
        raise MergeError(f"harm vector was built for a different architecture ({details})")


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only when the block succeeds."""
    out = out.absolute()
    if out.exists() and not overwrite:
        raise MergeError(f"output folder {out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise MergeError(f"output folder {out} appeared while merging; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_folder(
    base_dir: Path | str,
    vector_dir: Path | str,
    lam: float,
    top_k: float,
    out: Path | str,
    overwrite: bool = False,
) -> Path:
    """Write the merged checkpoint folder (weights, config, tokenizer, chat template, generation config)."""
    validate_merge_args(lam, top_k)
    base_dir, vector_dir, out = Path(base_dir), Path(vector_dir), Path(out)
    base_config = _check_base_folder(base_dir)
    try:
        vector = HarmVector.load(vector_dir)
    except HarmVectorError as error:
        raise MergeError(str(error)) from error
    _check_architecture(base_config, vector)
    weight_files = _weight_files(base_dir)
    remaining = set(vector.weight_names())
    with atomic_output_dir(out, overwrite) as tmp:
        for name in sorted(os.listdir(base_dir)):
            source = base_dir / name
            if name in SKIPPED_BASE_FILES or name in weight_files or not source.is_file():
                continue
            shutil.copy2(source, tmp / name)
        for weight_file in weight_files:
            state = load_file(str(base_dir / weight_file))
            names = [name for name in vector.weight_names() if name in state]
            tau = {name: vector.dense_delta(name) for name in names}
            save_file(
                merge_harm_vector(state, tau, lam, top_k), str(tmp / weight_file), metadata={"format": "pt"}
            )
            remaining -= set(names)
        if remaining:
            raise MergeError(f"harm vector targets weights the base does not have: {sorted(remaining)[:5]}")
        provenance = {
            "format": MERGE_FORMAT,
            "base": str(base_dir.absolute()),
            "vector": str(vector_dir.absolute()),
            "lambda": lam,
            "top_k": top_k,
            "trim_scope": "per_tensor",
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def _hash_files(digest: hashlib._Hash, folder: Path, names: list[str]) -> None:
    for name in names:
        digest.update(name.encode() + b"\0")
        with (folder / name).open("rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)


def merged_checkpoint_key(base_dir: Path, vector_dir: Path, lam: float, top_k: float) -> str:
    """Content hash of base weights/config, vector files, lambda and top-k: the merged folder's cache key."""
    digest = hashlib.sha256(f"{MERGE_FORMAT}|{lam!r}|{top_k!r}".encode())
    base_names = sorted(
        name
        for name in os.listdir(base_dir)
        if (base_dir / name).is_file() and name not in SKIPPED_BASE_FILES
    )
    _hash_files(digest, base_dir, base_names)
    _hash_files(digest, vector_dir, sorted(os.listdir(vector_dir)))
    return digest.hexdigest()[:20]


def read_default_point(vector_dir: Path | str = DEFAULT_VECTOR_DIR) -> tuple[float, float]:
    """The (lambda, top_k) the sweep chose, from ``default.json`` beside the vector."""
    path = Path(vector_dir) / DEFAULT_CONFIG_FILE
    if not path.is_file():
        raise MergeError(f"{path} is missing: run `prosocial harmvec sweep` to choose the default point")
    raw = json.loads(path.read_text())
    return float(raw["lambda"]), float(raw["top_k"])


def ensure_merged_default(
    base_dir: Path | str, cache_dir: Path | str, vector_dir: Path | str = DEFAULT_VECTOR_DIR
) -> Path:
    """The merged checkpoint at the sweep's default point, built once and cached by content hash.

    ``vector_dir`` holds the vector and its ``default.json``; the result is ``<cache_dir>/merged-<hash>``.
    """
    base_dir, cache_dir, vector_dir = Path(base_dir), Path(cache_dir), Path(vector_dir)
    lam, top_k = read_default_point(vector_dir)
    _check_base_folder(base_dir)
    target = cache_dir / f"merged-{merged_checkpoint_key(base_dir, vector_dir, lam, top_k)}"
    if (target / PROVENANCE_FILE).is_file():
        return target
    try:
        return merge_folder(base_dir, vector_dir, lam, top_k, target, overwrite=target.exists())
    except MergeError:
        if (target / PROVENANCE_FILE).is_file():  # another process finished the same merge first
            return target
        raise
