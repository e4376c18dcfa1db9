"""Predict requests of the priority lane: an uploaded image and a question, answered with
findings and boxes in pixels of the upload (REST API POST /predict).

    DICOM     the same preprocessing as received studies; its first image; the template
              question of its modality when none is asked
    PNG/JPEG  as RGB, padded to a square like a radiograph; at most MAX_UPLOAD_PIXELS
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from inference.conversation import question_language
from inference.engine import GenerationRequest, GenerationResult, GenerationSettings
from inference.interactive_items import (
    LaneItem,
    PredictPlan,
    RequestRefused,
    clean_text,
    disclaimer,
)
from inference.parsing import parse_report
from inference.preprocess import (
    PreprocessError,
    SquareGeometry,
    attach_regions,
    pad_to_square,
    prepare_study,
)
from inference.prompts import PromptLibrary
from storage.db import Database
from storage.interactive import Box, ClaimedRequest, ErrorCode, PredictResult, complete
from storage.report_schema import ModelIdentity

MAX_UPLOAD_PIXELS = 100_000_000  # larger PNG/JPEG uploads are refused (decompression bombs)

Timings = Callable[[LaneItem, GenerationResult | None], dict[str, float]]


class PredictAnswers:
    """Prepares predict requests for the engine and stores their answers."""

    def __init__(
        self,
        db: Database,
        data_dir: Path,
        prompts: PromptLibrary,
        language: str,
        timings: Timings,
    ) -> None:
        self.db = db
        self.data_dir = data_dir
        self.prompts = prompts
        self.language = language  # [model] language: the default of questions and answers
        self._timings = timings

    def prepare(self, request: ClaimedRequest, max_new_tokens: int) -> LaneItem:
        payload = request.payload
        path = self.data_dir / str(payload.get("upload_path", ""))
        kind = str(payload.get("upload_kind"))
        asked = payload.get("language")
        default = asked if asked in ("en", "zh") else self.language
        if kind == "dicom":
            images, geometries, default_question = self._dicom_upload(path, default)
        else:
            images, geometries = self._picture_upload(path)
            default_question = self.prompts.question("OT", "", "", default)
        question = str(payload.get("question") or "").strip() or default_question
        generation = GenerationRequest(
            images=images,
            prompt=question,
            settings=GenerationSettings(max_new_tokens=max_new_tokens),
        )
        image_info = {"kind": kind, "width": geometries[0].columns, "height": geometries[0].rows}
        # An asked language wins; else the question's (Chinese characters: zh), else [model]'s.
        language = default if asked in ("en", "zh") else question_language(question, default)
        return LaneItem(request, generation, PredictPlan(images, geometries, language, image_info))

    def finish(
        self,
        item: LaneItem,
        plan: PredictPlan,
        result: GenerationResult | None,
        identity: ModelIdentity,
    ) -> None:
        assert result is not None
        parsed = parse_report(result.text, plan.language, image_count=len(plan.images)).content
        content = attach_regions(parsed, plan.geometries)
        boxes = [
            Box(
                label=finding.label,
                box=[finding.region.x0, finding.region.y0, finding.region.x1, finding.region.y1],
                image_sop_uid=finding.region.sop_instance_uid or None,
            )
            for finding in content.findings
            if finding.region is not None
        ]
        predict = PredictResult(
            answer=content.narrative or content.impression or clean_text(result.text),
            findings=content.findings,
            boxes=boxes,
            image=plan.image_info,
            parse_status=content.parse_status.value,
            model=identity,
            disclaimer=disclaimer(identity.is_test_model, follow_up=False),
            timings=self._timings(item, result),
        )
        complete(self.db, item.claimed.id, predict.model_dump(mode="json"))

    def _dicom_upload(
        self, path: Path, language: str
    ) -> tuple[list[Image.Image], list[SquareGeometry], str]:
        """Same preprocessing as a received study; its first image; its template question."""
        try:
            prepared = prepare_study([path])
        except PreprocessError as exc:
            raise RequestRefused(
                f"the DICOM file cannot be used: {exc}", ErrorCode.INVALID_INPUT
            ) from exc
        question = self.prompts.question(prepared.modality, prepared.body_part, "", language)
        return prepared.images[:1], prepared.geometries[:1], question

    def _picture_upload(self, path: Path) -> tuple[list[Image.Image], list[SquareGeometry]]:
        """A PNG/JPEG as RGB, padded to a square like a radiograph (preprocess.pad_to_square)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(path.read_bytes())) as opened:
                    if opened.width * opened.height > MAX_UPLOAD_PIXELS:
                        raise RequestRefused(
                            f"the image has more than {MAX_UPLOAD_PIXELS} pixels",
                            ErrorCode.INVALID_INPUT,
                        )
                    pixels = np.asarray(opened.convert("RGB"))
        except (
            OSError,
            ValueError,
            UnidentifiedImageError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as exc:
            raise RequestRefused(
                f"the upload is not a readable PNG or JPEG image ({type(exc).__name__})",
                ErrorCode.INVALID_INPUT,
            ) from exc
        geometry = SquareGeometry.for_image("", pixels.shape[0], pixels.shape[1])
        return [pad_to_square(pixels, geometry)], [geometry]
