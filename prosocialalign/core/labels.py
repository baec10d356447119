"""Labelled responses: the type that harm-judge training, the safety head and evaluation exchange."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelledResponse:
    """One (prompt, response) pair with a human or strong-judge harm label."""

    prompt: str
    response: str
    harmful: bool
    source: str
    group: str = ""
