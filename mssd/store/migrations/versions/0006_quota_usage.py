"""mailbox_usage: each mailbox's stored octets, kept up to date for quota checks

RFC 9208 quotas are enforced inside the transactions that add placements; summing a
mailbox's placements there would cost a scan per APPEND. The writers keep this
counter instead; the migration starts it from the placements already stored.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mailbox_usage",
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("used_bytes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_mailbox_usage_mailbox_id_mailboxes"),
        ),
        sa.PrimaryKeyConstraint("mailbox_id", name=op.f("pk_mailbox_usage")),
    )
    op.execute(
        "INSERT INTO mailbox_usage (mailbox_id, used_bytes) "
        "SELECT m.id, COALESCE(SUM(p.size), 0) FROM mailboxes m "
        "LEFT JOIN folders f ON f.mailbox_id = m.id "
        "LEFT JOIN placements p ON p.folder_id = f.id "
        "GROUP BY m.id"
    )


def downgrade() -> None:
    op.drop_table("mailbox_usage")
