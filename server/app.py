"""The FastAPI app: OpenAI-compatible routes over an in-process vLLM ``AsyncLLM``.

Data path: request -> validation (``protocol``) -> prompt token ids + SamplingParams (``requests``) ->
engine (``generation``) -> OpenAI response or SSE chunks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import metrics
from server.errors import APIError, install_error_handlers, unavailable
from server.generation import ChoiceDelta, ChoiceResult, Generation
from server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)
from server.requests import RequestBuilder, chat_logprobs, completion_logprobs, finish_reason
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)
}


class BodySizeLimitMiddleware:
    """Reject bodies larger than the operator's limit with 413 before they are parsed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        message = f"request body exceeds {self.max_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await APIError(413, message, code="request_too_large").response()(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message_in = await receive()
            if message_in["type"] == "http.request":
                seen += len(message_in.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException (not our APIError): FastAPI re-raises it from body parsing instead of
                    # turning it into a generic 400, and the error handlers render it as a 413.
                    raise StarletteHTTPException(413, message)
            return message_in

        await self.app(scope, limited_receive, send)


class AppState:
    """What the routes share: settings, the engine, the request builder."""

    def __init__(self, settings: ServerSettings, engine: Any, builder: RequestBuilder) -> None:
        self.settings = settings
        self.engine = engine
        self.builder = builder
        self.created = int(time.time())
        self.draining = False


def state(request: Request) -> AppState:
    return request.app.state.prosocial


def require_api_key(request: Request) -> None:
    """Bearer-token check for /v1/*, in constant time."""
    expected = state(request).settings.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    if not hmac.compare_digest(token.strip().encode(), expected.get_secret_value().encode()):
        raise APIError(401, "invalid API key", code="invalid_api_key")


def require_serving(request: Request) -> AppState:
    app_state = state(request)
    if app_state.draining:
        raise unavailable("the server is shutting down", "shutting_down")
    if app_state.engine.errored:
        raise unavailable("the inference engine is not running", "engine_dead")
    return app_state


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def _watch_disconnect(request: Request, generation: Generation, task: asyncio.Task) -> None:
    """Abort a non-streaming request's engine work when its client goes away."""
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            await generation.abort_unfinished()
            return
        await asyncio.sleep(0.25)


async def _collect(request: Request, generation: Generation) -> list[ChoiceResult]:
    task = asyncio.ensure_future(generation.collect())
    watcher = asyncio.ensure_future(_watch_disconnect(request, generation, task))
    try:
        return await task
    finally:
        watcher.cancel()


def _usage(results: list[ChoiceResult], prompt_tokens: int) -> Usage:
    completion = sum(len(r.token_ids) if r.engine_tokens is None else r.engine_tokens for r in results)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
    )


# Characters that JSON leaves unescaped but common line splitters (Python's str.splitlines, httpx's iter_lines)
# treat as line breaks: escaped, so an SSE data line is always one line for every client.
_LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).translate(_LINE_BREAKS_JSON_KEEPS)


