"""Run the engine requests behind one API request (prompts x n choices) and collect or stream their outputs.

Each choice is its own engine request (``<id>-<k>``), so every choice has its own request id the guidance
processor can report on, and its own seed (``seed + k``) for reproducible ``n > 1``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from server import metrics
from server.errors import APIError, bad_request, unavailable

logger = logging.getLogger(__name__)


@dataclass
class ChoiceJob:
    index: int
    request_id: str
    prompt_ids: list[int]
    params: Any  # vllm.SamplingParams
    guided: bool = False  # the guidance processor must confirm every token of this choice


@dataclass
class ChoiceResult:
    index: int
    request_id: str
    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    content_filtered: bool = False
    stats: Any = None  # guidance telemetry (server.telemetry.RowStats) for guided choices


@dataclass
class ChoiceDelta:
    """New text and tokens of one choice since its last delta."""

    index: int
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[dict]
    finish_reason: str | None
    content_filtered: bool = False
    stats: Any = None


def engine_error(exc: BaseException) -> APIError:
    """Map an exception raised by the engine to an HTTP error (never a bare 500 for bad input)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return unavailable("the inference engine is not running", "engine_dead")
    if isinstance(exc, ValueError):
        return bad_request(str(exc).splitlines()[0][:500] or "invalid request", None)
    logger.exception("engine request failed", exc_info=exc)
    return APIError(500, "the engine failed to process the request", "server_error", None, "engine_error")


class Generation:
    """All engine requests of one API request; aborts whatever is unfinished when closed."""

    def __init__(self, engine: Any, jobs: list[ChoiceJob], telemetry: Any = None) -> None:
        self.engine = engine
        self.jobs = jobs
        self.telemetry = telemetry
        self._unfinished = {job.request_id for job in jobs}
        self._confirmed_tokens: dict[str, int] = {}

    async def _confirm(self, job: ChoiceJob, new_tokens: int, finished: bool) -> Any:
        """For a guided choice, wait for the processor's word that it guided every token so far (fail closed)."""
        if not job.guided or self.telemetry is None:
            return None
        total = self._confirmed_tokens.get(job.request_id, 0) + new_tokens
        self._confirmed_tokens[job.request_id] = total
        stats = await self.telemetry.confirm(job.request_id, total)
        if finished:
            self.telemetry.forget([job.request_id])
        return stats

    async def abort_unfinished(self) -> None:
        if self._unfinished:
            ids = sorted(self._unfinished)
            self._unfinished.clear()
            metrics.ABORTED_REQUESTS.inc(len(ids))
            await self.engine.abort(ids)
            if self.telemetry is not None:
                self.telemetry.forget(ids)

    async def _run_one(self, job: ChoiceJob) -> ChoiceResult:
        result = ChoiceResult(job.index, job.request_id, len(job.prompt_ids))
        async for out in self.engine.generate(
            {"prompt_token_ids": job.prompt_ids}, job.params, job.request_id
        ):
            completion = out.outputs[0]
            result.text = completion.text
            result.token_ids = list(completion.token_ids)
            result.logprobs = list(completion.logprobs or [])
            result.finish_reason = completion.finish_reason
            result.stop_reason = completion.stop_reason
            if out.finished:
                self._unfinished.discard(job.request_id)
        result.stats = await self._confirm(job, len(result.token_ids), True)
        result.content_filtered = bool(
            result.stats and result.stats.filtered and result.finish_reason == "stop"
        )
        return result

    async def collect(self) -> list[ChoiceResult]:
        """Run every choice to completion (FINAL_ONLY outputs)."""
        tasks = [asyncio.ensure_future(self._run_one(job)) for job in self.jobs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException as exc:
            for task in tasks:
                task.cancel()
            await self.abort_unfinished()
            if isinstance(exc, Exception):
                raise engine_error(exc) from exc
            raise

    async def stream(self) -> AsyncIterator[ChoiceDelta]:
        """Merge the DELTA outputs of all choices in arrival order.

        The first output of every choice is awaited before anything is yielded, so a request the engine
        rejects becomes an HTTP error instead of a broken stream.
        """
        queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()
        streams = [
            self.engine.generate({"prompt_token_ids": job.prompt_ids}, job.params, job.request_id)
            for job in self.jobs
        ]

        async def delta(job: ChoiceJob, out: Any) -> ChoiceDelta:
            completion = out.outputs[0]
            if out.finished:
                self._unfinished.discard(job.request_id)
            d = ChoiceDelta(
                job.index,
                job.request_id,
                completion.text,
                list(completion.token_ids),
                list(completion.logprobs or []),
                completion.finish_reason if out.finished else None,
            )
            d.stats = await self._confirm(job, len(d.token_ids), out.finished)
            d.content_filtered = bool(d.stats and d.stats.filtered and d.finish_reason == "stop")
            return d

        firsts: list[ChoiceDelta] = []
        try:
            for job, gen in zip(self.jobs, streams, strict=True):
                firsts.append(await delta(job, await gen.__anext__()))
        except BaseException as exc:
            await self.abort_unfinished()
            if isinstance(exc, Exception) and not isinstance(exc, StopAsyncIteration):
                raise engine_error(exc) from exc
            raise

        async def pump(job: ChoiceJob, gen: Any, first: ChoiceDelta) -> None:
            try:
                if first.finish_reason is None:
                    async for out in gen:
                        await queue.put(await delta(job, out))
            except Exception as exc:  # surfaced to the consumer below
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks: list[asyncio.Task] = []
        try:
            for first in firsts:
                yield first
            tasks = [
                asyncio.ensure_future(pump(job, gen, first))
                for job, gen, first in zip(self.jobs, streams, firsts, strict=True)
            ]
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise engine_error(item)
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await self.abort_unfinished()
