"""Configurations to compare, and a small generic launcher that starts and stops one local server each.

The configuration file (JSON, default ``evals/configs/default.json``) names servers by the command line that
starts them, and configurations by the server they use and the ``prosocial_prefs`` they send. Placeholders in
commands and environment values: ``{host}``, ``{port}`` (a free port picked at start), ``{api_key}``,
``{prosocial}`` (the console script next to this Python), ``{python}`` and any ``variables`` entry (overridable
with ``--var KEY=VALUE``). Commands run from the repository root. A running server can stand in for a launched one (``--endpoint NAME=URL``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.json"
REPO_ROOT = Path(__file__).resolve().parents[1]


class LauncherError(RuntimeError):
    """A configuration file is invalid or a server did not become ready."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server."""

    name: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 900.0
    health_path: str = "/health"


@dataclass(frozen=True)
class ConfigurationSpec:
    """One row of the comparison: a server plus the preferences sent with every request."""

    name: str
    server: str
    prefs: dict[str, float] | None = None


@dataclass(frozen=True)
class CompareConfig:
    """A parsed configuration file."""

    servers: dict[str, ServerSpec]
    configurations: dict[str, ConfigurationSpec]
    sweep_configuration: str | None = None
    host: str = "127.0.0.1"
    variables: dict[str, str] = field(default_factory=dict)


def load_compare_config(
    path: str | Path = DEFAULT_CONFIG, variables: dict[str, str] | None = None
) -> CompareConfig:
    """Read and validate a configuration file; ``variables`` override the file's ``variables``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LauncherError(f"--config {path}: {error}") from error
    defaults = {
        "ready_timeout_s": raw.get("ready_timeout_s", 900.0),
        "health_path": raw.get("health_path", "/health"),
    }
    servers = {}
    for name, spec in raw.get("servers", {}).items():
        if not isinstance(spec.get("command"), list) or not spec["command"]:
            raise LauncherError(f"--config {path}: server {name!r} needs a non-empty 'command' list")
        servers[name] = ServerSpec(
            name,
            tuple(str(part) for part in spec["command"]),
            {str(k): str(v) for k, v in spec.get("env", {}).items()},
            float(spec.get("ready_timeout_s", defaults["ready_timeout_s"])),
            str(spec.get("health_path", defaults["health_path"])),
        )
    configurations = {}
    for name, spec in raw.get("configurations", {}).items():
        server = spec.get("server")
        if server not in servers:
            raise LauncherError(f"--config {path}: configuration {name!r} uses unknown server {server!r}")
        configurations[name] = ConfigurationSpec(name, server, spec.get("prefs"))
    if not configurations:
        raise LauncherError(f"--config {path}: no configurations")
    sweep = raw.get("sweep_configuration")
    if sweep is not None and sweep not in configurations:
        raise LauncherError(f"--config {path}: sweep_configuration {sweep!r} is not a configuration")
    merged = {str(k): str(v) for k, v in raw.get("variables", {}).items()} | (variables or {})
    return CompareConfig(servers, configurations, sweep, str(raw.get("host", "127.0.0.1")), merged)


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


def prosocial_executable() -> str:
    """The ``prosocial`` console script of this environment."""
    beside = Path(sys.executable).parent / "prosocial"
    return str(beside) if beside.exists() else shutil.which("prosocial") or "prosocial"


def _format(template: str, values: dict[str, str]) -> str:
    try:
        return template.format(**values)
    except KeyError as error:
        raise LauncherError(f"unknown placeholder {error} in {template!r}; define it with --var") from error


class LocalServer:
    """Starts a server command, waits for its health endpoint, and stops it (its own process group) on exit."""

    def __init__(self, spec: ServerSpec, api_key: str, log_dir: Path, host: str, variables: dict[str, str]):
        self.spec = spec
        self.api_key = api_key
        self.log_path = log_dir / f"server_{spec.name}.log"
        self.host = host
        self.variables = variables
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        values = self._values()
        return [_format(part, values) for part in self.spec.command]

    def _values(self) -> dict[str, str]:
        return {
            **self.variables,
            "host": self.host,
            "port": str(self.port),
            "api_key": self.api_key,
            "prosocial": prosocial_executable(),
            "python": sys.executable,
        }

    def start(self) -> str:
        self.port = free_port(self.host)
        values = self._values()
        env = os.environ | {key: _format(value, values) for key, value in self.spec.env.items()}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        self._wait_ready()
        return self.base_url

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.spec.ready_timeout_s
        url = self.base_url + self.spec.health_path
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LauncherError(
                    f"server {self.spec.name!r} exited with {self.process.returncode}; log tail:\n{self.log_tail()}"
                )
            try:
                if httpx.get(url, timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2.0)
        self.stop()
        raise LauncherError(
            f"server {self.spec.name!r} not ready after {self.spec.ready_timeout_s:.0f} s at {url}"
        )

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server's own process group, SIGKILL after ``grace_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait(timeout=grace_s)

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
