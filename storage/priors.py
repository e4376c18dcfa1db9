"""The prior store and the links from reports to the priors they were compared with.

    PriorQuery / PriorFound / PriorFinder        the seam the inference worker calls
                                                 (real one: dicom_node.priors.PacsPriorFinder)
    record_prior_instance(db, item)              an image of a prior, durable on disk
    mark_prior_requested(db, study_uid, ...)     before a C-MOVE: its images are priors
    is_requested_prior(db, study_uid)            the SCP's question for a C-MOVE's C-STORE
    stored_study_paths(db, study_uid)            a prior the node already has (either store)
    link_prior(session, report_id, comparison)   in the report's transaction
    prior_comparison(session, report_id)         read back for the outputs

Prior images live under ``<data>/priors/`` and in ``prior_studies``/``prior_instances``, never
in ``studies``/``instances``: the completion scheduler does not see them, so a prior starts no
job of its own (issue: "a prior store that does not start a job").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage import audit
from storage.db import Database
from storage.files import uid_component
from storage.models import Instance, PriorInstance, PriorLink, PriorStudy, Study, utcnow
from storage.report_schema import PriorComparison

log = logging.getLogger(__name__)

PRIORS_DIR = "priors"


@dataclass(frozen=True)
class PriorQuery:
    """The current study, as the prior search needs it (values from its first image)."""

    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    modality: str
    body_part: str
    study_date: str  # YYYYMMDD, "" when the header has none


@dataclass(frozen=True)
class PriorFound:
    """The outcome of a prior search: ``paths`` (relative to the data directory) are the
    prior's images when ``comparison.compared``; otherwise the comparison says why not."""

    comparison: PriorComparison
    paths: list[str] = field(default_factory=list)
    failed: bool = False  # the search itself failed (PACS down, slow, refused): status shows it


class PriorFinder(Protocol):
    """Finds and fetches the prior of a study; never raises and never takes longer than its
    configured limit (a failure is a PriorFound without a comparison, saying why)."""

    def find(self, query: PriorQuery) -> PriorFound: ...


@dataclass(frozen=True)
class PriorInstanceRecord:
    """One prior image already written durably at ``relpath``."""

    study_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    relpath: str
    size_bytes: int
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    study_date: str = ""
    modality: str = ""
    body_part: str = ""


def prior_relpath(study_uid: str, series_uid: str, sop_uid: str) -> Path:
    return (
        Path(PRIORS_DIR)
        / uid_component(study_uid)
        / uid_component(series_uid)
        / f"{uid_component(sop_uid)}.dcm"
    )


def _prior_study(session: Session, study_uid: str) -> PriorStudy:
    study = session.scalar(select(PriorStudy).where(PriorStudy.study_instance_uid == study_uid))
    if study is None:
        study = PriorStudy(study_instance_uid=study_uid)
        session.add(study)
        session.flush()
    return study


def mark_prior_requested(db: Database, study_uid: str, query: PriorQuery, study_date: str) -> None:
    """Note before a C-MOVE that ``study_uid``'s images, when they arrive, are priors."""
    for _attempt in range(2):  # a concurrent insert of the same study: the second finds it
        try:
            with db.session() as session:
                study = _prior_study(session, study_uid)
                study.patient_id = query.patient_id
                study.issuer_of_patient_id = query.issuer_of_patient_id
                study.study_date = study_date
                study.modality = query.modality
                study.body_part = query.body_part
                study.requested_at = utcnow()
            return
        except IntegrityError:
            continue


def is_requested_prior(db: Database, study_uid: str) -> bool:
    with db.session() as session:
        found = session.scalar(
            select(PriorStudy.id).where(
                PriorStudy.study_instance_uid == study_uid, PriorStudy.requested_at.is_not(None)
            )
        )
        return found is not None


