"""Process lifecycle: build the engine, serve HTTP, drain on SIGTERM, exit non-zero when the engine dies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn

from server import metrics
from server.app import create_app
from server.engine import build_engine, resolve_model
from server.requests import RequestBuilder
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

EXIT_ENGINE_DEAD = 3
# uvicorn's own grace period once we tell it to stop: our drain has already waited for in-flight requests, so
# this only lets the last bytes go out before whatever still runs (past the drain timeout) is cancelled.
SHUTDOWN_GRACE_S = 2


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling, so that SIGTERM / SIGINT start our drain (see ``run_server``).

    uvicorn's handler would stop at once, and sse-starlette, which hooks it, would cut every open stream.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _watch_engine(engine, server: uvicorn.Server, outcome: dict) -> None:
    """Once the engine is dead, report unhealthy for a moment (probes see 503), then stop with a non-zero code."""
    while not server.should_exit:
        if engine.errored:
            metrics.ENGINE_HEALTHY.set(0)
            logger.error("the vLLM engine died; exiting so the orchestrator restarts the server")
            outcome["code"] = EXIT_ENGINE_DEAD
            await asyncio.sleep(2.0)
            server.should_exit = True
            return
        await asyncio.sleep(0.5)


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """Claim the HTTP port before the engine starts, so nothing the engine opens (vLLM's ZeroMQ sockets take free
    ports) can take it in the seconds start-up lasts, and a port in use fails at once with a message naming it.

    The socket is created as IPPROTO_TCP, not protocol 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    connections whose socket says TCP, and with Nagle on, the SSE event written right after the headers waited for
    the client's delayed ACK, about 40 ms added to every streamed first token on a kept-alive connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(
            f"prosocial serve: argument --port: cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    sock.listen(2048)
    return sock


async def run_server(settings: ServerSettings, log_level: str = "info") -> int:
    from transformers import AutoTokenizer

    listener = bind_listening_socket(settings.host, settings.port)
    model = resolve_model(settings)
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    builder = RequestBuilder(settings, tokenizer, model.name, str(model.path))
    processors, additional_config = None, None
    if settings.guidance:
        from server.guided.config import processor_setup
        from server.telemetry import GuidanceTelemetry

        builder.telemetry = GuidanceTelemetry()
        processors, additional_config = processor_setup(settings, model, builder.telemetry.address)
    engine = build_engine(settings, model, processors, additional_config)
    app = create_app(settings, engine, builder)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        access_log=settings.log_requests,
    )
    server = _Server(config)
    outcome = {"code": 0}
    loop = asyncio.get_running_loop()

    async def drain_then_exit() -> None:
        deadline = loop.time() + settings.drain_timeout_s
        while metrics.HTTPMetricsMiddleware.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if metrics.HTTPMetricsMiddleware.in_flight > 0:
            logger.warning(
                "drain timeout: cutting %d request(s) still in flight",
                metrics.HTTPMetricsMiddleware.in_flight,
            )
            # sse-starlette ends its open streams itself once told (within 0.5 s): a clean cut, whereas
            # uvicorn's task cancellation after SHUTDOWN_GRACE_S leaves them hanging until the process exits.
            from sse_starlette.sse import AppStatus

            AppStatus.should_exit = True
        server.should_exit = True

    def drain() -> None:
        # New requests get 503 while in-flight ones finish (bounded by the drain timeout), then uvicorn stops.
        if app.state.prosocial.draining:
            server.force_exit = True
            return
        app.state.prosocial.draining = True
        logger.info("draining for up to %.0f s", settings.drain_timeout_s)
        asyncio.ensure_future(drain_then_exit())

    watcher = asyncio.ensure_future(_watch_engine(engine, server, outcome))
    if settings.guidance:
        builder.telemetry.start()
    try:
        loop.add_signal_handler(signal.SIGTERM, drain)
        loop.add_signal_handler(signal.SIGINT, drain)
        await server.serve(sockets=[listener])
    finally:
        listener.close()
        watcher.cancel()
        if settings.guidance:
            builder.telemetry.close()
        engine.shutdown()
    return outcome["code"]
