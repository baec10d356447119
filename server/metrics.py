"""The server's own Prometheus metrics (``prosocial_*``), beside vLLM's ``vllm:*`` ones in the same registry.

Guidance metrics are produced in the engine's worker process and arrive here through the telemetry channel
(``server/telemetry.py``); they are registered in this process so one scrape of ``/metrics`` sees everything.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

KNOWN_ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/", "/playground"}
)

GENERATION_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions"})

REQUESTS = Counter("prosocial_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"])
REQUEST_LATENCY = Histogram(
    "prosocial_request_latency_seconds",
    "Time from request arrival to the last byte of the response.",
    ["endpoint"],
    buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
)
ENGINE_HEALTHY = Gauge("prosocial_engine_healthy", "1 while the vLLM engine answers, 0 once it is dead.")
IN_FLIGHT = Gauge("prosocial_requests_in_flight", "Generation requests being served now.")
ABORTED_REQUESTS = Counter(
    "prosocial_aborted_requests", "Engine requests aborted before finishing (client gone, error, shutdown)."
)
GUIDED_REQUESTS = Counter("prosocial_guided_requests", "Engine requests that ran with ARM guidance.")
MASKED_TOKENS = Counter("prosocial_masked_tokens", "Vocabulary entries removed by the safety mask.")
CONTENT_FILTERED = Counter("prosocial_content_filtered", "Choices ended early by the safety mask.")
GUIDANCE_FAILURES = Counter(
    "prosocial_guidance_failures", "Requests failed closed because guidance could not run.", ["reason"]
)
ARM_FORWARD_SECONDS = Histogram(
    "prosocial_arm_forward_seconds",
    "Wall time of one batched ARM pass inside the engine step.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
)
ARM_BATCH_SIZE = Histogram(
    "prosocial_arm_batch_size",
    "Rows in one batched ARM pass.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
ARM_SLOTS = Gauge("prosocial_arm_cache_slots", "ARM KV-cache slots held by running requests.")
BACKTRACKS = Counter(
    "prosocial_backtracks",
    "Guided drafts discarded and regenerated, by what ended them (safety filter or coherence guard).",
    ["reason"],
)
REDIRECTS = Counter("prosocial_redirects", "Backtracked choices answered by the redirect regime.")
FALLBACKS = Counter(
    "prosocial_fallbacks", "Backtracked choices answered with the operator's fallback message."
)
BACKTRACK_EXTRA_TOKENS = Counter(
    "prosocial_backtrack_extra_tokens", "Tokens the engine generated for backtracking attempts."
)


class HTTPMetricsMiddleware:
    """Counts every HTTP response by endpoint and status, and times it to its last byte (streams included)."""

    in_flight = 0  # generation requests between arrival and last byte (the SIGTERM drain waits on it)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = (
            path if path in KNOWN_ENDPOINTS else ("/static" if path.startswith("/static/") else "other")
        )
        start = time.perf_counter()
        status = 500
        generating = path in GENERATION_ENDPOINTS
        if generating:
            HTTPMetricsMiddleware.in_flight += 1
            IN_FLIGHT.inc()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                REQUEST_LATENCY.labels(endpoint).observe(time.perf_counter() - start)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            REQUESTS.labels(endpoint, str(status)).inc()
            if generating:
                HTTPMetricsMiddleware.in_flight -= 1
                IN_FLIGHT.dec()
