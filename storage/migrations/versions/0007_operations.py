"""audit columns, retention marks, MPPS

Revision ID: 0007_operations
Revises: 0006_priors
Create Date: 2026-11-29 01:40:00.000000

audit_events: actor, address, outcome and an index on kind (storage/audit.py).
studies.pruned_at, instances.pruned_at, reports.outputs_pruned_at: what retention deleted
(storage/retention.py). mpps: Modality Performed Procedure Steps (dicom_node/mpps.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_operations"
down_revision = "0006_priors"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("actor", sa.String(length=128), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("address", sa.String(length=64), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("outcome", sa.String(length=16), nullable=False, server_default="success")
        )
        batch_op.create_index("ix_audit_events_kind", ["kind"], unique=False)
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("outputs_pruned_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.create_table(
        "mpps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uids", sa.JSON(), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mpps")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_mpps_sop_instance_uid")),
    )
    with op.batch_alter_table("mpps", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_mpps_study_instance_uid"), ["study_instance_uid"], unique=False
        )


def downgrade() -> None:
    op.drop_table("mpps")
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_column("outputs_pruned_at")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("pruned_at")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("pruned_at")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_kind")
        batch_op.drop_column("outcome")
        batch_op.drop_column("address")
        batch_op.drop_column("actor")
