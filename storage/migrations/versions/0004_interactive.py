"""interactive requests, conversations, appended reports

Revision ID: 0004_interactive
Revises: 0003_api_users
Create Date: 2026-11-29 09:00:00.000000

interactive_requests: the inference worker's priority lane (predict, conversation turns).
conversations / conversation_turns: follow-up questions anchored to regions of a study.
reports: job_id may be empty (a report appended to from a conversation has no job) and
supersedes_report_id names the report a new version replaces.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_interactive"
down_revision = "0003_api_users"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "interactive_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_code", sa.String(length=32), nullable=True),
        sa.Column("requested_by", sa.String(length=128), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_interactive_requests")),
    )
    with op.batch_alter_table("interactive_requests", schema=None) as batch_op:
        batch_op.create_index(
            "ix_interactive_requests_queue", ["status", "priority", "id"], unique=False
        )

    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.Integer(), nullable=True)
        batch_op.add_column(sa.Column("supersedes_report_id", sa.Integer(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_reports_supersedes_report_id"), ["supersedes_report_id"], unique=False
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_reports_supersedes_report_id_reports"),
            "reports",
            ["supersedes_report_id"],
            ["id"],
        )

    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("appended_report_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_conversations_study_id_studies")
        ),
        sa.ForeignKeyConstraint(
            ["report_id"], ["reports.id"], name=op.f("fk_conversations_report_id_reports")
        ),
        sa.ForeignKeyConstraint(
            ["appended_report_id"],
            ["reports.id"],
            name=op.f("fk_conversations_appended_report_id_reports"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
    )
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_conversations_study_id"), ["study_id"], unique=False)

    op.create_table(
        "conversation_turns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("turn_index", sa.Integer(), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("raw_text", sa.Text(), nullable=False),
        sa.Column("answered_by", sa.String(length=16), nullable=False),
        sa.Column("referenced_anchor_id", sa.String(length=16), nullable=True),
        sa.Column("anchors", sa.JSON(), nullable=False),
        sa.Column("findings", sa.JSON(), nullable=False),
        sa.Column("measurements", sa.JSON(), nullable=False),
        sa.Column("model_json", sa.JSON(), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("asked_by", sa.String(length=128), nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_conversation_turns_conversation_id_conversations"),
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["interactive_requests.id"],
            name=op.f("fk_conversation_turns_request_id_interactive_requests"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversation_turns")),
        sa.UniqueConstraint(
            "conversation_id", "turn_index", name=op.f("uq_conversation_turns_conversation_id")
        ),
    )
    with op.batch_alter_table("conversation_turns", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_conversation_turns_conversation_id"), ["conversation_id"], unique=False
        )


def downgrade() -> None:
    op.drop_table("conversation_turns")
    op.drop_table("conversations")
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_reports_supersedes_report_id_reports"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_reports_supersedes_report_id"))
        batch_op.drop_column("supersedes_report_id")
        batch_op.alter_column("job_id", existing_type=sa.Integer(), nullable=False)
    op.drop_table("interactive_requests")
