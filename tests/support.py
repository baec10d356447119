"""What several test modules share: the real server launched for a test, a small seeded ARM, a guidance spec.

Fixtures stay in ``conftest.py``; plain helpers live here so that no test module imports another.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from prosocialalign.core.launcher import ServerProcess, free_port, serve_command
from prosocialalign.core.models import prepare_default_model
from rewardmodel.config import ArmConfig
from rewardmodel.model import MultiAttributeARM
from server.guided.spec import GuidanceSpec

STARTUP_TIMEOUT_S = float(os.environ.get("PROSOCIAL_TEST_STARTUP_TIMEOUT", "600"))
HEAD_NOISE = 0.05


def start_server(
    tmp_dir: Path,
    extra_args: list[str] | None = None,
    api_key: str = "test-secret-key",
    extra_env: dict[str, str] | None = None,
    wait_healthy: bool = True,
) -> ServerProcess:
    """Start ``prosocial serve`` (API key, 1,024-token context) and wait until it answers; raises with the log
    if it never does. ``wait_healthy=False`` waits for /v1/models only, for servers expected to be unhealthy."""
    port = free_port()
    flags = ["--api-key", api_key, "--max-model-len", "1024", *(extra_args or [])]
    server = ServerProcess(
        serve_command(port, *flags),
        port,
        tmp_dir / f"server-{port}.log",
        env=dict(extra_env or {}),
        api_key=api_key,
        health_path="/health" if wait_healthy else None,
        extra_args=list(extra_args or []),
    )
    server.start(timeout_s=STARTUP_TIMEOUT_S)
    return server


def dev_arm(seed: int = 0) -> MultiAttributeARM:
    """A base-initialised ARM with seeded random adapters, the head adapters large enough that every attribute's
    reward (its head against the neutral one) changes which token wins."""
    torch.manual_seed(seed)
    arm = MultiAttributeARM.from_base(prepare_default_model(), ArmConfig(num_layers=8))
    with torch.no_grad():
        for name, p in arm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (HEAD_NOISE if name.startswith("head_") else 0.02))
    return arm.eval()


def spec(
    rid: str, prefs=None, mask=True, threshold=-1.0, response=None, guard_tokens=8, coherence=False
) -> GuidanceSpec:
    """The guidance spec of one request, as the API process builds it."""
    return GuidanceSpec(
        request_id=rid,
        prefs=tuple(prefs) if prefs is not None else None,
        safety_mask=mask,
        safety_threshold=threshold,
        response_threshold=response,
        guard_tokens=guard_tokens,
        beta=1.0,
        coherence_guard=coherence,
    )
