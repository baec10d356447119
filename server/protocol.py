"""OpenAI-compatible request and response models, plus the ``prosocial_*`` extensions.

Requests are strict: unknown fields, NaN/infinite numbers and out-of-range values are rejected with a 400 that
names the offending parameter, so no field can slip past validation into the engine.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rewardmodel.attributes import PROSOCIAL_ATTRIBUTES

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20


class ProsocialPrefs(BaseModel):
    """Per-request preference vector over the five prosocial attributes (weights in [0, 1], not all zero).

    Omitted attributes weigh 0. The engine normalises the vector to sum 1.
    """

    model_config = _STRICT

    empathy: float = Field(0.0, ge=0.0, le=1.0)
    sensitivity: float = Field(0.0, ge=0.0, le=1.0)
    non_judgmental: float = Field(0.0, ge=0.0, le=1.0)
    truthfulness: float = Field(0.0, ge=0.0, le=1.0)
    helpfulness: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _not_all_zero(self) -> ProsocialPrefs:
        if not any(getattr(self, name) > 0 for name in PROSOCIAL_ATTRIBUTES):
            raise ValueError("prosocial_prefs must give at least one attribute a positive weight")
        return self

    def normalised(self) -> list[float]:
        weights = [getattr(self, name) for name in PROSOCIAL_ATTRIBUTES]
        total = math.fsum(weights)
        return [w / total for w in weights]


class TextContentPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


StopField = Annotated[str | list[str] | None, Field(None)]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find_lone_surrogate(value: object) -> str | None:
    """Where in a parsed JSON body a string (or key) holds a lone UTF-16 surrogate, or None.

    JSON allows escapes such as ``"\\ud800"`` that decode to strings which are not valid Unicode: the tokenizer,
    the engine's serialiser and UTF-8 responses all fail on them, so they are rejected up front. Iterative, since
    the body may be nested as deeply as the JSON parser allows.
    """
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return path or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and not _encodable(key):
                    return path or "body"
                stack.append((f"{path}.{key}" if path else str(key), child))
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), child) for i, child in enumerate(item))
    return None


class _SamplingFields(BaseModel):
    """Sampling parameters shared by both endpoints (OpenAI ranges)."""

    model_config = _STRICT

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: object) -> object:
        where = _find_lone_surrogate(data)
        if where is not None:
            raise ValueError(f"'{where[:100]}' is not valid Unicode text (it contains a lone surrogate)")
        return data

    model: str = Field(..., min_length=1, max_length=512)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=100_000, description="-1 or 0 disables top-k (vLLM extension).")
    n: int = Field(1, ge=1, le=128)
    stop: StopField = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=512)
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS (benchmarks).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    prosocial_prefs: ProsocialPrefs | None = Field(
        None,
        description=(
            "ProSocialAlign preference vector: weights in [0, 1] for empathy, sensitivity, non_judgmental, "
            "truthfulness and helpfulness (not all zero; normalised to sum 1). Absent: the operator's default."
        ),
    )
    prosocial_guidance: bool | None = Field(
        None,
        description=(
            "false: no preference steering for this request. The operator's safety mask still applies: "
            "no request field can turn it off."
        ),
    )
    prosocial_safety_threshold: float | None = Field(
        None,
        ge=-100.0,
        le=0.0,
        description="Stricter safety threshold (log-prob) for this request; lower than the operator's is rejected.",
    )
    prosocial_response_threshold: float | None = Field(
        None,
        ge=-100.0,
        le=100.0,
        description=(
            "Stricter response-guard threshold (mean safety margin of the response) for this request; lower than "
            "the operator's is rejected. Turns the guard on where the operator left it off."
        ),
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options requires stream=true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] = Field(...)
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt list must not be empty")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# --------------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class BacktrackOut(BaseModel):
    """What backtracking did to a choice whose first draft guidance ended (docs/method.md, backtracking)."""

    reason: Literal["safety", "degeneration"] = Field(
        description="What ended the first draft: the safety filter or the coherence guard (a loop, a symbol run)."
    )
    attempts: int = Field(description="Regeneration attempts made.")
    redirected: bool = Field(description="The answer was written under the redirect regime.")
    fallback: bool = Field(
        description="Every attempt was ended too: the answer is the operator's fallback text."
    )
    discarded_tokens: int = Field(description="Draft tokens discarded (never shown).")
    extra_tokens: int = Field(description="Tokens the engine generated for the attempts.")


class ProsocialInfo(BaseModel):
    """Transparency data: what guidance did to this choice."""

    guided: bool
    prefs: dict[str, float] | None = None
    safety_mask: bool
    safety_threshold: float | None = None
    masked_tokens: int = Field(
        0, description="Candidate tokens removed by the safety mask over the response."
    )
    response_threshold: float | None = Field(
        None, description="The response guard's threshold on the response's mean safety margin (None: off)."
    )
    content_filtered: bool = False
    withheld: bool = Field(
        False,
        description="Content filtered and its text omitted: all of it in a whole response; in a stream, the "
        "first tokens the response guard held back (text already streamed stays delivered).",
    )
    mean_rewards: dict[str, float] | None = Field(
        None,
        description=(
            "Per-attribute mean ARM reward of the emitted tokens, log pi_attribute - log pi_neutral within the "
            "candidate set (all but the last token); the safety entry is the response guard's mean margin."
        ),
    )
    degenerate: bool = Field(False, description="The coherence guard ended the first draft.")
    backtrack: BacktrackOut | None = Field(
        None, description="Set when the first draft was discarded and the choice regenerated."
    )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


FinishReason = Literal["stop", "length", "content_filter"]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None
    prosocial: ProsocialInfo | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    prosocial: ProsocialInfo | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prosocialalign"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
