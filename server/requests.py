"""From a validated API request to engine work: prompt token ids, SamplingParams and guidance specs.

All limits are checked here, before the engine sees anything, so that bad input is a 400 that names the
offending parameter.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from server.backtrack import RedirectRegime, attempt_id, shows_self_harm
from server.errors import APIError, bad_request
from server.generation import BacktrackJob, ChoiceJob
from server.guidance import GuidancePolicy
from server.guided.spec import GuidanceSpec
from server.protocol import (
    BacktrackOut,
    ChatCompletionRequest,
    ChoiceLogprobs,
    CompletionLogprobs,
    CompletionRequest,
    ProsocialInfo,
    ProsocialPrefs,
    TokenLogprob,
    TopLogprob,
    _SamplingFields,
)
from server.settings import ServerSettings


@dataclass
class Plan:
    """The engine requests behind one API request and how to render their results."""

    jobs: list[ChoiceJob]
    prompt_tokens: int
    logprobs: bool
    top_logprobs: int
    specs: dict[str, GuidanceSpec | None] = field(default_factory=dict)

    def prosocial_info(self, choice: Any) -> ProsocialInfo | None:
        spec = self.specs.get(choice.request_id)
        if spec is None:
            return None
        info = ProsocialInfo(
            guided=spec.prefs is not None,
            prefs=spec.prefs_dict(),
            safety_mask=spec.safety_mask,
            safety_threshold=spec.safety_threshold if spec.safety_mask else None,
            response_threshold=spec.response_threshold if spec.hold_tokens else None,
        )
        stats = getattr(choice, "stats", None)
        if stats is not None:
            info.masked_tokens = stats.masked
            info.content_filtered = getattr(choice, "content_filtered", stats.filtered)
            info.withheld = getattr(choice, "withheld", False)
            info.mean_rewards = stats.rewards
            info.degenerate = getattr(stats, "degenerate", False)
        backtrack = getattr(choice, "backtrack", None)
        if backtrack is not None:
            info.backtrack = BacktrackOut(
                reason=backtrack.reason,
                attempts=backtrack.attempts,
                redirected=backtrack.redirected,
                fallback=backtrack.fallback,
                discarded_tokens=backtrack.discarded_tokens,
                extra_tokens=backtrack.extra_tokens,
            )
        return info


class RequestBuilder:
    def __init__(self, settings: ServerSettings, tokenizer: Any, model_name: str, model_path: str) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_path = model_path
        self.policy = GuidancePolicy(settings)
        self.telemetry: Any = None  # set by the CLI when guidance runs (server.telemetry.GuidanceTelemetry)
        redirect_prefs = ProsocialPrefs(**settings.redirect_prefs) if settings.redirect_prefs else None
        self.regime = RedirectRegime(
            attempts=settings.backtrack_attempts,
            lag=max(settings.stream_lag_tokens, self.policy.guard_tokens),
            prefs=tuple(redirect_prefs.normalised()) if redirect_prefs is not None else None,
            preamble=settings.redirect_preamble,
            opening=settings.redirect_opening,
            max_tokens=settings.redirect_max_tokens,
            retry_response_threshold=settings.retry_response_threshold,
            fallback=settings.fallback_message,
            crisis=settings.crisis_message,
        )
        self._eos = getattr(tokenizer, "eos_token_id", None)

    # --- prompts -------------------------------------------------------------------------------------------
    def chat_prompt_ids(self, body: ChatCompletionRequest) -> list[int]:
        if len(body.messages) > self.settings.max_messages:
            raise bad_request(f"at most {self.settings.max_messages} messages are accepted", "messages")
        return self._render(self._messages(body))

    def _messages(self, body: ChatCompletionRequest) -> list[dict]:
        """The conversation as the template reads it; a guided request without a system message gets the
        operator's system prompt."""
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        guided = self.settings.guidance and body.prosocial_guidance is not False
        if guided and self.settings.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.settings.system_prompt})
        return messages

    def _redirect_messages(self, messages: list[dict]) -> list[dict]:
        """The conversation under the redirect preamble (joined to the client's own system text, if any)."""
        persona = self.settings.system_prompt
        if persona and messages and messages[0] == {"role": "system", "content": persona}:
            messages = messages[1:]  # the operator's persona gives way to the redirect preamble
        if messages and messages[0]["role"] == "system":
            first = {"role": "system", "content": f"{self.regime.preamble}\n\n{messages[0]['content']}"}
            return [first] + messages[1:]
        return [{"role": "system", "content": self.regime.preamble}] + messages

    def _render(self, messages: list[dict]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template may reject a role order
            raise bad_request(
                f"messages could not be rendered by the chat template: {exc}", "messages"
            ) from exc
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def text_prompt_ids(self, prompt: str) -> list[int]:
        ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        return ids

    # --- limits --------------------------------------------------------------------------------------------
    def _max_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        limit = self.settings.max_model_len
        if prompt_len >= limit:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens; this model's context length is {limit}",
                param="messages" if param.startswith("max_") else param,
                code="context_length_exceeded",
            )
        room = limit - prompt_len
        if requested is None:
            return min(self.settings.default_max_tokens, room)
        if requested > self.settings.max_tokens_limit:
            raise bad_request(f"{param} may be at most {self.settings.max_tokens_limit}", param)
        if requested > room:
            raise APIError(
                400,
                f"{param}={requested} plus the prompt's {prompt_len} tokens exceeds the context length {limit}",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    def _check_common(self, body: _SamplingFields) -> None:
        if body.model != self.model_name:
            raise APIError(
                404, f"the model '{body.model}' does not exist", param="model", code="model_not_found"
            )
        if body.n > self.settings.max_n:
            raise bad_request(f"n may be at most {self.settings.max_n} on this server", "n")

    # --- sampling params -------------------------------------------------------------------------------------
    def _params(
        self,
        body: _SamplingFields,
        max_tokens: int,
        logprobs: int | None,
        choice: int,
        spec: GuidanceSpec | None,
        whole: bool = False,
        repetition_penalty: float = 1.0,
        stop: list[str] | None = None,
    ) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        streamed = body.stream and not whole
        try:
            return SamplingParams(
                n=1,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=0 if body.top_k in (None, -1) else body.top_k,
                seed=None if body.seed is None else (body.seed + choice) % (2**63),
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                stop=list(body.stop or []) + (stop or []),
                include_stop_str_in_output=bool(stop),
                max_tokens=max_tokens,
                ignore_eos=body.ignore_eos,
                logprobs=logprobs,
                repetition_penalty=repetition_penalty,
                output_kind=RequestOutputKind.DELTA if streamed else RequestOutputKind.FINAL_ONLY,
                extra_args=spec.to_extra_args() if spec is not None else None,
            )
        except ValueError as exc:
            raise bad_request(str(exc).splitlines()[0][:500]) from exc

    def _backtrack(
        self,
        body: _SamplingFields,
        spec: GuidanceSpec,
        index: int,
        max_tokens: int,
        redirect_prompt_ids: list[int],
        request_text: str,
    ) -> BacktrackJob:
        """How this choice is regenerated if guidance ends its draft (``server.backtrack``)."""
        regime = self.regime

        def retry(limit: int, number: int) -> Any:
            # After a loop: the safety mask and guard only (the preference term can push the base into loops).
            prefs = None if spec.safety_mask else spec.prefs
            attempt = spec.with_request(
                attempt_id(spec.request_id, number), prefs, regime.retry_response_threshold
            )
            seed_index = index + 1000 * number
            penalty = regime.repetition_penalty + 0.2 * (number - 1)
            return self._params(body, limit, None, seed_index, attempt, True, penalty)

        def redirect(limit: int, number: int) -> Any:
            rid = attempt_id(spec.request_id, number)
            attempt = spec.for_redirect(rid, regime.prefs or spec.prefs, regime.mask_margin)
            seed_index = index + 1000 * number
            # One sentence after the opening: short redirects stay on topic and rarely drift.
            sentence_end = [".", "!", "?"]
            return self._params(
                body, limit, None, seed_index, attempt, True, regime.redirect_repetition_penalty, sentence_end
            )

        return BacktrackJob(
            regime=regime,
            redirect_prompt_ids=redirect_prompt_ids,
            opening_ids=self._ids(regime.opening),
            bridge_ids=self._ids(regime.bridge),
            retry_params=retry,
            redirect_params=redirect,
            decode=self._decode,
            crisis=shows_self_harm(request_text),
            max_tokens=max_tokens,
            eos_token_id=self._eos,
        )

    def _jobs(
        self,
        body: _SamplingFields,
        prompts: list[list[int]],
        max_tokens: list[int],
        logprobs: int | None,
        redirect_prompts: list[list[int]] | None = None,
        request_texts: list[str] | None = None,
        chat: bool = True,
    ) -> tuple[list[ChoiceJob], dict[str, GuidanceSpec | None]]:
        """``chat=False`` (text completions): no coherence guard, since a raw continuation may rightly repeat
        (counting, lists, code)."""
        prefs, threshold, response_threshold = self.policy.resolve(
            body.prosocial_prefs,
            body.prosocial_guidance,
            body.prosocial_safety_threshold,
            body.prosocial_response_threshold,
        )
        base_id = uuid.uuid4().hex
        jobs, specs = [], {}
        for p, prompt_ids in enumerate(prompts):
            for k in range(body.n):
                index = p * body.n + k
                request_id = f"{base_id}-{index}"
                spec = self.policy.spec(request_id, prefs, threshold, response_threshold)
                if spec is not None and not chat:
                    spec = replace(spec, coherence_guard=False)
                params = self._params(body, max_tokens[p], logprobs, index, spec)
                guided = spec is not None and spec.needs_arm
                hold = spec.hold_tokens if guided else 0
                backtrack = None
                if guided and self.settings.backtrack and not body.ignore_eos:
                    redirect_ids = redirect_prompts[p] if redirect_prompts else prompt_ids
                    text = request_texts[p] if request_texts else ""
                    backtrack = self._backtrack(body, spec, index, max_tokens[p], redirect_ids, text)
                jobs.append(ChoiceJob(index, request_id, prompt_ids, params, guided, hold, backtrack))
                specs[request_id] = spec
        return jobs, specs

    # --- endpoints -----------------------------------------------------------------------------------------
    def chat(self, body: ChatCompletionRequest) -> Plan:
        self._check_common(body)
        prompt_ids = self.chat_prompt_ids(body)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(body.requested_max_tokens(), len(prompt_ids), param)
        top = body.top_logprobs or 0
        messages = self._messages(body)
        redirect_ids = (
            self._render(self._redirect_messages(messages)) if self.settings.backtrack else prompt_ids
        )
        user_text = " ".join(m["content"] for m in messages if m["role"] == "user")
        jobs, specs = self._jobs(
            body, [prompt_ids], [max_tokens], top if body.logprobs else None, [redirect_ids], [user_text]
        )
        return Plan(jobs, len(prompt_ids), body.logprobs, top, specs)

    def completion(self, body: CompletionRequest) -> Plan:
        self._check_common(body)
        prompts = [self.text_prompt_ids(p) for p in body.prompts()]
        if len(prompts) * body.n > self.settings.max_n * 4:
            raise bad_request("too many prompts x n in one request", "prompt")
        max_tokens = [self._max_tokens(body.max_tokens, len(ids), "max_tokens") for ids in prompts]
        jobs, specs = self._jobs(
            body, prompts, max_tokens, body.logprobs, None, list(body.prompts()), chat=False
        )
        top = body.logprobs or 0
        return Plan(jobs, sum(len(p) for p in prompts), body.logprobs is not None, top, specs)


# --- rendering engine outputs --------------------------------------------------------------------------------


def finish_reason(choice: Any) -> str | None:
    """OpenAI finish_reason for a finished choice ("content_filter" when the safety mask ended it)."""
    if getattr(choice, "content_filtered", False):
        return "content_filter"
    reason = choice.finish_reason
    if reason in ("stop", "length"):
        return reason
    return "stop" if reason is not None else None


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[dict], token_ids: list[int], top: int) -> ChoiceLogprobs:
    """vLLM per-token {token_id: Logprob} dicts -> OpenAI chat logprobs (sampled token + its top alternatives)."""
    content = []
    for entry, token_id in zip(entries, token_ids, strict=False):
        ranked = sorted(entry.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)
        sampled = entry[token_id]
        alternatives = [lp for lp in ranked if lp.rank is not None and lp.rank <= top][:top]
        token = sampled.decoded_token or ""
        content.append(
            TokenLogprob(
                token=token,
                logprob=max(sampled.logprob, -9999.0),
                bytes=_token_bytes(token),
                top_logprobs=[
                    TopLogprob(
                        token=lp.decoded_token or "",
                        logprob=max(lp.logprob, -9999.0),
                        bytes=_token_bytes(lp.decoded_token or ""),
                    )
                    for lp in alternatives
                ],
            )
        )
    return ChoiceLogprobs(content=content)


def completion_logprobs(entries: list[dict], token_ids: list[int], top: int) -> CompletionLogprobs:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = 0
    for entry, token_id in zip(entries, token_ids, strict=False):
        sampled = entry[token_id]
        token = sampled.decoded_token or ""
        tokens.append(token)
        token_logprobs.append(max(sampled.logprob, -9999.0))
        ranked = sorted(
            (lp for lp in entry.values() if lp.rank is not None and lp.rank <= top), key=lambda lp: lp.rank
        )
        tops.append({(lp.decoded_token or ""): max(lp.logprob, -9999.0) for lp in ranked})
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=token_logprobs, top_logprobs=tops, text_offset=offsets
    )
