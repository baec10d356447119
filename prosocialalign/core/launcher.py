"""Start a server as a subprocess, wait until it serves, stop it: the one launcher of the tests, the benchmarks and
the evaluation harness (it starts commands, so it imports no server code).

The server runs in its own session, so ``stop`` reaches vLLM's engine-core and worker processes too.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from prosocialalign.core.paths import REPO_ROOT


class LauncherError(RuntimeError):
    """A server could not be launched: a bad configuration, an exit during start-up or no readiness in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A free port below Linux's ephemeral range (32768+), for a server started a few seconds later.

    A port the OS picks itself (bind to port 0) comes from the ephemeral range, and the OS can give it to another
    socket (vLLM's ZeroMQ sockets, an outgoing connection) before the server binds it; below that range only
    explicit binds take ports.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 20000 and 32000 on {host}")


def serve_command(port: int, *flags: str, host: str = "127.0.0.1") -> list[str]:
    """``prosocial serve`` with this interpreter (as a module: it works before the console script exists)."""
    return [sys.executable, "-m", "prosocialalign.cli", "serve", "--host", host, "--port", str(port), *flags]


@dataclass
class ServerProcess:
    """One OpenAI-compatible server command on ``host:port``, its output in ``log_path``.

    Ready means the health endpoint answers 200 (``health_path`` None: skipped, for a server expected to report
    itself unhealthy) and so does ``/v1/models``, with the API key if any (``models_path`` None: skipped, for a
    server that is not an OpenAI one).
    """

    command: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    health_path: str | None = "/health"
    models_path: str | None = "/v1/models"
    host: str = "127.0.0.1"
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    model: str = ""

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 900, poll_s: float = 1.0) -> str:
        """Start the command and wait until it is ready; returns the served model's id ("" without models_path)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                start_new_session=True,
            )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LauncherError(
                    f"{self.command[:4]} exited with {self.process.returncode} during start-up; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                healthy = (
                    self.health_path is None
                    or httpx.get(self.base_url + self.health_path, timeout=2).status_code == 200
                )
                if healthy and self.models_path is None:
                    return self.model
                models = httpx.get(self.base_url + self.models_path, headers=headers, timeout=5)
                if healthy and models.status_code == 200:
                    self.model = models.json()["data"][0]["id"]
                    return self.model
            except httpx.HTTPError:
                pass
            time.sleep(poll_s)
        self.stop()
        raise LauncherError(
            f"server not ready after {timeout_s:.0f} s at {self.base_url}; log tail:\n{self.log_tail()}"
        )

    def stop(self, grace_s: float = 60.0) -> int | None:
        """SIGTERM to the server's session (the drain runs), SIGKILL after ``grace_s``; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            group = os.getpgid(self.process.pid)
            os.killpg(group, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(group, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def pids(self) -> list[int]:
        """The server process and all its descendants (engine core, worker)."""
        if self.process is None:
            return []
        out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
        children: dict[int, list[int]] = {}
        for line in out.splitlines():
            pid, ppid = map(int, line.split())
            children.setdefault(ppid, []).append(pid)
        pids, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(children.get(pid, []))
        return pids

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024
