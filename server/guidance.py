"""API-side guidance policy: turn a request's ``prosocial_*`` fields and the operator's settings into the
per-request guidance spec the logits processor reads from ``SamplingParams.extra_args["prosocial"]``.

The operator's safety settings are a floor: a request can make the threshold stricter, never looser, and no
request field can switch the mask off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from rewardmodel.attributes import PROSOCIAL_ATTRIBUTES
from server.errors import bad_request
from server.guided.config import default_response_guard, default_safety_threshold
from server.protocol import ProsocialPrefs
from server.settings import ServerSettings

EXTRA_ARGS_KEY = "prosocial"


@dataclass(frozen=True)
class GuidanceSpec:
    """What the processor does for one engine request."""

    request_id: str
    prefs: (
        tuple[float, ...] | None
    )  # normalised weights in PROSOCIAL_ATTRIBUTES order; None: no preference term
    safety_mask: bool
    safety_threshold: float
    response_threshold: float | None  # the response guard (None: off)
    guard_tokens: (
        int  # the guard judges the response from this many tokens on; the API holds them back till then
    )
    beta: float
    coherence_guard: bool = True  # end the row on a loop or a symbol run (server.guided.scorer)

    @property
    def hold_tokens(self) -> int:
        """Tokens the API holds back until the response guard has judged them."""
        return self.guard_tokens if self.safety_mask and self.response_threshold is not None else 0

    @property
    def needs_arm(self) -> bool:
        return self.prefs is not None or self.safety_mask

    def to_extra_args(self) -> dict:
        return {EXTRA_ARGS_KEY: asdict(self)}

    def with_request(self, request_id: str, prefs: tuple[float, ...] | None) -> GuidanceSpec:
        """The same guidance for another engine request (a backtracking attempt), with its preferences."""
        return replace(self, request_id=request_id, prefs=prefs)

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


class GuidancePolicy:
    def __init__(self, settings: ServerSettings) -> None:
        self.enabled = settings.guidance
        self.safety_mask = settings.guidance and settings.safety_mask
        self.threshold = default_safety_threshold(settings) if settings.guidance else 0.0
        self.response_threshold, self.guard_tokens = (
            default_response_guard(settings) if settings.guidance else (None, 1)
        )
        self.beta = settings.beta
        self.coherence_guard = settings.guidance and settings.coherence_guard
        self.default_prefs = ProsocialPrefs(**settings.default_prefs) if settings.default_prefs else None

    def resolve(
        self,
        prefs: ProsocialPrefs | None,
        guidance: bool | None,
        threshold: float | None,
        response_threshold: float | None = None,
    ) -> tuple[ProsocialPrefs | None, float, float | None]:
        """Validate the request's guidance fields once per API request; returns (prefs, token threshold,
        response threshold)."""
        asked = (prefs, threshold, response_threshold)
        if not self.enabled and (any(x is not None for x in asked) or guidance):
            raise bad_request(
                "guidance is disabled on this server; prosocial_* fields cannot be honoured",
                "prosocial_prefs" if prefs is not None else "prosocial_guidance",
                "guidance_disabled",
            )
        if threshold is not None and threshold < self.threshold:
            raise bad_request(
                f"prosocial_safety_threshold may only be stricter (higher) than the server's {self.threshold}",
                "prosocial_safety_threshold",
                "safety_floor",
            )
        if response_threshold is not None and self.response_threshold is not None:
            if response_threshold < self.response_threshold:
                raise bad_request(
                    "prosocial_response_threshold may only be stricter (higher) than the server's "
                    f"{self.response_threshold}",
                    "prosocial_response_threshold",
                    "safety_floor",
                )
        if response_threshold is not None and not self.safety_mask:
            raise bad_request(
                "the safety mask is off on this server; prosocial_response_threshold cannot be honoured",
                "prosocial_response_threshold",
                "guidance_disabled",
            )
        if prefs is not None and guidance is False:
            raise bad_request(
                "prosocial_prefs conflicts with prosocial_guidance=false", "prosocial_guidance", "conflict"
            )
        chosen = None if guidance is False else (prefs or self.default_prefs)
        token = max(self.threshold, threshold) if threshold is not None else self.threshold
        response = self.response_threshold if response_threshold is None else response_threshold
        return chosen, token, response

    def spec(
        self,
        request_id: str,
        prefs: ProsocialPrefs | None,
        threshold: float,
        response_threshold: float | None,
    ) -> GuidanceSpec | None:
        if not self.enabled:
            return None
        weights = tuple(prefs.normalised()) if prefs is not None else None
        return GuidanceSpec(
            request_id,
            weights,
            self.safety_mask,
            threshold,
            response_threshold,
            self.guard_tokens,
            self.beta,
            self.coherence_guard,
        )