def record_prior_instance(db: Database, item: PriorInstanceRecord) -> bool:
    """Record a prior image (and its study); False when the SOP instance is already known."""
    for _attempt in range(2):
        try:
            with db.session() as session:
                known = session.scalar(
                    select(PriorInstance.id).where(
                        PriorInstance.sop_instance_uid == item.sop_instance_uid
                    )
                )
                if known is not None:
                    return False
                study = _prior_study(session, item.study_instance_uid)
                for name in ("patient_id", "issuer_of_patient_id", "study_date", "modality"):
                    if not getattr(study, name):
                        setattr(study, name, getattr(item, name))
                study.body_part = study.body_part or item.body_part
                session.add(
                    PriorInstance(
                        prior_study_id=study.id,
                        sop_instance_uid=item.sop_instance_uid,
                        sop_class_uid=item.sop_class_uid,
                        path=item.relpath,
                        size_bytes=item.size_bytes,
                    )
                )
            return True
        except IntegrityError:
            continue
    return False


def stored_study_paths(db: Database, study_uid: str) -> list[str]:
    """Files of ``study_uid`` the node already holds: the prior store first, else a study it
    received itself (relative to the data directory; [] when it has none)."""
    with db.session() as session:
        prior = list(
            session.scalars(
                select(PriorInstance.path)
                .join(PriorStudy, PriorStudy.id == PriorInstance.prior_study_id)
                .where(PriorStudy.study_instance_uid == study_uid)
                .order_by(PriorInstance.id)
            )
        )
        if prior:
            return prior
        return list(
            session.scalars(
                select(Instance.path)
                .join(Study, Study.id == Instance.study_id)
                .where(Study.study_instance_uid == study_uid)
                .order_by(Instance.id)
            )
        )


def link_prior(session: Session, report_id: int, comparison: PriorComparison) -> None:
    """Record, with the report, what it was compared with (or why it was not)."""
    session.add(
        PriorLink(
            report_id=report_id,
            status="compared" if comparison.compared else "none",
            prior_study_instance_uid=comparison.study_instance_uid,
            detail=comparison.model_dump(mode="json"),
        )
    )


def prior_comparison(session: Session, report_id: int) -> PriorComparison | None:
    detail = session.scalar(select(PriorLink.detail).where(PriorLink.report_id == report_id))
    return None if detail is None else PriorComparison.model_validate(detail)


def prior_image_paths(session: Session, sop_instance_uids: list[str]) -> list[str]:
    """Files of the given prior images (prior store first, else received instances), in the
    order given; images the node no longer holds are left out."""
    if not sop_instance_uids:
        return []
    found: dict[str, str] = dict(
        session.execute(
            select(Instance.sop_instance_uid, Instance.path).where(
                Instance.sop_instance_uid.in_(sop_instance_uids)
            )
        ).all()
    )
    found.update(
        session.execute(
            select(PriorInstance.sop_instance_uid, PriorInstance.path).where(
                PriorInstance.sop_instance_uid.in_(sop_instance_uids)
            )
        ).all()
    )
    return [found[uid] for uid in sop_instance_uids if uid in found]


PRUNE_CHUNK = 500  # rows deleted per statement (SQLite's bound-parameter limit is far above)


def prune_prior_store(db: Database, data_dir: Path, older_than_days: float, actor: str) -> int:
    """Delete prior images fetched more than ``older_than_days`` ago (0: keep for ever): the
    prior store is a cache of PACS, and a later comparison fetches a study again. The rows go
    first, then the files (a crash between leaves files no row names, never a row without its
    file); the prior study's row stays. One ``retention.prune_priors`` audit row. Returns how
    many images were removed."""
    if older_than_days <= 0:
        return 0
    cutoff = utcnow() - timedelta(days=older_than_days)
    with db.session() as session:
        old = session.execute(
            select(PriorInstance.id, PriorInstance.path).where(PriorInstance.received_at < cutoff)
        ).all()
    if not old:
        return 0
    with db.session() as session:
        for start in range(0, len(old), PRUNE_CHUNK):
            ids = [row.id for row in old[start : start + PRUNE_CHUNK]]
            session.execute(delete(PriorInstance).where(PriorInstance.id.in_(ids)))
        session.add(
            audit.event(
                "retention.prune_priors", actor=actor, images=len(old), days=older_than_days
            )
        )
    for row in old:
        (data_dir / row.path).unlink(missing_ok=True)
    log.info("retention: %d prior images older than %g days removed", len(old), older_than_days)
    return len(old)
