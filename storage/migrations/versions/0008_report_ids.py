"""report ids handed out ahead of their rows

Revision ID: 0008_report_ids
Revises: 0007_operations
Create Date: 2026-11-29 13:10:00.000000

id_counters: one row per table whose ids are handed out before the row is written
(storage/report_ids.py); the reports row starts after the newest existing report.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_report_ids"
down_revision = "0007_operations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "id_counters",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("next_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_id_counters")),
    )
    op.execute(
        "INSERT INTO id_counters (name, next_id) "
        "SELECT 'reports', COALESCE(MAX(id), 0) + 1 FROM reports"
    )


def downgrade() -> None:
    op.drop_table("id_counters")
