"""API-side guidance policy: turn a request's ``prosocial_*`` fields and the operator's settings into the
per-request ``GuidanceSpec`` (``server.guided.spec``) the logits processor reads from ``SamplingParams``.

The operator's safety settings are a floor: a request can make the threshold stricter, never looser, and no
request field can switch the mask off.
"""

from __future__ import annotations

from server.errors import bad_request
from server.guided.config import default_response_guard, default_safety_threshold
from server.guided.spec import GuidanceSpec
from server.protocol import ProsocialPrefs
from server.settings import ServerSettings


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
