"""The structured result of one model run, shared by every part of the node.

It lives in storage/ because the inference worker writes it (Report.content_json), and the
DICOM SR/GSPS builders (dicom_node/) and the HL7 ORU builder (hl7_out/) read it; none of those
may import each other (design.md, "Imports point one way").

Box conventions:
- ``box_2d`` is what MedGemma 1.5 emits: ``[y0, x0, y1, x1]`` normalised to 0..1000 of the
  square (padded) model input.
- ``region`` is the same box mapped back to pixel coordinates of the source image
  (column/row, 0-based, as DICOM PS3.3 C.18.6.1.1 SCOORD uses them), ready for SR and GSPS.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field


class Urgency(StrEnum):
    """How soon a physician should look. Triage may raise a priority, never lower it."""

    ROUTINE = "routine"
    URGENT = "urgent"
    CRITICAL = "critical"


class ParseStatus(StrEnum):
    """How the model text turned into a result."""

    OK = "ok"  # valid JSON object matching the schema
    NARRATIVE_ONLY = "narrative_only"  # no valid JSON: the text is kept as narrative
    EMPTY = "empty"  # the model produced no text


class PixelRegion(BaseModel):
    """A box on one source image, in pixel coordinates (column = x, row = y), 0-based."""

    sop_instance_uid: str
    frame_number: int | None = None
    x0: float
    y0: float
    x1: float
    y1: float


class Finding(BaseModel):
    """One finding as the chest template asks for it (config/prompts)."""

    label: str = Field(description="The finding itself, e.g. 'nodule', 'pleural effusion'.")
    location: str | None = None
    size_mm: float | None = None
    density: str | None = None
    boundary: str | None = None
    box_2d: list[float] | None = Field(
        default=None, description="[y0, x0, y1, x1], 0..1000 of the padded model input"
    )
    image_index: int = Field(default=0, description="Which image of the request the box is on")
    region: PixelRegion | None = None


class FollowUp(BaseModel):
    """One follow-up question and its answer, carried by a report appended to from a
    conversation (inference/conversation.py)."""

    question: str
    answer: str
    anchor_id: str | None = None  # the region (A1, A2, ...) the question was about
    answered_by: str = "model"  # "model", or "node" for a measurement from the pixel spacing


class ReportContent(BaseModel):
    """The parsed answer. ``findings`` empty and ``narrative`` set is a valid, normal result."""

    parse_status: ParseStatus
    language: str = "en"
    findings: list[Finding] = Field(default_factory=list)
    impression: str = ""
    recommendation: str = ""
    urgency: Urgency | None = None
    narrative: str = ""
    follow_up: list[FollowUp] = Field(default_factory=list)


class ModelIdentity(BaseModel):
    """Which model produced a result, recorded with every report (design.md, non-negotiables)."""

    model_id: str
    revision: str = "unknown"
    dtype: str = "unknown"
    quantization: str = "none"
    device: str = "cpu"
    library_versions: dict[str, str] = Field(default_factory=dict)
    is_test_model: bool = False

    @property
    def display_name(self) -> str:
        prefix = "TEST MODEL – NOT FOR CLINICAL USE: " if self.is_test_model else ""
        return f"{prefix}{self.model_id} ({self.revision})"


class ReportDocument(BaseModel):
    """Everything the output builders need besides the source DICOM files."""

    report_id: int
    study_instance_uid: str
    version_number: int
    created_at: datetime
    content: ReportContent
    model: ModelIdentity
    question: str = ""
    source_sop_instance_uids: list[str] = Field(default_factory=list)
    # The report this version replaces (a report appended to from a conversation): its SR
    # lists the previous SR as Predecessor Document, its ORU is a correction.
    supersedes_report_id: int | None = None


TEST_MODEL_BANNER = "TEST MODEL – NOT FOR CLINICAL USE"
AI_DISCLAIMER = "AI-generated, preliminary, not verified — must be reviewed by a physician."
# The model card: MedGemma was not evaluated for multi-turn use (design.md, "Model facts").
FOLLOW_UP_DISCLAIMER = (
    "Follow-up answers are preliminary AI output; the model was not evaluated for multi-turn "
    "conversations."
)


def follow_up_text(turns: Sequence[FollowUp]) -> str:
    """Follow-up questions and answers as plain text, one "Q:"/"A:" pair per turn."""
    if not turns:
        return ""
    lines = [f"Follow-up questions ({FOLLOW_UP_DISCLAIMER})"]
    for number, turn in enumerate(turns, start=1):
        about = f" [{turn.anchor_id}]" if turn.anchor_id else ""
        source = " (measured by the node)" if turn.answered_by == "node" else ""
        lines.append(f"Q{number}{about}: {turn.question}")
        lines.append(f"A{number}{source}: {turn.answer}")
    return "\n".join(lines)
