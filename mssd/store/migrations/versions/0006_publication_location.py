"""annuaire_publications.location: where each mailbox was last published

The resource a mailbox is published on can change (a CAB mailbox follows its
responsible's Practitioner): publication must delete it where it was before
inserting it where it now belongs. Rows published before this column existed
have no location (NULL) and are treated as before.

Revision ID: 0006
Revises: 0005
Create Date: 2027-01-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("annuaire_publications") as batch:
        batch.add_column(sa.Column("location", sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("annuaire_publications") as batch:
        batch.drop_column("location")
