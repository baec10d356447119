"""The guidance contract between the API process and the logits processor.

The API process builds one ``GuidanceSpec`` per engine request and puts it in ``SamplingParams.extra_args`` (a
plain dict: what vLLM carries to the engine process); both processor adapters read it back with
``GuidanceSpec.from_extra_args``, which also validates it (vLLM turns the ``ValueError`` into a 400 at admission).
The field names and defaults exist only here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from rewardmodel.attributes import PROSOCIAL_ATTRIBUTES

GUIDANCE_KEY = "prosocial"
"""The ``SamplingParams.extra_args`` entry that carries a request's spec."""


@dataclass(frozen=True)
class GuidanceSpec:
    """What the processor does for one engine request."""

    request_id: str
    prefs: tuple[float, ...] | None
    """Normalised weights in PROSOCIAL_ATTRIBUTES order; None: no preference term."""
    safety_mask: bool
    safety_threshold: float
    response_threshold: float | None
    """The response guard's threshold (None: the guard is off)."""
    guard_tokens: int
    """The guard judges the response from this many tokens on; the API holds them back till then."""
    beta: float
    coherence_guard: bool = True
    """End the row on a loop or a symbol run (``server.guided.scorer``)."""

    @property
    def hold_tokens(self) -> int:
        """Tokens the API holds back until the response guard has judged them."""
        return self.guard_tokens if self.safety_mask and self.response_threshold is not None else 0

    @property
    def needs_arm(self) -> bool:
        return self.prefs is not None or self.safety_mask

    def to_extra_args(self) -> dict:
        return {GUIDANCE_KEY: asdict(self)}

    def with_request(
        self, request_id: str, prefs: tuple[float, ...] | None, response_threshold: float | None = None
    ) -> GuidanceSpec:
        """The same guidance for another engine request (a backtracking attempt), with its preferences; a
        ``response_threshold`` only makes a running guard stricter, never looser and never on where it is off."""
        threshold = self.response_threshold
        if threshold is not None and response_threshold is not None:
            threshold = max(threshold, response_threshold)
        return replace(self, request_id=request_id, prefs=prefs, response_threshold=threshold)

    def for_redirect(
        self, request_id: str, prefs: tuple[float, ...] | None, mask_margin: float
    ) -> GuidanceSpec:
        """The redirect regime: a token mask stricter by ``mask_margin``, and no response guard. The guard
        reads the request too, so after a harmful request it would end any reply; the redirect is one sentence
        after a fixed safe opening, which the stricter mask keeps safe token by token."""
        return replace(
            self,
            request_id=request_id,
            prefs=prefs,
            safety_threshold=self.safety_threshold + mask_margin,
            response_threshold=None,
        )

    def prefs_dict(self) -> dict[str, float] | None:
        if self.prefs is None:
            return None
        return {name: round(w, 6) for name, w in zip(PROSOCIAL_ATTRIBUTES, self.prefs, strict=True)}

    @classmethod
    def from_extra_args(cls, extra_args: dict | None) -> GuidanceSpec | None:
        """The spec a request carries (None: it carries none); ``ValueError`` if it is malformed."""
        raw = (extra_args or {}).get(GUIDANCE_KEY)
        if raw is None:
            return None
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            raise ValueError(f"extra_args['{GUIDANCE_KEY}'] must have exactly the fields {sorted(names)}")
        prefs = raw["prefs"]
        if prefs is not None and (
            len(prefs) != len(PROSOCIAL_ATTRIBUTES) or any(w < 0 for w in prefs) or sum(prefs) <= 0
        ):
            raise ValueError("prosocial prefs must be 5 non-negative weights with a positive sum")
        if float(raw["beta"]) <= 0:
            raise ValueError("prosocial beta must be positive")
        if int(raw["guard_tokens"]) < 1:
            raise ValueError("prosocial guard_tokens must be at least 1")
        return cls(**raw | {"prefs": tuple(prefs) if prefs is not None else None})
