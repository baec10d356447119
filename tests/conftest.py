"""Shared fixtures. ``live_server`` starts the real ``prosocial serve`` (real vLLM engine, default model) once per
test session on a free loopback port, with an API key, and stops it with SIGTERM at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from evals.launcher import free_port

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = float(os.environ.get("PROSOCIAL_TEST_STARTUP_TIMEOUT", "600"))


@dataclass
class LiveServer:
    base_url: str
    api_key: str
    model: str
    process: subprocess.Popen
    log_path: Path
    extra_args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    tmp_dir: Path,
    extra_args: list[str] | None = None,
    api_key: str = "test-secret-key",
    extra_env: dict[str, str] | None = None,
    wait_healthy: bool = True,
) -> LiveServer:
    """Start ``prosocial serve`` and wait until it answers (raises with the log if it never does).

    ``wait_healthy=False`` waits for /v1/models only, for servers expected to report themselves unhealthy.
    """
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    args = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        api_key,
        "--max-model-len",
        "1024",
        *(extra_args or []),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = LiveServer(f"http://127.0.0.1:{port}", api_key, "", process, log_path, list(extra_args or []))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode} during start-up:\n{server.log()[-4000:]}"
            )
        try:
            healthy = httpx.get(server.base_url + "/health", timeout=2).status_code == 200
            models = httpx.get(
                server.base_url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=5
            )
            if models.status_code == 200 and (healthy or not wait_healthy):
                server.model = models.json()["data"][0]["id"]
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{server.log()[-4000:]}")


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The full system as ``make serve`` runs it: default model, shipped ARM, guidance and safety mask on."""
    server = start_server(tmp_path_factory.mktemp("live_server"))
    try:
        yield server
    finally:
        server.stop()
