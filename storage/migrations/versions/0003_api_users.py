"""REST API users

Revision ID: 0003_api_users
Revises: 0002
Create Date: 2026-11-29 09:00:00.000000

Accounts of the REST API (api/): name, role, and the SHA-256 of the bearer token (the token
itself is shown once by `medgemma-node api add-user` and never stored). Revoked accounts keep
their row so the audit trail can still name them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_api_users"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_users_token_hash")),
    )


def downgrade() -> None:
    op.drop_table("users")
