"""One image and one question, the way the node answers a predict request.

    source = dicom_source(path, prompts, template_language(asked, default))  # as a study
    source = picture_source(data, "png", prompts, ...)  # PNG/JPEG: RGB, padded to a square
    request, question = predict_request(source, question, max_new_tokens)
    language = answer_language(asked, question, default)
    result = predict_result(engine_text, source, language, identity, timings)

Shared by the worker's priority lane (inference/interactive.py, ``POST /api/predict``) and the
``medgemma-node predict`` command, so both give the same answer for the same file: the same
preprocessing as received studies (PS3.4 Annex N grayscale pipeline, zero-padded square), the
question as asked (no question: the template of the image's modality), the same parsing, and
boxes mapped back to pixels of the file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import InferenceError
from inference.conversation import question_language
from inference.engine import GenerationRequest, GenerationSettings
from inference.parsing import parse_report, strip_thinking
from inference.preprocess import (
    PreprocessError,
    SquareGeometry,
    attach_regions,
    pad_to_square,
    prepare_study,
)
from inference.prompts import PromptLibrary
from storage.interactive import Box, PredictResult
from storage.report_schema import (
    AI_DISCLAIMER,
    FOLLOW_UP_DISCLAIMER,
    TEST_MODEL_BANNER,
    ModelIdentity,
)

MAX_UPLOAD_PIXELS = 100_000_000  # larger PNG/JPEG images are refused (decompression bombs)
PICTURE_MODALITY = "OT"  # PS3.3 C.7.3.1.1.1: Other; a PNG or JPEG has no header to say more


class UnusableImage(InferenceError):
    """The file is not a DICOM image, PNG or JPEG the model can be shown."""


@dataclass
class PredictSource:
    """One file ready for the engine: its first image as the model sees it."""

    images: list[Image.Image]
    geometries: list[SquareGeometry]
    image_info: dict[str, Any]  # {"kind": "dicom"|"png"|"jpeg", "width": ..., "height": ...}
    template_question: str  # the node's question for this modality, when none is asked
    template_question_first: bool = False  # that template's order (prompts.py question_first)


def dicom_source(path: Path, prompts: PromptLibrary, language: str) -> PredictSource:
    """A DICOM file: the same preprocessing as a received study; its first image."""
    try:
        prepared = prepare_study([path])
    except PreprocessError as exc:
        raise UnusableImage(f"the DICOM file cannot be used: {exc}") from exc
    geometry = prepared.geometries[0]
    template = prompts.select(prepared.modality, prepared.body_part, "", language)
    return PredictSource(
        images=prepared.images[:1],
        geometries=[geometry],
        image_info={"kind": "dicom", "width": geometry.columns, "height": geometry.rows},
        template_question=template.text,
        template_question_first=template.question_first,
    )


def picture_source(data: bytes, kind: str, prompts: PromptLibrary, language: str) -> PredictSource:
    """A PNG or JPEG as RGB, padded to a square like a radiograph (preprocess.pad_to_square)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                if opened.width * opened.height > MAX_UPLOAD_PIXELS:
                    raise UnusableImage(f"the image has more than {MAX_UPLOAD_PIXELS} pixels")
                pixels = np.asarray(opened.convert("RGB"))
    except (
        OSError,
        ValueError,
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise UnusableImage(
            f"the upload is not a readable PNG or JPEG image ({type(exc).__name__})"
        ) from exc
    geometry = SquareGeometry.for_image("", pixels.shape[0], pixels.shape[1])
    template = prompts.select(PICTURE_MODALITY, "", "", language)
    return PredictSource(
        images=[pad_to_square(pixels, geometry)],
        geometries=[geometry],
        image_info={"kind": kind, "width": geometry.columns, "height": geometry.rows},
        template_question=template.text,
        template_question_first=template.question_first,
    )


def predict_request(
    source: PredictSource, question: str, max_new_tokens: int
) -> tuple[GenerationRequest, str]:
    """The engine request and the question it asks (the template when ``question`` is empty,
    in the template's order; a question of the user's after the images)."""
    asked = question.strip() or source.template_question
    request = GenerationRequest(
        images=source.images,
        prompt=asked,
        settings=GenerationSettings(max_new_tokens=max_new_tokens),
        question_first=source.template_question_first and not question.strip(),
    )
    return request, asked


def template_language(asked: str | None, default: str) -> str:
    """The language of the template question: the one asked for, else [model] language."""
    return asked if asked in ("en", "zh") else default


def answer_language(asked: str | None, question: str, default: str) -> str:
    """How the answer is read: the language asked for wins; else the question's (Chinese
    characters: zh), else [model] language."""
    if asked in ("en", "zh"):
        return str(asked)
    return question_language(question, default)


def disclaimer(is_test_model: bool, follow_up: bool) -> str:
    parts = [TEST_MODEL_BANNER + "."] if is_test_model else []
    parts.append(AI_DISCLAIMER)
    if follow_up:
        parts.append(FOLLOW_UP_DISCLAIMER)
    return " ".join(parts)


def predict_result(
    text: str,
    source: PredictSource,
    language: str,
    identity: ModelIdentity,
    timings: dict[str, float | int],
) -> PredictResult:
    """The engine's answer parsed as a report is: findings, boxes in pixels of the file."""
    parsed = parse_report(text, language, image_count=len(source.images)).content
    content = attach_regions(parsed, source.geometries)
    boxes = [
        Box(
            label=finding.label,
            box=[finding.region.x0, finding.region.y0, finding.region.x1, finding.region.y1],
            image_sop_uid=finding.region.sop_instance_uid or None,
        )
        for finding in content.findings
        if finding.region is not None
    ]
    return PredictResult(
        answer=content.narrative or content.impression or clean_answer(text),
        findings=content.findings,
        boxes=boxes,
        image=source.image_info,
        parse_status=content.parse_status.value,
        model=identity,
        disclaimer=disclaimer(identity.is_test_model, follow_up=False),
        timings=timings,
    )


def clean_answer(text: str) -> str:
    """The model's text without a thinking block (design.md: ends with ``<unused95>``)."""
    answer, _unclosed = strip_thinking(text)
    return answer.strip()
