"""The model seam: one method, a real implementation and a scripted one.

    Engine.generate(requests) -> results, one per request, same order.

Implementations:
    inference.transformers_engine.TransformersEngine  real MedGemma / tiny demo model
    inference.scripted_engine.ScriptedEngine           returns given texts (tests only)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from storage.report_schema import ModelIdentity


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy decoding is the only mode the node uses (model card: deterministic answers)."""

    max_new_tokens: int = 1024


@dataclass
class GenerationRequest:
    """One user turn: images first, then the question (MedGemma chat template, no system role)."""

    images: list[Image.Image]
    prompt: str
    settings: GenerationSettings = field(default_factory=GenerationSettings)


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float  # wall time of the whole batch this request was part of
    batch_size: int = 1


class OutOfMemory(RuntimeError):
    """The device ran out of memory for this batch; the worker halves the batch and retries."""


class Engine(Protocol):
    identity: ModelIdentity

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run one batch. Raises OutOfMemory when the batch does not fit."""
        ...
