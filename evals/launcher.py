"""Configurations to compare, and a small generic launcher that starts and stops one local server each.

The configuration file (JSON, default ``evals/configs/default.json``) names servers by the command line that
starts them, and configurations by the server they use and the ``prosocial_prefs`` they send. Placeholders in
commands and environment values: ``{host}``, ``{port}`` (a free port picked at start), ``{api_key}``,
``{prosocial}`` (the console script next to this Python), ``{python}`` and any ``variables`` entry (overridable
with ``--var KEY=VALUE``). Commands run from the repository root. A running server can stand in for a launched one (``--endpoint NAME=URL``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from prosocialalign.core.launcher import LauncherError, ServerProcess, free_port

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.json"


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
    """A configuration's server: its spec's command, placeholders filled, on a free port (the shared launcher)."""

    def __init__(self, spec: ServerSpec, api_key: str, log_dir: Path, host: str, variables: dict[str, str]):
        self.spec = spec
        self.api_key = api_key
        self.log_path = log_dir / f"server_{spec.name}.log"
        self.host = host
        self.variables = variables
        self.server: ServerProcess | None = None

    @property
    def port(self) -> int | None:
        return self.server.port if self.server else None

    @property
    def process(self) -> subprocess.Popen | None:
        return self.server.process if self.server else None

    @property
    def base_url(self) -> str:
        return self.server.base_url if self.server else ""

    def start(self) -> str:
        port = free_port(self.host)
        values = {
            **self.variables,
            "host": self.host,
            "port": str(port),
            "api_key": self.api_key,
            "prosocial": prosocial_executable(),
            "python": sys.executable,
        }
        self.server = ServerProcess(
            [_format(part, values) for part in self.spec.command],
            port,
            self.log_path,
            env={key: _format(value, values) for key, value in self.spec.env.items()},
            health_path=self.spec.health_path,
            models_path=None,  # the harness asks for the model name itself
            host=self.host,
        )
        self.server.start(timeout_s=self.spec.ready_timeout_s, poll_s=2.0)
        return self.base_url

    def stop(self, grace_s: float = 30.0) -> None:
        if self.server is not None:
            self.server.stop(grace_s)

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
