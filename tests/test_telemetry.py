"""The worker -> API guidance channel over a real ZeroMQ socket: confirm() waits for the processor's news."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.errors import APIError
from server.telemetry import GuidanceTelemetry, TelemetryPublisher


@pytest.fixture
def channel():
    telemetry = GuidanceTelemetry()
    telemetry.start()
    publisher = TelemetryPublisher(telemetry.address)
    publisher.send({"t": "status", "ready": True, "error": None})
    yield telemetry, publisher
    publisher.socket.close(linger=0)
    telemetry.close()


def step(rid: str, steps: int, failed: bool = False) -> dict:
    row = {
        "rid": rid,
        "steps": steps,
        "masked": 0,
        "filtered": False,
        "withheld": False,
        "failed": failed,
        "rewards": None,
    }
    return {"t": "step", "arm_s": 0.001, "batch": 1, "slots": 1, "rows": [row]}


def test_confirm_wakes_when_the_step_arrives(channel):
    telemetry, publisher = channel

    async def scenario() -> float:
        waiter = asyncio.create_task(telemetry.confirm("r1", 2, timeout=5.0))
        await asyncio.sleep(0.05)
        publisher.send(step("r1", 1))  # one step is not enough
        await asyncio.sleep(0.05)
        assert not waiter.done()
        sent = time.monotonic()
        publisher.send(step("r1", 2))
        stats = await waiter
        assert stats.steps == 2
        return time.monotonic() - sent

    latency = asyncio.run(scenario())
    assert latency < 0.9  # woken by the message, not by the 1 s re-check


def test_confirm_fails_closed_on_failure_and_on_silence(channel):
    telemetry, publisher = channel

    async def failed() -> None:
        waiter = asyncio.create_task(telemetry.confirm("r2", 1, timeout=5.0))
        await asyncio.sleep(0.05)
        publisher.send({"t": "failure", "reason": "ARM fault", "rids": ["r2"]})
        await waiter

    with pytest.raises(APIError) as error:
        asyncio.run(failed())
    assert (error.value.status, error.value.code) == (503, "guidance_failed")

    with pytest.raises(APIError) as error:
        asyncio.run(telemetry.confirm("never-guided", 1, timeout=0.3))
    assert (error.value.status, error.value.code) == (503, "guidance_unconfirmed")


def test_arm_unavailable_wakes_every_waiter(channel):
    telemetry, publisher = channel

    async def scenario() -> None:
        waiter = asyncio.create_task(telemetry.confirm("r3", 1, timeout=5.0))
        await asyncio.sleep(0.05)
        publisher.send({"t": "status", "ready": False, "error": "ARM load failed"})
        await waiter

    with pytest.raises(APIError) as error:
        asyncio.run(scenario())
    assert error.value.code == "guidance_unavailable"
