"""prior store and prior links

Revision ID: 0006_priors
Revises: 0005_installation
Create Date: 2026-11-29 01:30:00.000000

prior_studies / prior_instances: earlier studies fetched from PACS for comparison (the prior
store, apart from received studies: no job of their own). prior_links: per report, the prior
study it was compared with, or why it was made without one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_priors"
down_revision = "0005_installation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prior_studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("body_part", sa.String(length=64), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prior_studies")),
    )
    op.create_index(
        op.f("ix_prior_studies_study_instance_uid"),
        "prior_studies",
        ["study_instance_uid"],
        unique=True,
    )
    op.create_table(
        "prior_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prior_study_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["prior_study_id"],
            ["prior_studies.id"],
            name=op.f("fk_prior_instances_prior_study_id_prior_studies"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prior_instances")),
    )
    op.create_index(
        op.f("ix_prior_instances_prior_study_id"), "prior_instances", ["prior_study_id"]
    )
    op.create_index(
        op.f("ix_prior_instances_sop_instance_uid"),
        "prior_instances",
        ["sop_instance_uid"],
        unique=True,
    )
    op.create_table(
        "prior_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("prior_study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["report_id"], ["reports.id"], name=op.f("fk_prior_links_report_id_reports")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prior_links")),
        sa.UniqueConstraint("report_id", name=op.f("uq_prior_links_report_id")),
    )
    op.create_index(
        op.f("ix_prior_links_prior_study_instance_uid"),
        "prior_links",
        ["prior_study_instance_uid"],
    )


def downgrade() -> None:
    op.drop_table("prior_links")
    op.drop_table("prior_instances")
    op.drop_table("prior_studies")
