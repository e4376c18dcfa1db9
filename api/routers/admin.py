"""Admin: the job queue and the outbox; retry what failed (the same actions as the CLI)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, status

from api.deps import Admin, Context, audit_study
from api.routers.studies import delivery_out, job_out
from api.schemas import DeliveryOut, JobPage, RetryDeadResult, RetryResult
from storage import outbox
from storage.doorbell import DELIVERY_DOORBELL, WORKER_DOORBELL, ring
from storage.jobs import list_jobs, retry_job
from storage.models import JobStatus, OutboxStatus

router = APIRouter(prefix="/api", tags=["admin"])

ItemId = Annotated[int, Path(ge=1)]


@router.get("/jobs", response_model=JobPage, summary="Jobs, newest first")
def jobs(
    context: Context,
    _user: Admin,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobPage:
    rows, total = list_jobs(context.db, status_, limit, offset)
    items = [job_out(r.job, r.study_instance_uid, r.version_number) for r in rows]
    return JobPage(items=items, total=total, limit=limit, offset=offset)


@router.post(
    "/jobs/{job_id}/retry",
    response_model=RetryResult,
    summary="Queue a failed (or waiting) job again, due now, attempts reset",
    responses={404: {"description": "No such job"}, 409: {"description": "Running or done"}},
)
def retry_job_endpoint(
    request: Request, context: Context, user: Admin, job_id: ItemId
) -> RetryResult:
    found = retry_job(context.db, job_id, actor=user.name)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    before, study_uid = found
    audit_study(request, study_uid, job_id=job_id)
    if before not in (JobStatus.FAILED, JobStatus.QUEUED, JobStatus.CANCELLED):
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is {before}; left as it is")
    ring(context.data_dir, WORKER_DOORBELL)
    return RetryResult(id=job_id, previous_status=before, status=JobStatus.QUEUED)


@router.get("/outbox", response_model=list[DeliveryOut], summary="Deliveries, newest first")
def outbox_list(
    context: Context,
    _user: Admin,
    status_: Annotated[OutboxStatus | None, Query(alias="status")] = None,
    destination: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[DeliveryOut]:
    items = outbox.list_items(context.db, status_, destination, limit)
    return [delivery_out(item) for item in items]


@router.post(
    "/outbox/{item_id}/retry",
    response_model=RetryResult,
    summary="Make a dead or pending delivery due now, attempts reset",
    responses={404: {"description": "No such row"}, 409: {"description": "Already sent"}},
)
def retry_delivery(
    request: Request, context: Context, _user: Admin, item_id: ItemId
) -> RetryResult:
    audit_study(request, None, outbox_id=item_id)
    before = outbox.retry_item(context.db, item_id)
    if before is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no outbox row {item_id}")
    if before == OutboxStatus.SENT:
        raise HTTPException(status.HTTP_409_CONFLICT, f"outbox row {item_id} was already sent")
    ring(context.data_dir, DELIVERY_DOORBELL)
    return RetryResult(id=item_id, previous_status=before, status=OutboxStatus.PENDING)


@router.post(
    "/outbox/retry-dead",
    response_model=RetryDeadResult,
    summary="Every dead delivery (of one destination) pending again",
)
def retry_dead(
    request: Request,
    context: Context,
    _user: Admin,
    destination: Annotated[str | None, Query(max_length=64)] = None,
) -> RetryDeadResult:
    count = outbox.retry_dead(context.db, destination)
    audit_study(request, None, destination=destination, count=count)
    if count:
        ring(context.data_dir, DELIVERY_DOORBELL)
    return RetryDeadResult(count=count)
