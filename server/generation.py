"""Run the engine requests behind one API request (prompts x n choices) and collect or stream their outputs.

Each choice is its own engine request (``<id>-<k>``), so every choice has its own request id the guidance
processor can report on, and its own seed (``seed + k``) for reproducible ``n > 1``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from server import metrics
from server.backtrack import BacktrackInfo, RedirectRegime, attempt_id, cut_point, end_sentence
from server.errors import APIError, bad_request, unavailable

logger = logging.getLogger(__name__)


@dataclass
class BacktrackJob:
    """How to regenerate one guided choice whose draft guidance ended (``server.backtrack``)."""

    regime: RedirectRegime
    redirect_prompt_ids: list[int]  # the request under the redirect preamble, ready for the opening
    opening_ids: list[int]  # the redirect's first words, when nothing of the draft is kept
    bridge_ids: list[int]  # the redirect's first words after a kept part of the draft
    retry_params: Callable[[int, int], Any]  # (max_tokens, attempt) -> SamplingParams after a loop
    redirect_params: Callable[[int, int], Any]  # (max_tokens, attempt) -> SamplingParams of the regime
    decode: Callable[[list[int]], str]
    crisis: bool  # the request shows a self-harm signal: the fallback is the crisis message
    max_tokens: int  # the request's own limit: an answer never has more tokens than it asked for
    eos_token_id: int | None = None


@dataclass
class ChoiceJob:
    index: int
    request_id: str
    prompt_ids: list[int]
    params: Any  # vllm.SamplingParams
    guided: bool = False  # the guidance processor must confirm every token of this choice
    hold_tokens: int = 0  # streamed text is held back until the response guard judged this many tokens
    backtrack: BacktrackJob | None = (
        None  # regenerate instead of withholding (None: withhold, as OpenAI's filter)
    )


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
    backtrack: BacktrackInfo | None = None  # set when the draft was backtracked
    engine_tokens: int | None = None  # tokens the engine generated, attempts included (None: len(token_ids))


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
    backtrack: BacktrackInfo | None = None
    engine_tokens: int | None = None


def _without_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] == eos else tokens


def ended_by(stats: Any) -> str | None:
    """What ended a guided draft early: "safety" (the filter), "degeneration" (the coherence guard), or None."""
    if stats is None:
        return None
    if stats.filtered:
        return "safety"
    return "degeneration" if getattr(stats, "degenerate", False) else None


@dataclass
class _LaggedStream:
    """A streamed choice that may be backtracked: its tokens so far and how much of them was released."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    released: int = 0
    sent: str = ""
    text: str = ""  # vLLM's own text of the draft so far (its stop strings removed)


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
        self._lagged: dict[str, _LaggedStream] = {}  # streamed choices that may be backtracked

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

    async def _attempt(self, job: ChoiceJob, number: int, prompt_ids: list[int], params: Any) -> ChoiceResult:
        """One backtracking attempt: its own guided engine request, run to completion and confirmed."""
        request_id = attempt_id(job.request_id, number)
        self._unfinished.add(request_id)
        result = ChoiceResult(job.index, request_id, len(prompt_ids))
        async for out in self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id):
            completion = out.outputs[0]
            result.token_ids = list(completion.token_ids)
            result.finish_reason = completion.finish_reason
            if out.finished:
                self._unfinished.discard(request_id)
        attempt_job = ChoiceJob(job.index, request_id, prompt_ids, params, guided=job.guided)
        result.stats = await self._confirm(attempt_job, len(result.token_ids), True)
        return result

    async def _backtrack(self, job: ChoiceJob, tokens: list[int], stats: Any) -> ChoiceResult:
        """The answer for a guided draft with ``tokens`` (EOS removed): the draft itself when nothing ended it,
        else the kept part of it and a regenerated rest, or the fallback (``server.backtrack``)."""
        plan = job.backtrack
        assert plan is not None
        result = ChoiceResult(job.index, job.request_id, len(job.prompt_ids), stats=stats)
        reason = ended_by(stats)
        if reason is None:
            result.text, result.token_ids = plan.decode(tokens), tokens
            return result
        regime = plan.regime
        kept = tokens[: cut_point(tokens, reason, regime.lag, job.hold_tokens)]
        info = BacktrackInfo(reason, discarded_tokens=len(tokens) - len(kept))
        metrics.BACKTRACKS.labels(reason).inc()
        room = plan.max_tokens - len(kept)
        answer: list[int] | None = None
        opening: list[int] = []
        for number in range(1, regime.attempts + 1):
            if room <= 0:
                break
            info.attempts = number
            if reason == "degeneration":  # a loop: go on from the kept part, without the preference term
                opening, prompt = [], job.prompt_ids + kept
                params = plan.retry_params(room, number)
            else:
                opening = plan.bridge_ids if kept else plan.opening_ids
                prompt = (job.prompt_ids + kept if kept else plan.redirect_prompt_ids) + opening
                limit = min(room - len(opening), regime.max_tokens)
                if limit < 1:  # no room left for a redirect after its opening: the fallback text
                    break
                params = plan.redirect_params(limit, number)
            attempt = await self._attempt(job, number, prompt, params)
            info.extra_tokens += len(attempt.token_ids)
            outcome = ended_by(attempt.stats)
            info.trail.append(outcome or "ok")
            if outcome is None:
                answer = _without_eos(attempt.token_ids, plan.eos_token_id)
                info.redirected = bool(opening)
                break
            reason = "safety" if outcome == "safety" else reason  # an unsafe attempt: redirect from now on
        if answer is None:
            info.fallback = True
            metrics.FALLBACKS.inc()
            if plan.crisis:
                message = regime.crisis
            else:  # nothing unsafe was seen: the drafts only looped
                message = regime.fallback if "safety" in (info.reason, *info.trail) else regime.retry_fallback
            head = plan.decode(kept).rstrip()
            result.text = f"{head}\n\n{message}" if head else message
            result.token_ids = kept
        else:
            text = plan.decode(kept + opening + answer)
            result.text = end_sentence(text) if opening else text
            result.token_ids = kept + opening + answer
            if info.redirected:
                metrics.REDIRECTS.inc()
        metrics.BACKTRACK_EXTRA_TOKENS.inc(info.extra_tokens)
        result.backtrack = info
        # A regenerated answer is complete ("stop"); the operator's fallback replaces filtered content.
        result.finish_reason = "stop"
        result.content_filtered = info.fallback
        result.engine_tokens = len(tokens) + 1 + info.extra_tokens  # the draft's tokens and its EOS
        return result

    async def _release(self, job: ChoiceJob, d: ChoiceDelta) -> ChoiceDelta | None:
        """A backtrackable stream releases a token once ``lag`` later tokens were judged; at the end it sends
        the rest of the same answer a whole response gets (``_backtrack``), so the two always agree."""
        plan = job.backtrack
        assert plan is not None
        state = self._lagged.setdefault(job.request_id, _LaggedStream())
        state.tokens += d.token_ids
        state.logprobs += d.logprobs
        state.text += d.text
        if d.finish_reason is None:
            if ended_by(d.stats):  # guidance ended the draft: hold everything until it finishes
                return None
            lag = max(plan.regime.lag, job.hold_tokens)
            n = len(state.tokens)
            released = 0 if n <= job.hold_tokens else n - lag
            if released <= state.released:
                return None
            text = plan.decode(state.tokens[:released])
            if text.endswith("\ufffd") or not text.startswith(state.sent):  # mid-character: wait
                return None
            out = ChoiceDelta(
                d.index,
                d.request_id,
                text[len(state.sent) :],
                state.tokens[state.released : released],
                state.logprobs[state.released : released],
                None,
                stats=d.stats,
            )
            state.sent, state.released = text, released
            return out
        self._lagged.pop(job.request_id, None)
        answer = await self._backtrack(job, _without_eos(state.tokens, plan.eos_token_id), d.stats)
        if answer.backtrack is None:
            answer.text = state.text
        if not answer.text.startswith(state.sent):
            logger.warning("a backtracked stream's answer does not extend what was sent (%s)", job.request_id)
        final = ChoiceDelta(
            d.index,
            d.request_id,
            answer.text[len(state.sent) :],
            answer.token_ids[state.released :],
            state.logprobs[state.released :] if answer.backtrack is None else [],
            answer.finish_reason if answer.backtrack is not None else d.finish_reason,
            content_filtered=answer.content_filtered,
            stats=d.stats,
            backtrack=answer.backtrack,
            engine_tokens=answer.engine_tokens or len(state.tokens),
        )
        return final

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
        if job.backtrack is not None:
            draft_tokens = len(result.token_ids)
            answer = await self._backtrack(
                job, _without_eos(result.token_ids, job.backtrack.eos_token_id), result.stats
            )
            if answer.backtrack is None:  # the draft as vLLM detokenized it (stop strings removed)
                answer.text = result.text
                answer.finish_reason, answer.stop_reason = result.finish_reason, result.stop_reason
                answer.logprobs, answer.engine_tokens = result.logprobs, draft_tokens
            return answer
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
            if job.backtrack is not None:
                return await self._release(job, d)
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
