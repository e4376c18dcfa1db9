"""the order of a report's question and images

Revision ID: 0009_report_question_first
Revises: 0008_report_ids
Create Date: 2026-11-29 19:20:00.000000

reports.question_first: the report's model run asked its question before the images (a
prompt template with question_first = true); a conversation about the report replays that
turn in the same order. Reports made before this revision asked after the images: false.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_report_question_first"
down_revision = "0008_report_ids"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("question_first", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_column("question_first")
