"""What the SR and GSPS builders share: node identity, derived UIDs, geometry, texts, files.

UIDs (PS3.5 Chapter 9) are derived, not random: the same report built twice yields the same
SOP Instance UIDs, so a re-sent object is the same object (README, "Exactly one result per
study version downstream"). Each UID is ``generate_uid(prefix, entropy_srcs=[key])`` with keys:

    series of the SRs of a study        medgemma-node:{study_uid}:sr-series
    series of the GSPS of a study       medgemma-node:{study_uid}:pr-series
    series of the PDFs of a study       medgemma-node:{study_uid}:doc-series
      (test-model output: sr-series-test, pr-series-test, doc-series-test, as its Series
      Description differs)
    SR of a report                      medgemma-node:{study_uid}:{report_id}:sr
    GSPS of a report and source image   medgemma-node:{study_uid}:{report_id}:gsps:{image_uid}
    Encapsulated PDF of a report        medgemma-node:{study_uid}:{report_id}:pdf
    tracking UID of finding n           medgemma-node:{study_uid}:{report_id}:finding:{n}
    device observer UID                 medgemma-node:device:{node name}
with the installation id (storage.installation) after "medgemma-node:" when the node has one.
Without a UID root the UID is ``2.25.<uuid5(key) as integer>`` (PS3.5 B.2).
"""

from __future__ import annotations

import io
import math
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from dicom_node.vr_limits import fitted_copy, free_text
from storage.files import write_durably
from storage.report_schema import (
    AI_DISCLAIMER,
    TEST_MODEL_BANNER,
    ModelIdentity,
    PixelRegion,
    ReportDocument,
)

SR_SERIES_NUMBER = 9901
GSPS_SERIES_NUMBER = 9902
PDF_SERIES_NUMBER = 9903
SR_SERIES_DESCRIPTION = "AI report — not verified"
GSPS_SERIES_DESCRIPTION = "AI overlay — not verified"
PDF_SERIES_DESCRIPTION = "AI PDF — not verified"  # ≤ 64 bytes with the test prefix
UTF8 = "ISO_IR 192"  # Specific Character Set (0008,0005): Unicode in UTF-8, PS3.3 C.12.1.1.2

_MAX_LO = 64
_PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RG", "XA", "RF"})
_UID_KEY_PREFIX = "medgemma-node"


def _software_version() -> str:
    try:
        return metadata.version("medgemma-node")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class NodeIdentity:
    """The node as equipment (PS3.3 C.7.5.1) and as device observer (PS3.16 TID 1004).

    ``uid_prefix`` is the organisation's UID root ending in "." (None: the ``2.25.`` UUID form,
    PS3.5 B.2). ``installation_id`` (storage.installation) is part of every derived UID, so two
    installations reporting the same study never mint the same UID.
    """

    name: str = "medgemma-node"
    manufacturer: str = "medgemma-node"
    model_name: str = "medgemma-node"
    software_version: str = _software_version()
    serial_number: str | None = None
    institution_name: str | None = None
    uid_prefix: str | None = None
    installation_id: str | None = None

    @property
    def device_uid(self) -> str:
        return derived_uid(self, "device", self.name)

    def fitted(self) -> NodeIdentity:
        """This identity with its General Equipment values (LO, PS3.3 C.7.5.1) within 64
        characters, as settings may be longer."""
        return replace(
            self,
            manufacturer=long_string(self.manufacturer),
            model_name=long_string(self.model_name),
            software_version=long_string(self.software_version),
            serial_number=_optional_long_string(self.serial_number),
            institution_name=_optional_long_string(self.institution_name),
        )


def _optional_long_string(text: str | None) -> str | None:
    return None if text is None else long_string(text) or None


def derived_uid(node: NodeIdentity, *parts: object) -> str:
    """A UID that depends only on ``parts``, the installation id and the node's UID root.

    Without a root: ``2.25.`` and the integer of a name-based UUID (RFC 9562 v5), PS3.5 B.2.
    """
    installation = [] if node.installation_id is None else [node.installation_id]
    key = ":".join([_UID_KEY_PREFIX, *installation, *(str(part) for part in parts)])
    if node.uid_prefix is None:
        return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, key).int}"
    return str(generate_uid(prefix=node.uid_prefix, entropy_srcs=[key]))


def _series_kind(kind: str, report: ReportDocument) -> str:
    # Test-model output goes to its own series: its Series Description differs.
    return f"{kind}-series-test" if report.model.is_test_model else f"{kind}-series"


def sr_series_uid(node: NodeIdentity, report: ReportDocument) -> str:
    return derived_uid(node, report.study_instance_uid, _series_kind("sr", report))


