"""Fault behaviour of the real server process: the engine dying, and SIGTERM with requests in flight.

The third fault, the ARM raising mid-run (requests fail closed with 503 ``guidance_failed``), is covered by
``tests/test_guided_decoding.py::test_arm_runtime_error_fails_requests_closed``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from prosocialalign.core.launcher import ServerProcess
from prosocialalign.core.paths import REPO_ROOT
from server.runner import EXIT_ENGINE_DEAD
from tests.support import start_server

pytestmark = pytest.mark.integration

DRAIN_TIMEOUT_S = 20.0
EXIT_SLACK_S = 15.0  # engine shutdown and interpreter exit after the drain


@dataclass
class StreamRecord:
    """What a client saw of one streamed completion, read in a background thread."""

    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    events: list[str] = field(default_factory=list)
    status: int | None = None
    error: str | None = None
    ended_at: float | None = None

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    def finish_reasons(self) -> list[str]:
        reasons = []
        for event in self.events:
            if event != "[DONE]":
                reasons += [
                    c["finish_reason"] for c in json.loads(event).get("choices", []) if c["finish_reason"]
                ]
        return reasons

    def errors(self) -> list[dict]:
        return [json.loads(e)["error"] for e in self.events if e != "[DONE]" and "error" in json.loads(e)]


def stream_in_background(server: ServerProcess, max_tokens: int) -> StreamRecord:
    """A streaming completion that keeps going (ignore_eos) for ``max_tokens`` tokens."""
    record = StreamRecord()
    body = {
        "model": server.model,
        "prompt": "1, 2, 3, 4, 5,",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }

    def read() -> None:
        try:
            with httpx.stream(
                "POST",
                server.base_url + "/v1/completions",
                json=body,
                headers={"Authorization": f"Bearer {server.api_key}"},
                timeout=httpx.Timeout(120, connect=10),
            ) as resp:
                record.status = resp.status_code
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        record.events.append(line[len("data: ") :])
                        record.started.set()
        except httpx.HTTPError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            record.ended_at = time.monotonic()
            record.started.set()
            record.finished.set()

    threading.Thread(target=read, daemon=True).start()
    assert record.started.wait(120), "the stream never started"
    assert record.status == 200 and record.error is None, (record.status, record.error)
    return record


def engine_core_pid(server: ServerProcess) -> int:
    """vLLM's engine process (it titles itself ``VLLM::EngineCore``) among the server's descendants."""
    tree = server.pids()
    for pid in tree[1:]:
        try:
            if b"EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no EngineCore process among the server's processes {tree}")


def assert_clean_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in resp.text and ".py" not in resp.text


def test_engine_death_reports_unhealthy_and_exits_nonzero(tmp_path):
    server = start_server(tmp_path, ["--no-guidance"])
    try:
        headers = {"Authorization": f"Bearer {server.api_key}"}
        in_flight = stream_in_background(server, max_tokens=900)
        os.kill(engine_core_pid(server), signal.SIGKILL)
        killed = time.monotonic()

        # Until the process exits, /health says 503 and generation requests get 503 (engine_dead).
        health = None
        while time.monotonic() - killed < 30:
            try:
                health = httpx.get(server.base_url + "/health", timeout=5)
            except httpx.HTTPError:
                break  # already gone
            if health.status_code == 503:
                break
            time.sleep(0.1)
        assert health is not None and health.status_code == 503, "the server never reported itself unhealthy"
        assert_clean_error(health, 503, "engine_dead")
        try:
            chat = httpx.post(
                server.base_url + "/v1/chat/completions",
                json={
                    "model": server.model,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2,
                },
                headers=headers,
                timeout=10,
            )
            assert_clean_error(chat, 503, "engine_dead")
        except httpx.TransportError:
            pass  # the process exited in the meantime: also what an orchestrator needs

        # The in-flight stream ends with an error instead of hanging or pretending to finish.
        assert in_flight.finished.wait(60), "the in-flight stream hung after the engine died"
        assert "length" not in in_flight.finish_reasons()
        assert in_flight.error is not None or [e["code"] for e in in_flight.errors()] == ["engine_dead"]

        # The process exits by itself with the dedicated code, so an orchestrator restarts it.
        assert server.process.wait(60) == EXIT_ENGINE_DEAD
        assert "the vLLM engine died" in server.log()
    finally:
        server.stop()


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(tmp_path):
    server = start_server(tmp_path, ["--no-guidance", "--drain-timeout-s", str(DRAIN_TIMEOUT_S)])
    try:
        short = stream_in_background(server, max_tokens=48)  # finishes well within the drain timeout
        endless = stream_in_background(server, max_tokens=1000)  # at this machine's speed: longer than it
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # During the drain: new requests and health probes get 503 "shutting_down".
        time.sleep(0.3)
        new = httpx.post(
            server.base_url + "/v1/chat/completions",
            json={"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"Authorization": f"Bearer {server.api_key}"},
            timeout=10,
        )
        assert_clean_error(new, 503, "shutting_down")
        assert_clean_error(httpx.get(server.base_url + "/health", timeout=10), 503, "shutting_down")

        # The in-flight request finishes normally.
        assert short.finished.wait(DRAIN_TIMEOUT_S)
        assert short.error is None and short.done and short.finish_reasons() == ["length"], short

        # The drain is bounded: the process exits 0 soon after the drain timeout even though a request is
        # still running (it is cut off), not after a second grace period.
        code = server.process.wait(DRAIN_TIMEOUT_S + EXIT_SLACK_S)
        assert code == 0
        assert endless.finished.wait(10)
        if not endless.done:  # it was still running at the deadline: cut, never reported as complete
            assert endless.ended_at - signalled < DRAIN_TIMEOUT_S + 5
            assert "length" not in endless.finish_reasons()
    finally:
        server.stop()


def test_port_in_use_fails_at_once_naming_the_flag():
    """The HTTP port is claimed before the engine starts: a taken port is a CLI error, not a crash after start-up."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "prosocialalign.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode != 0
    assert f"argument --port: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "vLLM" not in result.stderr and "EngineCore" not in result.stderr  # no engine was started
    assert time.monotonic() - started < 60
