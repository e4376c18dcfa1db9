"""One follow-up question of a conversation -> the engine request, and its answer -> anchors.

What the model sees (MedGemma is a chat model: user/model turns, no system role):

    user   the study's images (as the report saw them) + the question the report answered
    model  the report, as the JSON it asked for (findings with box_2d, impression, ...)
    user   question 1          model  answer 1          ...       (earlier turns, as text)
    user   the anchors as text with their coordinates (box_2d, 0..1000 of their image), the
           question, how to point at a region; for a question about one anchor a zoomed
           crop of that region as one more image (more detail than the 896 px overview)

References: an explicit ``anchor_id``, an anchor named in the question ("A2"), or a question
that says "this", "that lesion", "上述", "这个", "该" without naming one refers to the most
recent anchor. Each box an answer gives becomes the next anchor (A{n+1}, ...), mapped back to
source-image pixels through the image it was drawn on (a study image or the crop).

Distances and sizes are never left to the model: a question asking for the distance between
two anchors ("distance between A1 and A2", "A1 到 A2 的距离") or the size of one is answered by
the node from the header's pixel spacing — the same spacing the SR uses for box sizes
(projection images: Imager Pixel Spacing, else Pixel Spacing; others: Pixel Spacing; PS3.3
10.7.1.1) — and says so when the header has none.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

from core.errors import InferenceError
from inference.engine import ChatTurn, GenerationRequest, GenerationSettings
from inference.parsing import parse_report
from inference.preprocess import (
    PreparedStudy,
    SquareGeometry,
    box_2d_to_region,
    region_to_box_2d,
)
from storage.interactive import Anchor, Measurement
from storage.report_schema import Finding, PixelRegion, ReportContent

CROP_MARGIN = 0.5  # the crop shows the anchor's box plus half its size around it
MIN_CROP_SIDE = 64  # pixels of the source image: a tiny box still gets some context
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "RF", "XA", "PX"})
BOX_SCALE = 1000.0

_ANCHOR_MENTION = re.compile(r"(?<![A-Za-z0-9])A([1-9][0-9]{0,3})(?![0-9])")
_DEICTIC = re.compile(
    r"\b(?:this|that|these|those|it|its)\b|上述|这个|这处|那个|此|它|(?<!应)该", re.IGNORECASE
)
_DISTANCE_WORDS = re.compile(r"\b(?:distance|how\s+far|apart)\b|距离|相距|多远|间距", re.IGNORECASE)
_SIZE_WORDS = re.compile(
    r"\b(?:size|extent|how\s+(?:big|large|wide|long|tall)|dimensions?|diameter|measure\w*)\b"
    r"|大小|尺寸|多大|多长|多宽|直径|范围",
    re.IGNORECASE,
)
_CJK = re.compile(r"[\u3400-\u9fff]")


class TurnError(InferenceError, ValueError):
    """The question cannot be answered as asked (e.g. an unknown anchor); ``str()`` says why."""


# --------------------------------------------------------------------------- pixel spacing


@dataclass(frozen=True)
class Spacing:
    """mm between rows and between columns, and the attribute they came from."""

    row_mm: float
    column_mm: float
    source: str  # "PixelSpacing" | "ImagerPixelSpacing"


def pixel_spacing(header: Dataset) -> Spacing | None:
    """The spacing the SR uses for sizes: projection images Imager Pixel Spacing (0018,1164),
    else Pixel Spacing (0028,0030); other images Pixel Spacing. None when absent or not > 0."""
    modality = str(header.get("Modality", "") or "").upper()
    keywords = (
        ("ImagerPixelSpacing", "PixelSpacing")
        if modality in PROJECTION_MODALITIES
        else ("PixelSpacing",)
    )
    for keyword in keywords:
        value = header.get(keyword)
        try:
            row, column = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and column > 0 and math.isfinite(row) and math.isfinite(column):
            return Spacing(row, column, keyword)
    return None


def spacings_by_sop_uid(paths: Sequence[Path]) -> dict[str, Spacing | None]:
    spacings: dict[str, Spacing | None] = {}
    for path in paths:
        try:
            header = dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # an unreadable file has no spacing to offer; preprocessing says more
            continue
        spacings[str(header.get("SOPInstanceUID", ""))] = pixel_spacing(header)
    return spacings


# --------------------------------------------------------------------------- images the model sees


@dataclass(frozen=True)
class CropGeometry:
    """A square of the source image (may reach past its edges: padded black) shown enlarged."""

    sop_instance_uid: str
    frame_number: int | None
    rows: int
    columns: int
    left: float
    top: float
    side: float

    def box_to_region(self, box_2d: Sequence[float]) -> PixelRegion | None:
        """``[y0, x0, y1, x1]`` in 0..1000 of the crop -> source pixels, clipped to the image."""
        unit = self.side / BOX_SCALE
        y0, x0, y1, x1 = (float(v) * unit for v in box_2d)
        left, top = self.left + x0, self.top + y0
        right, bottom = self.left + x1, self.top + y1
        if right <= 0 or bottom <= 0 or left >= self.columns or top >= self.rows:
            return None
        return PixelRegion(
            sop_instance_uid=self.sop_instance_uid,
            frame_number=self.frame_number,
            x0=max(left, 0.0),
            y0=max(top, 0.0),
            x1=min(right, float(self.columns)),
            y1=min(bottom, float(self.rows)),
        )


@dataclass
class StudyImages:
    """The study as the report's model run saw it, with each image's pixel spacing."""

    prepared: PreparedStudy
    spacings: dict[str, Spacing | None] = field(default_factory=dict)

    def index_of(self, sop_uid: str | None) -> int | None:
        if sop_uid in self.prepared.sop_instance_uids:
            return self.prepared.sop_instance_uids.index(sop_uid)
        return None


def crop_around(anchor: Anchor, study: StudyImages) -> tuple[Image.Image, CropGeometry] | None:
    """The anchor's box with a margin, as a square crop of its (rendered) source image."""
    index = study.index_of(anchor.image_sop_uid)
    if index is None:
        return None
    geometry = study.prepared.geometries[index]
    x0, y0, x1, y1 = anchor.box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * CROP_MARGIN)
    side = min(max(side, float(MIN_CROP_SIDE)), float(geometry.side))
    left = (x0 + x1) / 2 - side / 2
    top = (y0 + y1) / 2 - side / 2
    crop_geometry = CropGeometry(
        sop_instance_uid=geometry.sop_instance_uid,
        frame_number=geometry.frame_number,
        rows=geometry.rows,
        columns=geometry.columns,
        left=left,
        top=top,
        side=side,
    )
    # The rendered image is the padded square: source pixel (x, y) sits at (x + column offset,
    # y + row offset). PIL fills whatever lies outside the square with black.
    square = study.prepared.images[index]
    box = (
        round(left + geometry.column_offset),
        round(top + geometry.row_offset),
        round(left + geometry.column_offset + side),
        round(top + geometry.row_offset + side),
    )
    return square.crop(box), crop_geometry


