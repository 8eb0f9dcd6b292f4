"""outbound_queue: refer to the envelope's recipient instead of copying it

A queue entry copied its recipient's address, NOTIFY and ORCPT from envelope_recipients,
its envelope id, and the arrival time from envelopes (as created_at), plus the domain of
the address. It now refers to the recipient row (recipient_id) and keeps only its own
delivery state; the copies go.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-19
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_COPIES: dict[str, sa.types.TypeEngine[Any]] = {
    "envelope_id": sa.String(length=32),
    "address": sa.String(length=320),
    "domain": sa.String(length=253),
    "dsn_notify": sa.String(length=64),
    "dsn_orcpt": sa.String(length=500),
    "created_at": sa.DateTime(timezone=True),
}
_STATUS = {"delivered": "relayed", "failed": "failed"}


def _tables() -> tuple[sa.Table, sa.Table, sa.Table]:
    meta = sa.MetaData()
    queue = sa.Table(
        "outbound_queue",
        meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("recipient_id", sa.Integer),
        sa.Column("state", sa.String(16)),
        *(sa.Column(name, kind) for name, kind in _COPIES.items()),
    )
    recipients = sa.Table(
        "envelope_recipients",
        meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("envelope_id", sa.String(32)),
        sa.Column("address", sa.String(320)),
        sa.Column("mailbox_id", sa.Integer),
        sa.Column("dsn_notify", sa.String(64)),
        sa.Column("dsn_orcpt", sa.String(500)),
        sa.Column("status", sa.String(16)),
    )
    envelopes = sa.Table(
        "envelopes",
        meta,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("received_at", sa.DateTime(timezone=True)),
    )
    return queue, recipients, envelopes


def upgrade() -> None:
    op.add_column("outbound_queue", sa.Column("recipient_id", sa.Integer(), nullable=True))
    queue, recipients, _ = _tables()
    conn = op.get_bind()
    # Each entry gets the recipient row it was copied from: same envelope and address, a
    # remote recipient (no mailbox), matched in order should an address appear twice.
    rows: dict[tuple[str, str], list[int]] = defaultdict(list)
    for row in conn.execute(
        sa.select(recipients.c.id, recipients.c.envelope_id, recipients.c.address)
        .where(recipients.c.mailbox_id.is_(None))
        .order_by(recipients.c.id)
    ):
        rows[(row.envelope_id, row.address)].append(row.id)
    links = []
    for entry in conn.execute(sa.select(queue).order_by(queue.c.id)):
        found = rows.get((entry.envelope_id, entry.address))
        if found:
            recipient_id = found.pop(0)
        else:  # never expected; the entry keeps what it knew rather than be lost
            inserted = conn.execute(
                recipients.insert().values(
                    envelope_id=entry.envelope_id,
                    address=entry.address,
                    mailbox_id=None,
                    dsn_notify=entry.dsn_notify,
                    dsn_orcpt=entry.dsn_orcpt,
                    status=_STATUS.get(entry.state, "queued"),
                )
            ).inserted_primary_key
            assert inserted is not None
            recipient_id = inserted[0]
        links.append({"entry": entry.id, "recipient": recipient_id})
    if links:
        conn.execute(
            queue.update()
            .where(queue.c.id == sa.bindparam("entry"))
            .values(recipient_id=sa.bindparam("recipient")),
            links,
        )
    with op.batch_alter_table("outbound_queue") as batch:
        batch.drop_index("ix_outbound_queue_envelope_id")
        batch.drop_constraint("fk_outbound_queue_envelope_id_envelopes", type_="foreignkey")
        for name in _COPIES:
            batch.drop_column(name)
        batch.alter_column("recipient_id", existing_type=sa.Integer(), nullable=False)
        batch.create_unique_constraint("uq_outbound_queue_recipient_id", ["recipient_id"])
        batch.create_foreign_key(
            "fk_outbound_queue_recipient_id_envelope_recipients",
            "envelope_recipients",
            ["recipient_id"],
            ["id"],
        )


def downgrade() -> None:
    with op.batch_alter_table("outbound_queue") as batch:
        for name, kind in _COPIES.items():
            batch.add_column(sa.Column(name, kind, nullable=True))
    queue, recipients, envelopes = _tables()
    conn = op.get_bind()
    copies = [
        {
            "entry": row.entry,
            "v_envelope_id": row.envelope_id,
            "v_address": row.address,
            "v_domain": row.address.rpartition("@")[2].lower(),
            "v_dsn_notify": row.dsn_notify,
            "v_dsn_orcpt": row.dsn_orcpt,
            "v_created_at": row.received_at,
        }
        for row in conn.execute(
            sa.select(
                queue.c.id.label("entry"),
                recipients.c.envelope_id,
                recipients.c.address,
                recipients.c.dsn_notify,
                recipients.c.dsn_orcpt,
                envelopes.c.received_at,
            )
            .join(recipients, recipients.c.id == queue.c.recipient_id)
            .join(envelopes, envelopes.c.id == recipients.c.envelope_id)
        )
    ]
    if copies:
        conn.execute(
            queue.update()
            .where(queue.c.id == sa.bindparam("entry"))
            .values({name: sa.bindparam(f"v_{name}") for name in _COPIES}),
            copies,
        )
    with op.batch_alter_table("outbound_queue") as batch:
        batch.drop_constraint(
            "fk_outbound_queue_recipient_id_envelope_recipients", type_="foreignkey"
        )
        batch.drop_constraint("uq_outbound_queue_recipient_id", type_="unique")
        batch.drop_column("recipient_id")
        for name in ("envelope_id", "address", "domain", "created_at"):
            batch.alter_column(name, existing_type=_COPIES[name], nullable=False)
        batch.create_foreign_key(
            "fk_outbound_queue_envelope_id_envelopes", "envelopes", ["envelope_id"], ["id"]
        )
        batch.create_index("ix_outbound_queue_envelope_id", ["envelope_id"], unique=False)
