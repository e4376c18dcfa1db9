"""installation id

Revision ID: 0005_installation
Revises: 0004_interactive
Create Date: 2026-11-29 23:10:00.000000

installation: one row holding the installation's random id (storage/installation.py), part of
every UID, HL7 control id and idempotency key the node mints.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_installation"
down_revision = "0004_interactive"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "installation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("installation_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("installation")
