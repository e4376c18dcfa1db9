"""The web console for radiologists: its page, its settings and the image geometry it needs.

    /                        the console (api/static/console/index.html); scripts and styles
                             under /console/, all served from the package (no CDN, no fonts
                             from elsewhere; the Content-Security-Policy allows only this origin)
    /console/config.json     the default language ([model] language) and the live-update
                             interval: part of the console, not of the API contract; no
                             token, since the sign-in page is shown in that language, and
                             nothing in it concerns a patient
    /api/studies/{uid}/instances/{sop}/geometry
                             rows, columns, pixel spacing and where the image lies in the
                             model's padded square: the console draws the report's boxes
                             (source pixels, PS3.3 C.18.6.1.1) on either view with them

Sizes in mm use the spacing the SR uses (dicom_node.output_common.pixel_spacing_mm): Imager
Pixel Spacing (0018,1164) first for projection radiographs, else Pixel Spacing (0028,0030).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from pydicom.dataset import Dataset
from sqlalchemy import select

from api.deps import Context, DbSession, Viewer
from api.images import MODEL_INPUT_SIDE, RenderError, read_instance
from api.routers.studies import SopUID, StudyUID
from dicom_node.output_common import pixel_spacing_mm
from inference.preprocess import SquareGeometry
from storage.models import Instance, Study

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "static" / "console"
# Everything the console loads comes from the node itself; images are blob: URLs made from
# authenticated fetches (an <img src> cannot carry the bearer token).
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' blob: data:",
        "style-src 'self'",
        "script-src 'self'",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
LIVE_INTERVAL_S = 1.5

router = APIRouter(tags=["console"])


class ConsoleConfig(BaseModel):
    language: Literal["en", "zh"] = Field(description="Default language ([model] language)")
    languages: list[str] = Field(description="Languages the console is translated into")
    live_interval_s: float = Field(description="How often /api/events looks for changes")


class ModelViewGeometry(BaseModel):
    """The padded square the model saw, resized to ``size`` (image.png without ``size``)."""

    size: int = Field(description="Side of the model view in pixels (896)")
    side: int = Field(description="Side of the padded square in source pixels")
    row_offset: int = Field(description="Padding rows above the image")
    column_offset: int = Field(description="Padding columns left of the image")


class InstanceGeometry(BaseModel):
    sop_instance_uid: str
    rows: int
    columns: int
    frames: int
    pixel_spacing_mm: list[float] | None = Field(
        description="[row spacing, column spacing] in mm; None when the header has none > 0"
    )
    spacing_source: Literal["ImagerPixelSpacing", "PixelSpacing"] | None
    model_view: ModelViewGeometry


@router.get("/", include_in_schema=False)
def console_page() -> FileResponse:
    return FileResponse(
        CONSOLE_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


@router.get("/console/config.json", response_model=ConsoleConfig, include_in_schema=False)
def console_config(context: Context) -> ConsoleConfig:
    return ConsoleConfig(
        language=context.settings.model.language,
        languages=["en", "zh"],
        live_interval_s=LIVE_INTERVAL_S,
    )


@router.get(
    "/api/studies/{study_uid}/instances/{sop_uid}/geometry",
    response_model=InstanceGeometry,
    tags=["studies"],
    summary="Rows, columns, pixel spacing, and the image's place in the model's square",
    responses={
        404: {"description": "No such study or instance, or its file is gone"},
        422: {"description": "The stored file cannot be read"},
    },
)
def instance_geometry(
    context: Context, session: DbSession, _user: Viewer, study_uid: StudyUID, sop_uid: SopUID
) -> InstanceGeometry:
    instance = session.scalar(
        select(Instance)
        .join(Study, Study.id == Instance.study_id)
        .where(Study.study_instance_uid == study_uid, Instance.sop_instance_uid == sop_uid)
    )
    if instance is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no instance {sop_uid} in this study")
    try:
        ds = read_instance(context.data_dir / instance.path)
    except FileNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except RenderError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    return geometry_of(ds, sop_uid)


def geometry_of(ds: Dataset, sop_uid: str) -> InstanceGeometry:
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows < 1 or columns < 1:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "the instance has no Rows/Columns"
        )
    square = SquareGeometry.for_image(sop_uid, rows, columns)
    spacing = pixel_spacing_mm(ds)
    return InstanceGeometry(
        sop_instance_uid=sop_uid,
        rows=rows,
        columns=columns,
        frames=int(ds.get("NumberOfFrames") or 1),
        pixel_spacing_mm=list(spacing) if spacing is not None else None,
        spacing_source=_spacing_source(ds, spacing),
        model_view=ModelViewGeometry(
            size=MODEL_INPUT_SIDE,
            side=square.side,
            row_offset=square.row_offset,
            column_offset=square.column_offset,
        ),
    )


def _spacing_source(
    ds: Dataset, spacing: tuple[float, float] | None
) -> Literal["ImagerPixelSpacing", "PixelSpacing"] | None:
    """Which attribute the spacing came from (the one whose value it is, Imager first)."""
    if spacing is None:
        return None
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        try:
            value = tuple(float(v) for v in ds.get(keyword) or ())
        except (TypeError, ValueError):
            continue
        if value == spacing:
            return keyword
    return None
