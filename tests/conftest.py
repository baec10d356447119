"""Shared fixtures. ``live_server`` starts the real ``prosocial serve`` (real vLLM engine, default model) once per
test session on a free loopback port, with an API key, and stops it with SIGTERM at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from prosocialalign.core.launcher import ServerProcess
from tests.support import start_server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The full system as ``make serve`` runs it: default model, shipped ARM, guidance and safety mask on."""
    server = start_server(tmp_path_factory.mktemp("live_server"))
    try:
        yield server
    finally:
        server.stop()