def gsps_series_uid(node: NodeIdentity, report: ReportDocument) -> str:
    return derived_uid(node, report.study_instance_uid, _series_kind("pr", report))


def pdf_series_uid(node: NodeIdentity, report: ReportDocument) -> str:
    return derived_uid(node, report.study_instance_uid, _series_kind("doc", report))


def sr_instance_uid(node: NodeIdentity, report: ReportDocument) -> str:
    return derived_uid(node, report.study_instance_uid, report.report_id, "sr")


def gsps_instance_uid(node: NodeIdentity, report: ReportDocument, image_uid: str) -> str:
    return derived_uid(node, report.study_instance_uid, report.report_id, "gsps", image_uid)


def pdf_instance_uid(node: NodeIdentity, report: ReportDocument) -> str:
    return derived_uid(node, report.study_instance_uid, report.report_id, "pdf")


def tracking_uid(node: NodeIdentity, report: ReportDocument, finding_number: int) -> str:
    return derived_uid(node, report.study_instance_uid, report.report_id, "finding", finding_number)


# --- texts ---------------------------------------------------------------------------------


def single_line(text: str, limit: int) -> str:
    """``text`` fit for a one-line value (LO, SH): no backslash, single spaces, ≤ ``limit``."""
    return " ".join(free_text(text).replace("\\", "/").split())[:limit]


def long_string(text: str) -> str:
    """``text`` made a valid LO value (PS3.5 6.2: ≤ 64 characters)."""
    return single_line(text, _MAX_LO)


def warning_texts(model: ModelIdentity) -> list[str]:
    """What every output must say about itself: test banner (if any), then the disclaimer."""
    return ([TEST_MODEL_BANNER] if model.is_test_model else []) + [AI_DISCLAIMER]


def series_description(base: str, model: ModelIdentity) -> str:
    prefix = f"{TEST_MODEL_BANNER}: " if model.is_test_model else ""
    return long_string(prefix + base)


def model_parameters(model: ModelIdentity) -> list[str]:
    """TID 4019 "Algorithm Parameters": how the model ran."""
    parameters = [
        f"dtype={model.dtype}",
        f"quantization={model.quantization}",
        f"device={model.device}",
    ]
    parameters += [f"{name}={version}" for name, version in sorted(model.library_versions.items())]
    return parameters


def model_description(model: ModelIdentity) -> str:
    return f"{model.display_name}; " + ", ".join(model_parameters(model)[:3])


# --- sources -------------------------------------------------------------------------------


class SourceImages:
    """The source images of a report, by SOP Instance UID, current study first.

    Each image is a ``vr_limits.fitted_copy`` of its source's header (every value within its
    VR, the type 2 Patient and Study attributes present) whose Patient's Name is empty:
    highdicom warns and logs with the name it is given (``check_person_name``), which would
    put patient data in the logs, so the builders set the name on the finished object
    (``set_patient_name``). ``source_of`` gives the source itself, for its pixels.
    """

    def __init__(self, sources: Sequence[Dataset], study_uid: str) -> None:
        if not sources:
            raise ValueError("at least one source image is needed")
        fitted = [fitted_copy(ds) for ds in sources]
        self._sources = {str(ds.SOPInstanceUID): ds for ds in sources}
        current = [ds for ds in fitted if ds.StudyInstanceUID == study_uid]
        if not current:
            raise ValueError(f"no source image belongs to study {study_uid}")
        others = [ds for ds in fitted if ds.StudyInstanceUID != study_uid]
        self.ordered: list[Dataset] = current + others
        self._by_uid = {str(ds.SOPInstanceUID): ds for ds in self.ordered}
        self._patient_names = {uid: ds.PatientName for uid, ds in self._by_uid.items()}
        for ds in self.ordered:
            ds.PatientName = None

    def source_of(self, image: Dataset) -> Dataset:
        """The source ``image`` was fitted from (with its pixel data)."""
        return self._sources[str(image.SOPInstanceUID)]

    def set_patient_name(self, output: Dataset, image: Dataset) -> None:
        """Patient's Name of ``output``: that of ``image``, within its VR."""
        output.PatientName = self._patient_names[str(image.SOPInstanceUID)]

    @property
    def primary(self) -> Dataset:
        """The first image of the reported study: patient/study attributes come from it."""
        return self.ordered[0]

    def image(self, sop_instance_uid: str) -> Dataset:
        try:
            return self._by_uid[sop_instance_uid]
        except KeyError:
            raise ValueError(
                f"region refers to image {sop_instance_uid}, which is not among the sources"
            ) from None


