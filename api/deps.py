"""FastAPI dependencies: the node's context, a database session, the signed-in user.

Authentication is a bearer token (RFC 6750) from `medgemma-node api add-user`: a request
without a valid one gets 401 with ``WWW-Authenticate: Bearer``; a user whose role may not do
what was asked gets 403. The user is remembered on ``request.state`` for the audit trail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.answers import WAITERS_PER_QUEUED, AnswerWaiter
from config.settings import NodeSettings
from storage.conversations import ReportHook
from storage.db import Database
from storage.models import UserRole
from storage.users import UserInfo, authenticate

REALM = "medgemma-node"
# The PDF of a report by id, built and stored first when missing. Injected by the process
# wiring (medgemma_node.report_pdf.ReportPdfFiles.ensure_pdf): the API does not compose the
# delivery and DICOM stages itself.
ReportPdfSource = Callable[[int], bytes]
ROLE_RANK = {UserRole.VIEWER: 0, UserRole.RADIOLOGIST: 1, UserRole.ADMIN: 2}


@dataclass(frozen=True)
class ApiContext:
    """What every request handler may use; set once on ``app.state.context``.

    ``on_report``: what a new report version needs written with it (SR, ORU, outbox rows;
    ``serve`` passes medgemma_node.outputs.ReportOutputs); None: appending is refused (503).
    """

    settings: NodeSettings
    db: Database
    on_report: ReportHook | None = None
    report_pdf: ReportPdfSource | None = None  # None: this process serves no PDFs
    answers: AnswerWaiter = field(init=False)

    def __post_init__(self) -> None:
        waiters = self.settings.api.max_queued_questions * WAITERS_PER_QUEUED
        poll = self.settings.interactive.poll_interval_s
        waiter = AnswerWaiter(self.db, self.settings.storage.data_dir, waiters, poll)
        object.__setattr__(self, "answers", waiter)

    @property
    def data_dir(self) -> Path:
        return self.settings.storage.data_dir


def get_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


Context = Annotated[ApiContext, Depends(get_context)]


def get_session(context: Context) -> Iterator[Session]:
    """One transaction per request: committed on success, rolled back on any error."""
    with context.db.session() as session:
        yield session


DbSession = Annotated[Session, Depends(get_session)]

bearer = HTTPBearer(
    auto_error=False,
    description="A token from `medgemma-node api add-user NAME --role ROLE`",
)


def _unauthorized(detail: str, error: str | None) -> HTTPException:
    challenge = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": challenge}
    )


def current_user(
    request: Request,
    context: Context,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> UserInfo:
    if credentials is None:
        raise _unauthorized("a bearer token is required (Authorization: Bearer <token>)", None)
    user = authenticate(context.db, credentials.credentials)
    if user is None:
        raise _unauthorized("the token is not valid or was revoked", "invalid_token")
    request.state.user = user
    return user


CurrentUser = Annotated[UserInfo, Depends(current_user)]


def require_role(role: UserRole) -> Callable[[UserInfo], UserInfo]:
    """A dependency admitting users of ``role`` or a higher one; 403 for the others."""

    def check(user: CurrentUser) -> UserInfo:
        if ROLE_RANK[user.role] < ROLE_RANK[role]:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"this needs the {role.value} role; {user.name} is {user.role.value}",
            )
        return user

    return check


Viewer = Annotated[UserInfo, Depends(require_role(UserRole.VIEWER))]
Radiologist = Annotated[UserInfo, Depends(require_role(UserRole.RADIOLOGIST))]
Admin = Annotated[UserInfo, Depends(require_role(UserRole.ADMIN))]


def audit_study(request: Request, study_uid: str | None, **detail: object) -> None:
    """Name the study (and extra detail) of this request in its audit event."""
    request.state.audit_study = study_uid
    request.state.audit_detail = detail
