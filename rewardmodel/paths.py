"""The shipped ARM artifacts, each named once by its role (cheap to import; anchored to this file, not the CWD)."""

from __future__ import annotations

from pathlib import Path

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
TRAINED_ARM = ARTIFACTS_DIR / "arm-v1"
"""What ``prosocial rewardmodel train`` writes: the joint PCGrad training of every attribute."""
NO_PCGRAD_ARM = ARTIFACTS_DIR / "arm-v1-no-pcgrad"
"""The same training without PCGrad: the ablation ``prosocial rewardmodel evaluate`` compares against."""
SERVED_ARM = ARTIFACTS_DIR / "arm-v2"
"""TRAINED_ARM with the safety head retrained (``train-safety-head``): what the server guides with and what the
evaluation's ARM scorer reads (the five preference heads are TRAINED_ARM's, unchanged)."""
