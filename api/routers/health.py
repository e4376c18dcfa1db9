"""Liveness (no token), readiness, and who the token belongs to."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from api.deps import Context, Viewer
from api.readiness import check_readiness
from api.schemas import Health, Me, Readiness

router = APIRouter(prefix="/api", tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness: the API answers (no token)")
def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Readiness: SCP listening, database reachable, model loaded",
    responses={503: {"model": Readiness, "description": "Not ready; `reasons` say why"}},
)
def ready(context: Context, _user: Viewer, response: Response) -> Readiness:
    readiness = check_readiness(context.settings, context.db)
    if not readiness.ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return readiness


@router.get("/me", response_model=Me, summary="The signed-in user and role")
def me(user: Viewer) -> Me:
    return Me(name=user.name, role=user.role)
