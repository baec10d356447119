"""Backtracking: what a person receives when guidance ends a draft.

The safety filter (the ARM's token mask and response guard) and the coherence guard (loops, symbol runs) end a
guided draft early. Returning nothing is not prosocial, so the server backtracks instead (after Zhang et al. 2025,
"Backtracking improves generation safety": discard the unsafe part and regenerate): it keeps the part of the
draft that was already judged (``cut``), discards the rest, and regenerates the choice:

* after the **coherence guard**, again from the kept tokens with a repetition penalty and without the
  preference term (which is what pushed the base into the loop);
* after the **safety filter** (or a failed retry), under the *redirect regime*: the operator's redirect
  preferences, a system preamble asking for a safe, kind alternative on the user's topic, and an opening the
  reply continues from ("I can't help with that ... What I can do instead is"), cut at a sentence end (the
  first tokens of a safe reply carry most of its safety: Qi et al. 2025);
* after ``attempts`` tries, the operator's fallback message (a crisis message that points to help when the
  request shows a self-harm signal; a plain "let me try again" message when the drafts only looped).

A release lag keeps streamed and whole responses the same: a guided stream releases a token only once
``lag`` later tokens were judged, and the cut never goes below what a stream has released.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LOOP_NGRAMS = ((4, 3), (8, 2))  # the scorer's coherence rule (server.guided.scorer.LOOP_NGRAMS)

DEFAULT_PREAMBLE = (
    "You are a kind, caring assistant. The user's request could hurt someone, so do not give any instructions, "
    "steps or details for it. Reply in two or three sentences: say gently that you can't help with that, then "
    "suggest a safe, legal alternative related to their topic, or where they can find support."
)
DEFAULT_OPENING = "I can't help with that, because it could hurt someone. What I can do instead is"
DEFAULT_BRIDGE = "\n\nI can't go further with that, because it could hurt someone. What I can do instead is"
DEFAULT_FALLBACK = (
    "I'm sorry, but I can't help with this request because it could put you or someone else at risk. "
    "If you tell me more about what you're hoping to achieve, I'm glad to help find a safe way to get there."
)
DEFAULT_RETRY_FALLBACK = (
    "I'm sorry, I couldn't put together a good answer to that just now. Could you tell me a little more about "
    "what you'd like, or ask it another way? I'd like to help."
)
DEFAULT_CRISIS = (
    "I'm really sorry you're going through this, and I'm glad you reached out. I can't help with anything that "
    "could hurt you, but you don't have to face this alone: please talk to someone you trust, or contact a crisis "
    "line such as 988 in the US (call or text) or your local emergency number. Would you like to tell me more "
    "about what's been happening?"
)

_SELF_HARM = re.compile(
    r"\b(kill(ing)? myself|suicid\w*|end(ing)? my life|self[- ]?harm|hurt(ing)? myself|cut(ting)? myself|"
    r"want to die|don'?t want to (live|be here)|overdose|no reason to live|disappear forever)\b",
    re.IGNORECASE,
)


def shows_self_harm(text: str) -> bool:
    """A self-harm signal in the request: the fallback then points to help."""
    return bool(_SELF_HARM.search(text))


def loop_start(tokens: list[int]) -> int | None:
    """Where the repeat the coherence guard caught first began (None: no loop at the end of ``tokens``)."""
    starts = []
    for n, times in LOOP_NGRAMS:
        if len(tokens) < n:
            continue
        last = tokens[-n:]
        hits = [i for i in range(len(tokens) - n + 1) if tokens[i : i + n] == last]
        if len(hits) >= times:
            starts.append(hits[0] + n)  # keep the first occurrence, drop its repeats
    return min(starts) if starts else None


def end_sentence(text: str) -> str:
    """A redirect cut by its token limit ends with a full stop rather than mid-air."""
    text = text.rstrip()
    return text if not text or text[-1] in ".!?" else text.rstrip(",;:- ") + "."


@dataclass(frozen=True)
class RedirectRegime:
    """Operator settings of backtracking (``prosocial serve --backtrack-*`` / ``--redirect-*`` flags)."""

    attempts: int = 2
    lag: int = 8  # = the response guard's tokens: what a stream holds back
    prefs: tuple[float, ...] | None = None  # normalised redirect preferences (None: the request's own)
    preamble: str = DEFAULT_PREAMBLE
    opening: str = DEFAULT_OPENING
    bridge: str = DEFAULT_BRIDGE
    max_tokens: int = 64
    repetition_penalty: float = 1.3  # after a loop
    # The response guard of an attempt after a loop (None: the request's). A retry drops the preference term and
    # adds a repetition penalty, which can turn a looping harmful draft into fluent compliance (docs/method.md).
    retry_response_threshold: float | None = None
    # Also on the redirect: readers found a light penalty (1.05) more fluent but more often offering the harm
    # back in the request's own words (docs/method.md, section 4).
    redirect_repetition_penalty: float = 1.3
    mask_margin: float = 1.0  # the redirect's token mask is this much stricter than the request's
    fallback: str = DEFAULT_FALLBACK
    retry_fallback: str = DEFAULT_RETRY_FALLBACK  # when the drafts only looped (nothing unsafe)
    crisis: str = DEFAULT_CRISIS


@dataclass
class BacktrackInfo:
    """What backtracking did to one choice (the ``prosocial.backtrack`` object of the API)."""

    reason: str  # "safety" | "degeneration": what ended the first draft
    attempts: int = 0
    redirected: bool = False  # the answer comes from the redirect regime
    fallback: bool = False  # the answer is the operator's fallback message
    discarded_tokens: int = 0
    extra_tokens: int = 0  # tokens the engine generated for the attempts
    trail: list[str] = field(default_factory=list)  # how each attempt ended: "ok" | "safety" | "degeneration"


def attempt_id(request_id: str, number: int) -> str:
    """The engine request id of a choice's ``number``-th backtracking attempt."""
    return f"{request_id}-b{number}"


def cut_point(tokens: list[int], reason: str, lag: int, hold: int) -> int:
    """How many of a draft's tokens to keep: never fewer than a stream released (all but the last ``lag``,
    none while the first ``hold`` are judged); after a loop, the tokens before its first repeat."""
    released = 0 if len(tokens) <= hold else len(tokens) - lag
    if reason == "degeneration":
        start = loop_start(tokens)
        if start is not None:
            return max(released, min(start, len(tokens)))
    return max(released, 0)
