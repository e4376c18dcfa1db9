"""TID 1600 Image Library of the SR: the source images, each described by TID 1602/1603.

    CONTAINER Image Library (111028, DCM)
      CONTAINER Image Library Group (126200, DCM), one for all source images
        IMAGE Source (260753009, SCT), one per source image, current study first,
              ReferencedSOPSequence = its SOP Class and Instance UIDs
          HAS ACQ CONTEXT  TID 1602: Modality (CID 29), Image Laterality (CID 244),
                           Study Date, Study Time, Frame of Reference UID,
                           Pixel Data Rows, Pixel Data Columns
                           TID 1603 (projection radiography): Image View (CID 4010),
                           Patient Orientation Row/Column, Horizontal/Vertical Pixel Spacing

One group, because OHIF's cornerstone-dicom-sr reads only the first Image Library Group and
takes the ReferencedSOPSequence of each of its items without checking. Descriptors are written
only when the source has a value that maps to the template's context group; a source whose
Modality is not in CID 29 gets no descriptors at all (TID 1602 is optional in TID 1601, but
its Modality row is mandatory). Target Region (CID 4031) is left out: the current code for
Chest (SCT 816094009) is not yet in the context groups PixelMed's validator knows, and the
code it knows (SCT 51185008) is no longer in the standard's.

highdicom's own ImageLibrary is not used: it needs attributes many radiographs lack
(Patient Orientation, Imager Pixel Spacing) and splits images into groups by modality.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import finding_codes as fc
from dicom_node.output_common import pixel_spacing_mm

_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_ACQUISITION = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
_PIXELS = Code("{pixels}", "UCUM", "pixels")
_PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})


def image_library(images: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """The Image Library container listing ``images`` in the order given."""
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup,
        relationship_type=_CONTAINS,
        is_content_continuous=False,
    )
    group.ContentSequence = hd.sr.ContentSequence([_entry(image) for image in images])
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=_CONTAINS, is_content_continuous=False
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _entry(image: Dataset) -> hd.sr.ImageContentItem:
    """TID 1601 Image Library Entry."""
    entry = hd.sr.ImageContentItem(
        name=fc.SOURCE_IMAGE,
        referenced_sop_class_uid=str(image.SOPClassUID),
        referenced_sop_instance_uid=str(image.SOPInstanceUID),
        relationship_type=_CONTAINS,
    )
    descriptors = entry_descriptors(image)
    if descriptors:
        entry.ContentSequence = hd.sr.ContentSequence(descriptors)
    return entry


def entry_descriptors(image: Dataset) -> list[hd.sr.ContentItem]:
    """TID 1602 (+ TID 1603 for projection radiographs); [] without a coded modality."""
    modality = fc.modality_code(str(image.get("Modality", "")))
    if modality is None:
        return []
    descriptors: list[hd.sr.ContentItem | None] = [
        hd.sr.CodeContentItem(codes.DCM.Modality, modality, _ACQUISITION),
        _laterality(image),
        _date(codes.DCM.StudyDate, image.get("StudyDate")),
        _time(codes.DCM.StudyTime, image.get("StudyTime")),
        _frame_of_reference(image),
        _pixel_count(codes.DCM.PixelDataRows, image.get("Rows")),
        _pixel_count(codes.DCM.PixelDataColumns, image.get("Columns")),
    ]
    if modality.value in _PROJECTION_MODALITIES:
        descriptors += _projection_descriptors(image)
    return [item for item in descriptors if item is not None]


def _projection_descriptors(image: Dataset) -> list[hd.sr.ContentItem | None]:
    """TID 1603 Image Library Entry Descriptors for Projection Radiography."""
    view = fc.image_view_code(str(image.get("ViewPosition", "")))
    orientation = [str(value) for value in image.get("PatientOrientation") or []]
    spacing = pixel_spacing_mm(image)
    items: list[hd.sr.ContentItem | None] = [
        hd.sr.CodeContentItem(codes.DCM.ImageView, view, _ACQUISITION) if view else None
    ]
    if len(orientation) == 2 and all(orientation):
        items += [
            hd.sr.TextContentItem(codes.DCM.PatientOrientationRow, orientation[0], _ACQUISITION),
            hd.sr.TextContentItem(codes.DCM.PatientOrientationColumn, orientation[1], _ACQUISITION),
        ]
    if spacing is not None:
        row_mm, column_mm = spacing
        items += [
            _millimetres(codes.DCM.HorizontalPixelSpacing, column_mm),
            _millimetres(codes.DCM.VerticalPixelSpacing, row_mm),
        ]
    return items


def _laterality(image: Dataset) -> hd.sr.CodeContentItem | None:
    value = image.get("ImageLaterality") or image.get("Laterality") or ""
    laterality = fc.laterality_code(str(value))
    if laterality is None:
        return None
    return hd.sr.CodeContentItem(codes.DCM.ImageLaterality, laterality, _ACQUISITION)


def _date(name: Code, value: object) -> hd.sr.DateContentItem | None:
    # Values are in DA form or empty: vr_limits.fitted_copy dropped the others.
    if not value:
        return None
    return hd.sr.DateContentItem(name=name, value=str(value), relationship_type=_ACQUISITION)


def _time(name: Code, value: object) -> hd.sr.TimeContentItem | None:
    if not value:
        return None
    return hd.sr.TimeContentItem(name=name, value=str(value), relationship_type=_ACQUISITION)


def _frame_of_reference(image: Dataset) -> hd.sr.UIDRefContentItem | None:
    uid = image.get("FrameOfReferenceUID")
    if not uid:
        return None
    return hd.sr.UIDRefContentItem(
        name=codes.DCM.FrameOfReferenceUID, value=str(uid), relationship_type=_ACQUISITION
    )


def _pixel_count(name: Code, value: object) -> hd.sr.NumContentItem | None:
    if not isinstance(value, int) or value < 1:
        return None
    return hd.sr.NumContentItem(
        name=name, value=value, unit=_PIXELS, relationship_type=_ACQUISITION
    )


def _millimetres(name: Code, value: float) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        name=name, value=value, unit=codes.UCUM.Millimeter, relationship_type=_ACQUISITION
    )
