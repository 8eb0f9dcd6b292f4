"""mailboxes.next_uidvalidity: UIDVALIDITY values never come back

A folder that is deleted and created again under the same name must get a
UIDVALIDITY it never had (RFC 9051 §2.3.1.1). Folder UIDVALIDITY values are
derived from the clock but run ahead of it when folders are created in bursts;
the floor kept on the mailbox row survives the deletion of the folder that held
the highest value.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mailboxes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("next_uidvalidity", sa.BigInteger(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("mailboxes", schema=None) as batch_op:
        batch_op.drop_column("next_uidvalidity")
