"""REST API accounts: create, authenticate, list, revoke.

A token is ``mgn_`` + 32 random bytes (URL-safe base64) from ``secrets``; only its SHA-256 is
stored. A fast hash is enough here: the token has 256 bits of entropy, so there is nothing to
guess from the hash (passwords would need a slow hash; these are not passwords). The lookup
is by hash, and the stored hash is compared once more with ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from core.errors import StorageError
from storage.db import Database
from storage.models import User, UserRole, utcnow

TOKEN_PREFIX = "mgn_"
TOKEN_BYTES = 32
MAX_NAME_LENGTH = 64


class UserError(StorageError, ValueError):
    """A user cannot be created or changed as asked; ``str()`` says why."""


@dataclass(frozen=True)
class UserInfo:
    """An account as shown to operators and attached to API requests (never the token)."""

    id: int
    name: str
    role: UserRole
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def _info(user: User) -> UserInfo:
    return UserInfo(user.id, user.name, UserRole(user.role), user.created_at, user.revoked_at)


def check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise UserError(f"a user name is 1-{MAX_NAME_LENGTH} printable characters")
    return name


def create_user(db: Database, name: str, role: UserRole) -> str:
    """Create ``name`` with ``role`` and return its new bearer token (shown once, never stored).

    A revoked user of the same name is reinstated with the new role and token; an active one
    is an error (revoke it first).
    """
    name = check_name(name)
    token = new_token()
    try:
        with db.session() as session:
            user = session.scalar(select(User).where(User.name == name))
            if user is not None and user.revoked_at is None:
                raise UserError(f"user {name!r} exists; revoke it first to issue a new token")
            if user is None:
                session.add(User(name=name, role=role.value, token_hash=hash_token(token)))
            else:
                user.role, user.token_hash = role.value, hash_token(token)
                user.created_at, user.revoked_at = utcnow(), None
    except IntegrityError as exc:  # the same name created concurrently
        raise UserError(f"user {name!r} exists") from exc
    return token


def authenticate(db: Database, token: str) -> UserInfo | None:
    """The active user holding ``token``, or None."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    wanted = hash_token(token)
    with db.session() as session:
        user = session.scalar(select(User).where(User.token_hash == wanted))
        if user is None or user.revoked_at is not None:
            return None
        if not hmac.compare_digest(user.token_hash, wanted):
            return None
        return _info(user)


def list_users(db: Database) -> list[UserInfo]:
    with db.session() as session:
        return [_info(user) for user in session.scalars(select(User).order_by(User.name))]


def revoke_user(db: Database, name: str) -> bool:
    """Revoke ``name``'s token at once; False when there is no active user of that name."""
    with db.session() as session:
        user = session.scalar(select(User).where(User.name == name.strip()))
        if user is None or user.revoked_at is not None:
            return False
        user.revoked_at = utcnow()
        return True