ImageView = SquareGeometry | CropGeometry


def view_region(view: ImageView, box_2d: Sequence[float]) -> PixelRegion | None:
    if isinstance(view, CropGeometry):
        return view.box_to_region(box_2d)
    return box_2d_to_region(box_2d, view)


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Reference:
    """What a question points at: one anchor (crop, extent) and every anchor it names."""

    anchor: Anchor | None
    named: list[Anchor]


def resolve_reference(question: str, anchor_id: str | None, anchors: Sequence[Anchor]) -> Reference:
    """The explicit anchor_id, else the one anchor the question names, else — for "this",
    "that lesion", "上述", "这个", "该" — the most recent anchor. Raises TurnError for an
    anchor id the conversation does not have."""
    by_id = {anchor.id: anchor for anchor in anchors}
    named_ids = list(dict.fromkeys(f"A{n}" for n in _ANCHOR_MENTION.findall(question)))
    unknown = [a for a in [anchor_id, *named_ids] if a is not None and a not in by_id]
    if unknown:
        known = ", ".join(by_id) or "none yet"
        raise TurnError(f"unknown anchor {', '.join(unknown)}; this conversation has: {known}")
    named = [by_id[a] for a in named_ids]
    if anchor_id is not None:
        return Reference(by_id[anchor_id], named)
    if len(named) == 1:
        return Reference(named[0], named)
    if not named and anchors and _DEICTIC.search(question):
        return Reference(anchors[-1], named)
    return Reference(None, named)


# --------------------------------------------------------------------------- measurements