class StreamChunks:
    """The SSE payloads of one streamed response (chat or text completion), OpenAI's shapes.

    Counts the tokens each choice actually streamed, so the closing usage chunk matches what the client received.
    """

    def __init__(
        self, rid: str, object_name: str, created: int, model: str, plan: Any, stream_options
    ) -> None:
        self.head = {"id": rid, "object": object_name, "created": created, "model": model}
        self.plan = plan
        self.include_usage = bool(stream_options and stream_options.include_usage)
        self.emitted: dict[int, int] = {}

    def envelope(self, choices: list[dict], usage: dict | None = None) -> dict:
        payload = self.head | {"choices": choices}
        if self.include_usage:  # OpenAI: "usage" is null on every chunk but the last
            payload["usage"] = usage
        return payload

    def choice(self, delta: ChoiceDelta, content: dict, logprobs_of: Any) -> dict:
        """One choice of a chunk: its content fields, then logprobs, finish_reason and (at the end) prosocial."""
        if delta.engine_tokens is not None:  # the last delta of a guided choice: every token the engine made
            self.emitted[delta.index] = delta.engine_tokens
        else:
            self.emitted[delta.index] = self.emitted.get(delta.index, 0) + len(delta.token_ids)
        choice: dict[str, Any] = {"index": delta.index} | content
        choice["logprobs"] = (
            logprobs_of(delta.logprobs, delta.token_ids, self.plan.top_logprobs).model_dump()
            if self.plan.logprobs
            else None
        )
        choice["finish_reason"] = finish_reason(delta) if delta.finish_reason else None
        if delta.finish_reason:
            info = self.plan.prosocial_info(delta)
            if info is not None:
                choice["prosocial"] = info.model_dump()
        return choice

    def usage_chunk(self) -> dict:
        done = sum(self.emitted.values())
        prompt = self.plan.prompt_tokens
        return self.envelope(
            [], {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
        )


async def _stream_events(
    generation: Generation, first_chunk: dict | None, render: Any, usage_chunk: Any
) -> AsyncIterator[str]:
    """SSE payloads for a stream, ending with [DONE].

    The first engine output is awaited before anything is yielded: a request the engine rejects raises here and
    becomes an HTTP error. A client disconnect cancels this generator, which aborts the engine requests.
    """
    deltas = generation.stream()
    try:
        first = await deltas.__anext__()
        if first_chunk is not None:
            yield _sse(first_chunk)
        yield _sse(render(first))
        try:
            async for delta in deltas:
                yield _sse(render(delta))
            if usage_chunk is not None:
                yield _sse(usage_chunk())
        except APIError as exc:
            yield _sse(exc.body())
        yield "[DONE]"
    finally:
        await deltas.aclose()


def create_app(settings: ServerSettings, engine: Any, builder: RequestBuilder) -> FastAPI:
    """The app around an already-built engine (the CLI builds it; tests may pass their own)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics.ENGINE_HEALTHY.set(0 if engine.errored else 1)
        yield

    app = FastAPI(
        title="ProSocialAlign server",
        version="0.1.0",
        description=(
            "OpenAI-compatible chat and text completions over vLLM, with ProSocialAlign decoding-time "
            "alignment. Extension fields: `prosocial_prefs`, `prosocial_guidance`, `prosocial_safety_threshold`."
        ),
        lifespan=lifespan,
    )
    app.state.prosocial = AppState(settings, engine, builder)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(metrics.HTTPMetricsMiddleware)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    v1 = [Depends(require_api_key)]

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health(request: Request) -> Response:
        app_state = state(request)
        try:
            await app_state.engine.check_health()
        except Exception:
            metrics.ENGINE_HEALTHY.set(0)
            return unavailable("the inference engine is not running", "engine_dead").response()
        metrics.ENGINE_HEALTHY.set(1)
        telemetry = app_state.builder.telemetry
        if telemetry is not None and telemetry.ready is False:
            return unavailable(
                f"guidance is unavailable: {telemetry.error}", "guidance_unavailable"
            ).response()
        if app_state.draining:
            return unavailable("the server is shutting down", "shutting_down").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=[] if settings.metrics_public else v1)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=v1, response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models(request: Request) -> ModelList:
        app_state = state(request)
        card = ModelCard(
            id=app_state.builder.model_name,
            created=app_state.created,
            root=app_state.builder.model_path,
            max_model_len=app_state.settings.max_model_len,
        )
        return ModelList(data=[card])

    @app.post(
        "/v1/chat/completions",
        dependencies=v1,
        response_model=ChatCompletionResponse,
        responses=ERROR_RESPONSES,
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        app_state = require_serving(request)
        plan = app_state.builder.chat(body)
        generation = Generation(app_state.engine, plan.jobs, app_state.builder.telemetry)
        rid, created, model = _new_id("chatcmpl"), int(time.time()), app_state.builder.model_name
        if not body.stream:
            results = await _collect(request, generation)
            choices = [
                ChatChoice(
                    index=r.index,
                    message=ChatMessageOut(content=r.text),
                    logprobs=chat_logprobs(r.logprobs, r.token_ids, plan.top_logprobs)
                    if plan.logprobs
                    else None,
                    finish_reason=finish_reason(r),
                    prosocial=plan.prosocial_info(r),
                )
                for r in results
            ]
            return ChatCompletionResponse(
                id=rid,
                created=created,
                model=model,
                choices=choices,
                usage=_usage(results, plan.prompt_tokens),
            )

        chunks = StreamChunks(rid, "chat.completion.chunk", created, model, plan, body.stream_options)
        first = chunks.envelope(
            [
                {"index": job.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                | {"finish_reason": None}
                for job in plan.jobs
            ]
        )

        def render(delta: ChoiceDelta) -> dict:
            return chunks.envelope([chunks.choice(delta, {"delta": {"content": delta.text}}, chat_logprobs)])

        events = _stream_events(
            generation, first, render, chunks.usage_chunk if chunks.include_usage else None
        )
        return await _start_stream(events)

    @app.post(
        "/v1/completions", dependencies=v1, response_model=CompletionResponse, responses=ERROR_RESPONSES
    )
    async def completions(body: CompletionRequest, request: Request) -> Any:
        app_state = require_serving(request)
        plan = app_state.builder.completion(body)
        generation = Generation(app_state.engine, plan.jobs, app_state.builder.telemetry)
        rid, created, model = _new_id("cmpl"), int(time.time()), app_state.builder.model_name
        if not body.stream:
            results = await _collect(request, generation)
            choices = [
                CompletionChoice(
                    index=r.index,
                    text=r.text,
                    logprobs=completion_logprobs(r.logprobs, r.token_ids, plan.top_logprobs)
                    if plan.logprobs
                    else None,
                    finish_reason=finish_reason(r),
                    prosocial=plan.prosocial_info(r),
                )
                for r in results
            ]
            return CompletionResponse(
                id=rid,
                created=created,
                model=model,
                choices=choices,
                usage=_usage(results, plan.prompt_tokens),
            )

        chunks = StreamChunks(rid, "text_completion", created, model, plan, body.stream_options)

        def render(delta: ChoiceDelta) -> dict:
            return chunks.envelope([chunks.choice(delta, {"text": delta.text}, completion_logprobs)])

        events = _stream_events(
            generation, None, render, chunks.usage_chunk if chunks.include_usage else None
        )
        return await _start_stream(events)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/playground")

    @app.get("/playground", include_in_schema=False)
    async def playground() -> FileResponse:
        page = STATIC_DIR / "playground.html"
        if not page.is_file():
            raise APIError(404, "the playground page is not installed", code="not_found")
        return FileResponse(page, media_type="text/html")

    return app


async def _start_stream(events: AsyncIterator[str]) -> EventSourceResponse:
    """Pull the first event before answering, so engine-side rejections become HTTP errors, not broken streams."""
    first = await events.__anext__()

    async def replay() -> AsyncIterator[str]:
        yield first
        async for event in events:
            yield event

    return EventSourceResponse(replay(), ping=15)
