"""The channel from the guidance processor (engine worker process) to the API process.

The worker pushes one small JSON message per engine step over a local ZeroMQ socket: for every guided row, how
many steps were guided, how many tokens were masked, whether the mask ended the row, whether guidance failed,
and the mean ARM rewards of the emitted tokens. The API process uses it to

- release a guided token to the client only once the processor confirmed it guided that step (fail closed),
- report ``finish_reason: "content_filter"`` and the ``prosocial`` transparency object,
- export the processor's Prometheus metrics from the process that serves ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from server import metrics
from server.errors import unavailable

logger = logging.getLogger(__name__)

CONFIRM_TIMEOUT_S = 10.0
STALE_AFTER_S = 600.0


class TelemetryPublisher:
    """Worker side: fire-and-forget PUSH; never blocks the engine step."""

    def __init__(self, address: str | None) -> None:
        self.socket = None
        if address:
            self.socket = zmq.Context.instance().socket(zmq.PUSH)
            self.socket.setsockopt(zmq.SNDHWM, 100_000)
            self.socket.setsockopt(zmq.LINGER, 1000)
            self.socket.connect(address)

    def send(self, message: dict) -> None:
        if self.socket is None:
            return
        try:
            self.socket.send(json.dumps(message).encode(), zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("telemetry queue full; dropping a message")


@dataclass
class RowStats:
    steps: int = 0
    masked: int = 0
    filtered: bool = False
    withheld: bool = False  # filtered before the guard released the first tokens: the text is omitted
    degenerate: bool = False  # the coherence guard ended it (a loop or a symbol run)
    failed: bool = False
    failure: str | None = None
    rewards: dict[str, float] | None = None
    updated: float = field(default_factory=time.monotonic)


class GuidanceTelemetry:
    """API side: a PULL socket drained by a daemon thread into per-request stats and Prometheus metrics."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="prosocial-telemetry-"))
        self.address = f"ipc://{self._dir / 'guidance.sock'}"
        self.ready: bool | None = None  # None until the processor reports its ARM status
        self.error: str | None = None
        self.rows: dict[str, RowStats] = {}
        # confirm() calls waiting for news of a request: woken from the receiving thread, no polling.
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socket = zmq.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, 100_000)
        self._socket.bind(self.address)
        self._thread = threading.Thread(target=self._loop, name="guidance-telemetry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- receiving
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        last_sweep = time.monotonic()
        while not self._stop.is_set():
            if poller.poll(200):
                while True:
                    try:
                        self._handle(json.loads(self._socket.recv(zmq.NOBLOCK)))
                    except zmq.Again:
                        break
            if time.monotonic() - last_sweep > 60:
                self._sweep()
                last_sweep = time.monotonic()

    def _handle(self, message: dict) -> None:
        kind = message.get("t")
        if kind == "status":
            self.ready, self.error = bool(message["ready"]), message.get("error")
            if not self.ready:
                logger.error("guidance unavailable: %s", self.error)
                with self._lock:
                    self._wake(list(self._waiters))
        elif kind == "step":
            metrics.ARM_FORWARD_SECONDS.observe(message["arm_s"])
            metrics.ARM_BATCH_SIZE.observe(message["batch"])
            metrics.ARM_SLOTS.set(message["slots"])
            with self._lock:
                for row in message["rows"]:
                    stats = self.rows.get(row["rid"])
                    if stats is None:
                        stats = self.rows[row["rid"]] = RowStats()
                        metrics.GUIDED_REQUESTS.inc()
                    metrics.MASKED_TOKENS.inc(max(0, row["masked"] - stats.masked))
                    if row["filtered"] and not stats.filtered:
                        metrics.CONTENT_FILTERED.inc()
                    stats.steps, stats.masked = row["steps"], row["masked"]
                    stats.filtered, stats.failed = row["filtered"], stats.failed or row["failed"]
                    stats.withheld, stats.degenerate = row["withheld"], row.get("degenerate", False)
                    stats.rewards, stats.updated = row["rewards"], time.monotonic()
                self._wake([row["rid"] for row in message["rows"]])
        elif kind == "failure":
            metrics.GUIDANCE_FAILURES.labels("arm_error").inc(len(message["rids"]))
            with self._lock:
                for rid in message["rids"]:
                    stats = self.rows.setdefault(rid, RowStats())
                    stats.failed, stats.failure = True, message["reason"]
                self._wake(message["rids"])
        elif kind == "removed":
            metrics.ARM_SLOTS.set(message["slots"])

    def _wake(self, request_ids: list[str]) -> None:
        """Wake the confirm() calls waiting on these requests (caller holds the lock)."""
        for rid in request_ids:
            for loop, future in self._waiters.pop(rid, ()):
                loop.call_soon_threadsafe(_resolve, future)

    def _sweep(self) -> None:
        cutoff = time.monotonic() - STALE_AFTER_S
        with self._lock:
            for rid in [rid for rid, s in self.rows.items() if s.updated < cutoff]:
                del self.rows[rid]

    # ------------------------------------------------------------------------------------------ serving
    async def confirm(self, request_id: str, tokens: int, timeout: float = CONFIRM_TIMEOUT_S) -> RowStats:
        """Wait until the processor confirmed it guided ``tokens`` steps of the request; 503 if it cannot."""
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while True:
            if self.ready is False:
                metrics.GUIDANCE_FAILURES.labels("arm_unavailable").inc()
                raise unavailable(f"guidance is unavailable: {self.error}", "guidance_unavailable")
            stats = self.rows.get(request_id)
            if stats is not None and stats.failed:
                raise unavailable(
                    "guidance failed for this request; it was not served unguided", "guidance_failed"
                )
            if stats is not None and stats.steps >= tokens:
                return stats
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                metrics.GUIDANCE_FAILURES.labels("unconfirmed").inc()
                raise unavailable("guidance could not be confirmed for this request", "guidance_unconfirmed")
            future = loop.create_future()
            with self._lock:  # registered under the lock, so news that lands after the checks above wakes it
                self._waiters.setdefault(request_id, []).append((loop, future))
                current = self.rows.get(request_id)
                if self.ready is False or (
                    current is not None and (current.failed or current.steps >= tokens)
                ):
                    self._wake([request_id])  # news arrived between the checks and the registration
            try:
                await asyncio.wait_for(future, min(remaining, 1.0))  # the 1 s bound re-checks readiness
            except TimeoutError:
                pass

    def forget(self, request_ids: list[str]) -> None:
        with self._lock:
            for rid in request_ids:
                self.rows.pop(rid, None)
                self._waiters.pop(rid, None)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():  # a waiter that timed out was cancelled
        future.set_result(None)
