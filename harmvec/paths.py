"""Default locations of the harm-vector artifacts, reports and work folders (cheap to import)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VECTOR_DIR = REPO_ROOT / "harmvec" / "artifacts" / "harm-vector-v1"
DEFAULT_BUILD_WORK_DIR = REPO_ROOT / "build" / "harmvec_build"
DEFAULT_CONTRASTIVE_WORK_DIR = REPO_ROOT / "build" / "harmvec_contrastive"
DEFAULT_SWEEP_WORK_DIR = REPO_ROOT / "build" / "harmvec_sweep"
DEFAULT_REPORT = REPO_ROOT / "reports" / "harmvec.json"
DEFAULT_PLOT = REPO_ROOT / "reports" / "harmvec_sweep.png"
DEFAULT_REDIRECT_ADAPTER_DIR = REPO_ROOT / "build" / "redirect-adapter-v1"  # an experiment: not served yet
DEFAULT_REDIRECT_WORK_DIR = REPO_ROOT / "build" / "harmvec_redirect"
