"""annuaire_publications.location; our IDN domains stored as A-labels

- annuaire_publications.location: where each mailbox was last published. The
  resource a mailbox is published on can change (a CAB mailbox follows its
  responsible's Practitioner): publication must delete it where it was before
  inserting it where it now belongs. Rows published before this column existed
  have no location (NULL) and are treated as before.
- Hosted domains, and the mailbox addresses and logins in them, were stored as
  typed (U-labels for an IDN domain) while port 25 compares A-labels: they are
  rewritten as A-labels (RFC 5890 §2.3.2.1), the one form mssd now stores.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

from __future__ import annotations

import idna
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("annuaire_publications") as batch:
        batch.add_column(sa.Column("location", sa.String(length=512), nullable=True))
    conn = op.get_bind()
    for domain_id, name in conn.execute(sa.text("SELECT id, name FROM domains")).all():
        if name.isascii():
            continue
        a_label = idna.encode(name, uts46=True).decode("ascii").lower()
        conn.execute(
            sa.text("UPDATE domains SET name = :a WHERE id = :id"), {"a": a_label, "id": domain_id}
        )
        rows = conn.execute(
            sa.text("SELECT id, address FROM mailboxes WHERE domain_id = :id"), {"id": domain_id}
        ).all()
        for mailbox_id, address in rows:
            new = f"{address.rpartition('@')[0]}@{a_label}"
            conn.execute(
                sa.text("UPDATE mailboxes SET address = :new WHERE id = :id"),
                {"new": new, "id": mailbox_id},
            )
            # ORG, APP and CAB accounts log in with their mailbox address.
            conn.execute(
                sa.text("UPDATE accounts SET login = :new WHERE login = :old"),
                {"new": new, "old": address},
            )


def downgrade() -> None:
    # A-labels are valid domain names for every earlier version: left as they are.
    with op.batch_alter_table("annuaire_publications") as batch:
        batch.drop_column("location")
