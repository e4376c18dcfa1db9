"""A study's prior in the inference worker ([priors]): find it, render it, and put the
model's answer back in the current study's terms.

MedGemma reads a longitudinal pair as the prior image then the current image(s) in one user
turn (design.md, "Model facts"). The request therefore carries the prior's first chosen image
(the frontal view for a chest study, ``prepare_study``) at index 0 and the current images
after it; the comparison template (config/prompts, ``comparison = true``) says so and asks for
the change of each finding. ``rebase_findings`` turns the answer's image indices back into
indices of the current study: boxes on the prior image are removed (outputs draw on the
current study only), the finding itself is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from pydicom import dcmread

from inference.preprocess import PreprocessError, prepare_study
from storage.priors import PriorFinder, PriorFound, PriorQuery
from storage.report_schema import PriorComparison, ReportContent

log = logging.getLogger(__name__)

PRIOR_IMAGES_SHOWN = 1  # one prior image, then the current study's images
PRIOR_DATE_PLACEHOLDER = "{prior_date}"


@dataclass
class PriorInput:
    """What the worker knows about a job's prior: the outcome and the images to show first."""

    comparison: PriorComparison
    images: list[Image.Image] = field(default_factory=list)

    @property
    def compared(self) -> bool:
        return self.comparison.compared and bool(self.images)


def current_query(
    paths: Sequence[Path], study_uid: str, modality: str, body_part: str
) -> PriorQuery:
    """The search key of the current study from its first readable header."""
    for path in paths:
        try:
            header = dcmread(path, stop_before_pixels=True)
        except Exception:  # an unreadable file: try the next one
            continue
        return PriorQuery(
            study_instance_uid=study_uid,
            patient_id=str(header.get("PatientID", "") or ""),
            issuer_of_patient_id=str(header.get("IssuerOfPatientID", "") or "").strip(),
            modality=str(header.get("Modality", "") or modality).strip().upper(),
            body_part=str(header.get("BodyPartExamined", "") or body_part).strip().upper(),
            study_date=str(header.get("StudyDate", "") or "").strip(),
        )
    return PriorQuery(study_uid, "", "", modality, body_part, "")


def load_prior(finder: PriorFinder, query: PriorQuery, data_dir: Path) -> PriorInput:
    """Ask ``finder`` (bounded by its own limit) and render the prior's image."""
    found: PriorFound = finder.find(query)
    comparison = found.comparison
    if not comparison.compared:
        return PriorInput(comparison)
    try:
        prepared = prepare_study([data_dir / path for path in found.paths])
    except PreprocessError as exc:
        log.warning("prior study %s cannot be rendered: %s", comparison.study_instance_uid, exc)
        return PriorInput(PriorComparison.without("not_rendered"))
    shown = prepared.sop_instance_uids[:PRIOR_IMAGES_SHOWN]
    comparison = comparison.model_copy(update={"sop_instance_uids": shown})
    return PriorInput(comparison, prepared.images[:PRIOR_IMAGES_SHOWN])


def without_prior(prior: PriorInput, code: str) -> PriorInput:
    """The study goes on without the prior found, for the reason ``code`` (PRIOR_REASONS)."""
    comparison = PriorComparison.without(code)
    return PriorInput(comparison.model_copy(update={"seconds": prior.comparison.seconds}))


def comparison_question(template_text: str, comparison: PriorComparison) -> str:
    return template_text.replace(PRIOR_DATE_PLACEHOLDER, comparison.display_date)


def rebase_findings(content: ReportContent, prior_images: int) -> tuple[ReportContent, int]:
    """Image indices of the answer -> indices of the current study; boxes on the prior image
    are removed. Returns the content and how many boxes were removed."""
    if prior_images == 0:
        return content, 0
    findings, removed = [], 0
    for finding in content.findings:
        if finding.image_index >= prior_images:
            update: dict[str, object] = {"image_index": finding.image_index - prior_images}
        else:
            removed += finding.box_2d is not None
            update = {"image_index": 0, "box_2d": None}
        findings.append(finding.model_copy(update=update))
    return content.model_copy(update={"findings": findings}), removed