def _centre(anchor: Anchor) -> tuple[float, float]:
    x0, y0, x1, y1 = anchor.box
    return (x0 + x1) / 2, (y0 + y1) / 2


def _spacing_note(spacing: Spacing, language: str) -> str:
    if spacing.source == "ImagerPixelSpacing":
        if language == "zh":
            return "（按探测器平面的 Imager Pixel Spacing 计算，未校正几何放大）"
        return " (Imager Pixel Spacing: at the detector plane, not corrected for magnification)"
    return "（按 Pixel Spacing 计算）" if language == "zh" else " (from Pixel Spacing)"


def _no_spacing(language: str) -> str:
    if language == "zh":
        return "图像头信息中没有 Pixel Spacing 或 Imager Pixel Spacing，节点无法给出毫米值"
    return (
        "The image header has no Pixel Spacing or Imager Pixel Spacing, so the node cannot give "
        "this in mm"
    )


def measure_distance(
    first: Anchor, second: Anchor, spacing: Spacing | None, language: str
) -> Measurement:
    """Distance between the two anchors' box centres on one image."""
    ids = [first.id, second.id]
    if first.image_sop_uid != second.image_sop_uid:
        text = (
            f"{first.id} 与 {second.id} 不在同一幅图像上，节点只测量同一图像内的距离。"
            if language == "zh"
            else f"{first.id} and {second.id} are on different images; the node measures "
            "distances within one image only."
        )
        return Measurement(kind="distance", anchor_ids=ids, text=text)
    (ax, ay), (bx, by) = _centre(first), _centre(second)
    pixels = math.hypot(ax - bx, ay - by)
    if spacing is None:
        text = (
            f"{_no_spacing(language)}；{first.id} 与 {second.id} 中心相距 {pixels:.0f} 像素。"
            if language == "zh"
            else f"{_no_spacing(language)}; the centres of {first.id} and {second.id} are "
            f"{pixels:.0f} pixels apart."
        )
        return Measurement(kind="distance", anchor_ids=ids, pixels=round(pixels, 1), text=text)
    mm = math.hypot((ax - bx) * spacing.column_mm, (ay - by) * spacing.row_mm)
    text = (
        f"{first.id}（{first.label}）与 {second.id}（{second.label}）中心之间的距离为 "
        f"{mm:.1f} 毫米{_spacing_note(spacing, language)}。"
        if language == "zh"
        else f"Distance between the centres of {first.id} ({first.label}) and {second.id} "
        f"({second.label}): {mm:.1f} mm{_spacing_note(spacing, language)}."
    )
    return Measurement(
        kind="distance",
        anchor_ids=ids,
        pixels=round(pixels, 1),
        mm=round(mm, 1),
        spacing_source=spacing.source,
        text=text,
    )


def measure_extent(anchor: Anchor, spacing: Spacing | None, language: str) -> Measurement:
    """Width and height of the anchor's box."""
    x0, y0, x1, y1 = anchor.box
    width_px, height_px = x1 - x0, y1 - y0
    if spacing is None:
        text = (
            f"{_no_spacing(language)}；{anchor.id} 的框为 {width_px:.0f} × {height_px:.0f} 像素。"
            if language == "zh"
            else f"{_no_spacing(language)}; the box of {anchor.id} is {width_px:.0f} × "
            f"{height_px:.0f} pixels."
        )
        return Measurement(
            kind="extent",
            anchor_ids=[anchor.id],
            width_px=round(width_px, 1),
            height_px=round(height_px, 1),
            text=text,
        )
    width_mm, height_mm = width_px * spacing.column_mm, height_px * spacing.row_mm
    text = (
        f"{anchor.id}（{anchor.label}）的框宽 {width_mm:.1f} 毫米、高 {height_mm:.1f} 毫米"
        f"{_spacing_note(spacing, language)}。"
        if language == "zh"
        else f"{anchor.id} ({anchor.label}): its box is {width_mm:.1f} mm wide × "
        f"{height_mm:.1f} mm high{_spacing_note(spacing, language)}."
    )
    return Measurement(
        kind="extent",
        anchor_ids=[anchor.id],
        width_px=round(width_px, 1),
        height_px=round(height_px, 1),
        width_mm=round(width_mm, 1),
        height_mm=round(height_mm, 1),
        spacing_source=spacing.source,
        text=text,
    )


