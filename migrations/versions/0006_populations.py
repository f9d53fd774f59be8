"""Populations: what a tenant's groups share, learned once by a worker; subject profiles are fitted against
one (`service.populations`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "populations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("subjects", _json(), nullable=False),
        sa.Column("sample_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("progress", _json(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("report", _json(), nullable=True),
        sa.Column("questions", _json(), nullable=True),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=True),
        sa.Column("artifact_size", sa.Integer(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.Column("started_at", _ts(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.CheckConstraint("status IN ('queued', 'building', 'ready', 'failed')",
                           name=op.f("ck_populations_status")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_populations_tenant_id_tenants"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_populations")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_populations_tenant_id_name")),
    )
    op.create_index(op.f("ix_populations_tenant_id"), "populations", ["tenant_id"], unique=False)
    op.create_index(op.f("ix_populations_artifact_sha256"), "populations", ["artifact_sha256"], unique=False)


def downgrade() -> None:
    op.drop_table("populations")
