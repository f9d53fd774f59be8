"""Profiles record when the broker last took their build's message (`sent_at`), so a queued profile whose
message was lost is found without reading the broker's queues. Rows queued before this revision have none:
the sweeper sends each of them once more (a duplicate message is harmless).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("profiles") as batch:
        batch.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("profiles") as batch:
        batch.drop_column("sent_at")
