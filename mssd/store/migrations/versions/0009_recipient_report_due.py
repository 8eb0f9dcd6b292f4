"""envelope_recipients.report_due: a failure report owed to the sender, kept until made

A recipient whose mailbox turned out full as the message was placed gets nothing while
the others get the message, and the sender is told by a report made after the commit
(RFC 5321 §6.1: after the 250, a failure is reported, never dropped). The duty to make
it is now written with the message: the row keeps the refusal's reason until the
report is stored, in the report's own transaction; a crash in between leaves the reason
for the recovery pass of ``mssd serve``.

Rows refused before this migration are left unmarked: their reports were made then (or
lost then); marking them now would send most of them twice. A downgrade forgets the
reports still owed: make them first (start ``mssd serve`` once and let it recover).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_OWED = sa.text("report_due IS NOT NULL")


def upgrade() -> None:
    op.add_column("envelope_recipients", sa.Column("report_due", sa.Text(), nullable=True))
    op.create_index(
        "ix_envelope_recipients_report_due",
        "envelope_recipients",
        ["envelope_id"],
        unique=False,
        postgresql_where=_OWED,
        sqlite_where=_OWED,
    )


def downgrade() -> None:
    op.drop_index("ix_envelope_recipients_report_due", table_name="envelope_recipients")
    # Not in batch mode: on SQLite that copies the table to a new one and drops the old,
    # which the queue entries referring to its rows forbid. SQLite (3.35 on) drops a
    # column in place, as PostgreSQL does.
    op.drop_column("envelope_recipients", "report_due")
