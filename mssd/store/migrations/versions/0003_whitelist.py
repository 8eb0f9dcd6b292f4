"""whitelist_lists, whitelist_refusals: the ANS whitelist kept in the store

The last good whitelist survives restarts and is shared by every mssd process on
one database; refused updates are recorded for `mssd whitelist show`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "whitelist_lists",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("source", sa.String(length=2048), nullable=False),
        sa.Column("generated_at", sa.String(length=64), nullable=True),
        sa.Column("domain_count", sa.Integer(), nullable=False),
        sa.Column("entry_count", sa.Integer(), nullable=False),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_whitelist_lists")),
    )
    op.create_table(
        "whitelist_refusals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=2048), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_whitelist_refusals")),
    )
    op.create_index(op.f("ix_whitelist_refusals_at"), "whitelist_refusals", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_whitelist_refusals_at"), table_name="whitelist_refusals")
    op.drop_table("whitelist_refusals")
    op.drop_table("whitelist_lists")
