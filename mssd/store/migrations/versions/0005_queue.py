"""outbound_queue: durable queue of messages for other operators

One entry per (envelope, remote recipient), created in the transaction that stores the
message; claimed by relay workers with SELECT ... FOR UPDATE SKIP LOCKED (PostgreSQL).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbound_queue",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("envelope_id", sa.String(length=32), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("dsn_notify", sa.String(length=64), nullable=True),
        sa.Column("dsn_orcpt", sa.String(length=500), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("remote_mta", sa.String(length=255), nullable=True),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("delay_reported", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('queued', 'sending', 'delivered', 'failed')",
            name=op.f("ck_outbound_queue_state"),
        ),
        sa.ForeignKeyConstraint(
            ["envelope_id"],
            ["envelopes.id"],
            name=op.f("fk_outbound_queue_envelope_id_envelopes"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbound_queue")),
    )
    op.create_index(
        op.f("ix_outbound_queue_envelope_id"), "outbound_queue", ["envelope_id"], unique=False
    )
    op.create_index(
        "ix_outbound_queue_state_next_attempt_at",
        "outbound_queue",
        ["state", "next_attempt_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_outbound_queue_state_next_attempt_at", table_name="outbound_queue")
    op.drop_index(op.f("ix_outbound_queue_envelope_id"), table_name="outbound_queue")
    op.drop_table("outbound_queue")