def requested_measurements(
    question: str,
    reference: Reference,
    anchors: Sequence[Anchor],
    study: StudyImages,
    language: str,
) -> list[Measurement]:
    """The distance or size the question asks for, measured; [] when it asks for neither.

    A distance needs two anchors: the two named, or the one named and the one referred to
    ("how far is this from A1?" measures from the most recent anchor).
    """
    involved = {a.id: a for a in [*reference.named, reference.anchor] if a is not None}
    if len(involved) == 1 and anchors and _DEICTIC.search(question):
        involved.setdefault(anchors[-1].id, anchors[-1])
    if _DISTANCE_WORDS.search(question) and len(involved) >= 2:
        first, second = list(involved.values())[:2]
        spacing = study.spacings.get(first.image_sop_uid or "")
        return [measure_distance(first, second, spacing, language)]
    if _SIZE_WORDS.search(question) and reference.anchor is not None:
        anchor = reference.anchor
        spacing = study.spacings.get(anchor.image_sop_uid or "")
        return [measure_extent(anchor, spacing, language)]
    return []


def question_language(question: str, default: str) -> str:
    """Chinese when the question has Chinese characters, English when it has none."""
    if _CJK.search(question):
        return "zh"
    return "en" if re.search(r"[A-Za-z]", question) else default


# --------------------------------------------------------------------------- the prompt


@dataclass(frozen=True)
class PastTurn:
    question: str
    model_text: str  # what the model said (thinking removed), or the node's measured answer


def report_as_model_turn(content: ReportContent) -> str:
    """The report as the JSON the templates ask for: what the model answered at first."""
    findings = []
    for finding in content.findings:
        item = finding.model_dump(exclude={"region", "box_2d"}, exclude_none=True)
        if finding.box_2d is not None:  # integers, as MedGemma writes them
            item["box_2d"] = [round(v) for v in finding.box_2d]
        findings.append(item)
    summary: dict[str, object] = {"findings": findings}
    # A comparison report's findings carry their change; "comparison" names the prior's date,
    # so a follow-up question can ask about the comparison.
    for key in ("comparison", "impression", "recommendation"):
        if value := getattr(content, key):
            summary[key] = value
    if content.urgency is not None:
        summary["urgency"] = content.urgency.value
    if content.narrative and not findings:
        summary["narrative"] = content.narrative
    return json.dumps(summary, ensure_ascii=False)


def _anchor_lines(anchors: Sequence[Anchor], study: StudyImages) -> list[str]:
    lines = []
    for anchor in anchors:
        index = study.index_of(anchor.image_sop_uid)
        if index is None:
            continue
        region = PixelRegion(
            sop_instance_uid=anchor.image_sop_uid or "",
            x0=anchor.box[0],
            y0=anchor.box[1],
            x1=anchor.box[2],
            y1=anchor.box[3],
        )
        box = [round(v) for v in region_to_box_2d(region, study.prepared.geometries[index])]
        lines.append(f"{anchor.id}: {anchor.label} — image {index}, box_2d {box}")
    return lines


_INSTRUCTIONS = {
    "en": (
        "Answer the radiologist's question briefly, in English. If your answer points at a "
        "region, add it after the text as JSON in a ```json block: "
        '[{{"box_2d": [y0, x0, y1, x1], "label": "...", "image_index": 0}}] (integers 0 to '
        "1000 of the image given by image_index, counting the images above from 0). Do not state "
        "distances or sizes in millimetres: the node measures them."
    ),
    "zh": (
        "请用中文简要回答放射科医生的问题。"
        "如果回答指向某个区域，请在文字后用 ```json 代码块给出："
        '[{{"box_2d": [y0, x0, y1, x1], "label": "...", "image_index": 0}}]'
        "（0 到 1000 的整数，按 image_index 指定的图像归一化，上面的图像从 0 开始计数）。"
        "不要给出以毫米为单位的距离或大小：这些由节点测量。"
    ),
}