def pixel_spacing_mm(image: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm, or None when absent or not positive.

    Projection radiography (PS3.3 C.8.11.4, 10.7.1.3) uses Imager Pixel Spacing, falling back to
    Pixel Spacing; other modalities use Pixel Spacing.
    """
    modality = str(image.get("Modality", "")).upper()
    keywords = (
        ("ImagerPixelSpacing", "PixelSpacing")
        if modality in _PROJECTION_MODALITIES
        else ("PixelSpacing",)
    )
    for keyword in keywords:
        spacing = _positive_pair(image.get(keyword))
        if spacing is not None:
            return spacing
    return None


def _positive_pair(value: object) -> tuple[float, float] | None:
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        row, column = (float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if all(math.isfinite(v) and v > 0 for v in (row, column)):
        return row, column
    return None


@dataclass(frozen=True)
class PixelBox:
    """A box on an image in pixel coordinates (column x, row y), inside the image."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def closed_polyline(self) -> np.ndarray:
        """Five (column, row) points, clockwise from the top-left corner, last == first."""
        return np.array(
            [
                [self.x0, self.y0],
                [self.x1, self.y0],
                [self.x1, self.y1],
                [self.x0, self.y1],
                [self.x0, self.y0],
            ],
            dtype=np.float64,
        )


def pixel_box(region: PixelRegion, image: Dataset) -> PixelBox:
    """The region with ordered corners, clamped to the image (0..Columns, 0..Rows)."""
    columns, rows = float(image.Columns), float(image.Rows)
    xs = sorted(min(max(v, 0.0), columns) for v in (region.x0, region.x1))
    ys = sorted(min(max(v, 0.0), rows) for v in (region.y0, region.y1))
    return PixelBox(xs[0], ys[0], xs[1], ys[1])


# --- dates and times -----------------------------------------------------------------------


def _utc_offset(value: str) -> timezone | None:
    match = re.fullmatch(r"([+-])(\d{2})(\d{2})", value.strip())
    if match is None:
        return None
    sign = -1 if match.group(1) == "-" else 1
    return timezone(sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3))))


def content_datetime(created_at: datetime, source: Dataset) -> tuple[datetime, str | None]:
    """The report time in the source's time zone, and the offset to record (PS3.3 C.12.1.1.8).

    Naive times are taken as they are. Aware times go to the source's Timezone Offset From UTC
    when it has one (then recorded too), else to the node's local time.
    """
    if created_at.tzinfo is None:
        return created_at, None
    offset_text = str(source.get("TimezoneOffsetFromUTC", "") or "")
    offset = _utc_offset(offset_text)
    if offset is None:
        return created_at.astimezone().replace(tzinfo=None), None
    return created_at.astimezone(offset).replace(tzinfo=None), offset_text


def pin_creation_times(dataset: Dataset, when: datetime) -> None:
    """Replace "now" stamps added by highdicom with the report time, so rebuilds are equal."""
    dataset.InstanceCreationDate = DA(when.date())
    dataset.InstanceCreationTime = TM(when.time())
    if "PresentationCreationDate" in dataset:
        dataset.PresentationCreationDate = DA(when.date())
        dataset.PresentationCreationTime = TM(when.time())
    for item in dataset.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(when)


# --- files ---------------------------------------------------------------------------------

_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
_ENCAPSULATED_PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"


class OutputRecord(NamedTuple):
    """One written object: kind ("SR", "GSPS", "PDF" or the modality), its UIDs and where."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: Path


def object_kind(dataset: Dataset) -> str:
    sop_class = str(dataset.SOPClassUID)
    if sop_class.startswith(_SR_CLASS_PREFIX):
        return "SR"
    if sop_class == _GSPS_CLASS:
        return "GSPS"
    if sop_class == _ENCAPSULATED_PDF_CLASS:
        return "PDF"
    return str(dataset.get("Modality", "OT"))


def write_datasets(datasets: Iterable[Dataset], directory: Path) -> list[OutputRecord]:
    """Write each dataset as a PS3.10 file ``{kind}-{SOP Instance UID}.dcm`` in ``directory``.

    Each file is written to a temporary name, fsynced and renamed into place, so a reader
    never sees half a file; writing the same object again replaces it with identical content.
    """
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for dataset in datasets:
        kind = object_kind(dataset)
        uid = str(dataset.SOPInstanceUID)
        path = directory / f"{kind.lower()}-{uid}.dcm"
        write_durably(path, encode_file(dataset))
        records.append(OutputRecord(kind, str(dataset.SOPClassUID), uid, path))
    return records


def encode_file(dataset: Dataset) -> bytes:
    """The PS3.10 file (preamble, meta group, data set) as bytes."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
