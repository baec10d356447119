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
    hold_tokens: int = 0  # streamed text is held back until the response guard judged this many tokens


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
    withheld: bool = False  # content filtered: its text is omitted
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
    withheld: bool = False
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
        self._held: dict[str, ChoiceDelta] = {}  # streamed choices whose first tokens are held back
        self._released: set[str] = set()

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

    @staticmethod
    def _withhold(choice: ChoiceResult | ChoiceDelta, streamed: bool) -> None:
        """A choice the safety filter ended returns none of the text not yet released to the client (OpenAI's
        ``content_filter``: content omitted): all of it when the response is returned whole, the held-back
        first tokens when streamed and filtered before the guard released them. Its tokens still count."""
        # Finished after the filter: by EOS, or by the length limit when the client set ignore_eos.
        choice.content_filtered = bool(
            choice.stats and choice.stats.filtered and choice.finish_reason is not None
        )
        if choice.content_filtered and (not streamed or choice.stats.withheld):
            choice.text, choice.logprobs, choice.withheld = "", [], True

    def _hold(self, job: ChoiceJob, d: ChoiceDelta) -> ChoiceDelta | None:
        """Merge a guarded choice's deltas until ``hold_tokens`` tokens were judged or it finished."""
        if job.hold_tokens == 0 or job.request_id in self._released:
            return d
        held = self._held.pop(job.request_id, None)
        if held is not None:
            d.text, d.token_ids = held.text + d.text, held.token_ids + d.token_ids
            d.logprobs = held.logprobs + d.logprobs
        # The guard judges the first hold_tokens tokens at the step after them: release once that step ran,
        # unless it ended the response there (with ignore_eos the row then runs on, emitting only EOS).
        judging = self._confirmed_tokens.get(job.request_id, 0) <= job.hold_tokens
        withheld = d.stats is not None and d.stats.withheld
        if d.finish_reason is None and (judging or withheld):
            self._held[job.request_id] = d
            return None
        self._released.add(job.request_id)
        return d

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
        self._withhold(result, streamed=False)
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

        async def delta(job: ChoiceJob, out: Any) -> ChoiceDelta | None:
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
            d = self._hold(job, d)
            if d is not None:
                self._withhold(d, streamed=True)
            return d

        firsts: list[ChoiceDelta] = []
        try:
            for job, gen in zip(self.jobs, streams, strict=True):
                first = await delta(job, await gen.__anext__())
                firsts.append(first or ChoiceDelta(job.index, job.request_id, "", [], [], None))
        except BaseException as exc:
            await self.abort_unfinished()
            if isinstance(exc, Exception) and not isinstance(exc, StopAsyncIteration):
                raise engine_error(exc) from exc
            raise

        async def pump(job: ChoiceJob, gen: Any, first: ChoiceDelta) -> None:
            try:
                if first.finish_reason is None:
                    async for out in gen:
                        d = await delta(job, out)
                        if d is not None:
                            await queue.put(d)
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
