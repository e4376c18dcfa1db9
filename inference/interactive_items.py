"""What the priority lane (inference/interactive.py) hands between its steps: a claimed
request with its plan and engine request, the refusal of one request, and the disclaimer every
answer carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from core.errors import InferenceError
from inference.conversation import ImageView, PastTurn, Reference, StudyImages
from inference.engine import GenerationRequest
from inference.parsing import strip_thinking
from inference.preprocess import SquareGeometry
from storage.interactive import Anchor, ClaimedRequest, ErrorCode, Measurement
from storage.report_schema import (
    AI_DISCLAIMER,
    FOLLOW_UP_DISCLAIMER,
    TEST_MODEL_BANNER,
    ReportContent,
)


class RequestRefused(InferenceError):
    """This request cannot be answered as asked; ``code`` says why (storage ErrorCode)."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class PredictPlan:
    images: list[Image.Image]
    geometries: list[SquareGeometry]
    language: str
    image_info: dict[str, Any]


@dataclass
class TurnContext:
    """What answering one turn needs from the database and the study's files."""

    id: int
    turn_index: int
    anchors: list[Anchor]
    report_question: str | None
    report_content: ReportContent | None
    past: list[PastTurn]
    is_test_model: bool
    study: StudyImages


@dataclass
class TurnPlan:
    context: TurnContext
    question: str
    language: str
    reference: Reference
    measurements: list[Measurement]  # non-empty: the node answers, the model does not run
    views: list[ImageView]  # what each box_2d image_index of the answer means


@dataclass
class LaneItem:
    """One claimed request, ready to run: its engine request (None: answered by the node)."""

    claimed: ClaimedRequest
    request: GenerationRequest | None
    plan: PredictPlan | TurnPlan
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def conversation_id(self) -> int | None:
        return self.plan.context.id if isinstance(self.plan, TurnPlan) else None


def disclaimer(is_test_model: bool, follow_up: bool) -> str:
    parts = [TEST_MODEL_BANNER + "."] if is_test_model else []
    parts.append(AI_DISCLAIMER)
    if follow_up:
        parts.append(FOLLOW_UP_DISCLAIMER)
    return " ".join(parts)


def clean_text(text: str) -> str:
    answer, _unclosed = strip_thinking(text)
    return answer.strip()