def current_prompt(
    question: str,
    anchors: Sequence[Anchor],
    reference: Reference,
    study: StudyImages,
    crop_index: int | None,
    language: str,
) -> str:
    parts = []
    lines = _anchor_lines(anchors, study)
    if lines:
        header = (
            "已标记的区域（锚点），box_2d 为 [y0, x0, y1, x1]，按所在图像归一化到 0–1000："
            if language == "zh"
            else "Regions marked so far (anchors), box_2d as [y0, x0, y1, x1] from 0 to 1000 of "
            "their image:"
        )
        parts.append("\n".join([header, *lines]))
    if reference.anchor is not None:
        anchor = reference.anchor
        about = (
            f"这个问题针对 {anchor.id}（{anchor.label}）。"
            if language == "zh"
            else f"This question is about {anchor.id} ({anchor.label})."
        )
        if crop_index is not None:
            about += (
                f"最后一幅图像（image {crop_index}）是该区域的放大图。"
                if language == "zh"
                else f" The last image (image {crop_index}) is an enlarged view of that region."
            )
        parts.append(about)
    parts.append(_INSTRUCTIONS[language].format())
    parts.append(("问题：" if language == "zh" else "Question: ") + question)
    return "\n\n".join(parts)


def build_turn_request(
    *,
    question: str,
    reference: Reference,
    anchors: Sequence[Anchor],
    study: StudyImages,
    report_question: str | None,
    report_content: ReportContent | None,
    report_question_first: bool = False,
    past: Sequence[PastTurn],
    language: str,
    max_new_tokens: int,
) -> tuple[GenerationRequest, list[ImageView]]:
    """The engine request for one question, and the image each box_2d image_index means.

    The report's turn is replayed in the order its model run used (``report_question_first``:
    the template's question before the images)."""
    views: list[ImageView] = list(study.prepared.geometries)
    history: list[ChatTurn] = []
    study_images = list(study.prepared.images)
    if report_content is not None:
        history += [
            ChatTurn(
                "user",
                report_question or "Describe the image(s).",
                study_images,
                question_first=report_question_first,
            ),
            ChatTurn("model", report_as_model_turn(report_content)),
        ]
        study_images = []
    for turn in past:
        history += [
            ChatTurn("user", turn.question, study_images),
            ChatTurn("model", turn.model_text),
        ]
        study_images = []
    images = study_images
    crop_index = None
    if reference.anchor is not None and (crop := crop_around(reference.anchor, study)):
        image, geometry = crop
        images = [*images, image]
        crop_index = len(views)
        views.append(geometry)
    prompt = current_prompt(question, anchors, reference, study, crop_index, language)
    request = GenerationRequest(
        images=images,
        prompt=prompt,
        settings=GenerationSettings(max_new_tokens=max_new_tokens),
        history=history,
    )
    return request, views


# --------------------------------------------------------------------------- the answer


@dataclass
class TurnAnswer:
    answer: str
    findings: list[Finding]
    new_anchors: list[Anchor]
    parse_status: str


def read_answer(
    text: str,
    language: str,
    views: Sequence[ImageView],
    study: StudyImages,
    anchors: Sequence[Anchor],
    turn_index: int,
) -> TurnAnswer:
    """The model's text -> answer prose, findings (regions in source pixels, box_2d on their
    study image) and one new anchor per box."""
    parsed = parse_report(text, language, image_count=len(views)).content
    findings: list[Finding] = []
    new_anchors: list[Anchor] = []
    next_number = len(anchors) + 1
    for finding in parsed.findings:
        region = None
        if finding.box_2d is not None:
            region = view_region(views[finding.image_index], finding.box_2d)
        if region is None:
            findings.append(finding.model_copy(update={"box_2d": None, "region": None}))
            continue
        index = study.index_of(region.sop_instance_uid)
        index = 0 if index is None else index
        box_2d = region_to_box_2d(region, study.prepared.geometries[index])
        findings.append(
            finding.model_copy(update={"box_2d": box_2d, "image_index": index, "region": region})
        )
        new_anchors.append(
            Anchor(
                id=f"A{next_number}",
                label=finding.label,
                box=[region.x0, region.y0, region.x1, region.y1],
                image_sop_uid=region.sop_instance_uid,
                frame_number=region.frame_number,
                source="answer",
                turn_index=turn_index,
            )
        )
        next_number += 1
    answer = parsed.narrative or parsed.impression
    if not answer and findings:
        answer = "; ".join(finding.label for finding in findings)
    return TurnAnswer(answer, findings, new_anchors, parsed.parse_status.value)
