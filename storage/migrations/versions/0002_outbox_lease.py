"""outbox lease columns and due-row index

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 09:00:00.000000

The delivery worker claims outbox rows while it sends them (lease_owner, lease_expires_at) and
looks up due rows per destination (ix_outbox_due).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
        batch_op.add_column(
            sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_index(
            "ix_outbox_due", ["destination", "status", "next_attempt_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_due")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("lease_owner")
