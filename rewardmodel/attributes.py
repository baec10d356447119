"""Attribute names shared by the server, the reward model and the evaluation harness.

Kept free of heavy imports: the API process validates requests against these names.
"""

PROSOCIAL_ATTRIBUTES: tuple[str, ...] = (
    "empathy",
    "sensitivity",
    "non_judgmental",
    "truthfulness",
    "helpfulness",
)
"""The five objectives a request trades off with its ``prosocial_prefs`` vector."""

SAFETY_ATTRIBUTE = "safety"
"""Harmlessness: a hard constraint applied first, never traded off."""

ALL_ATTRIBUTES: tuple[str, ...] = PROSOCIAL_ATTRIBUTES + (SAFETY_ATTRIBUTE,)
