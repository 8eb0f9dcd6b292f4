"""national directory: extraction entries, shared cache, publication of our mailboxes

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "annuaire_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("bal_type", sa.String(length=3), nullable=True),
        sa.Column("idnat_ps", sa.String(length=16), nullable=True),
        sa.Column("civility", sa.Text(), nullable=True),
        sa.Column("last_name", sa.Text(), nullable=True),
        sa.Column("first_name", sa.Text(), nullable=True),
        sa.Column("last_name_key", sa.String(length=255), nullable=True),
        sa.Column("first_name_key", sa.String(length=255), nullable=True),
        sa.Column("profession_code", sa.String(length=16), nullable=True),
        sa.Column("profession_label", sa.Text(), nullable=True),
        sa.Column("profession_key", sa.String(length=255), nullable=True),
        sa.Column("savoir_faire", sa.Text(), nullable=True),
        sa.Column("structure_id", sa.String(length=64), nullable=True),
        sa.Column("structure_name", sa.Text(), nullable=True),
        sa.Column("trade_name", sa.Text(), nullable=True),
        sa.Column("structure_category", sa.String(length=16), nullable=True),
        sa.Column("service", sa.Text(), nullable=True),
        sa.Column("street", sa.Text(), nullable=True),
        sa.Column("postcode", sa.String(length=16), nullable=True),
        sa.Column("city", sa.Text(), nullable=True),
        sa.Column("city_key", sa.String(length=255), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("responsible", sa.Text(), nullable=True),
        sa.Column("phone", sa.String(length=64), nullable=True),
        sa.Column("dematerialisation", sa.Boolean(), nullable=True),
        sa.Column("liste_rouge", sa.Boolean(), nullable=False),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annuaire_entries")),
        sa.UniqueConstraint("address", name=op.f("uq_annuaire_entries_address")),
    )
    with op.batch_alter_table("annuaire_entries", schema=None) as batch_op:
        for column in ("idnat_ps", "last_name_key", "profession_code", "postcode", "city_key"):
            batch_op.create_index(
                batch_op.f(f"ix_annuaire_entries_{column}"), [column], unique=False
            )

    op.create_table(
        "annuaire_cache",
        sa.Column("key", sa.String(length=400), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("entries", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('found', 'not_found')", name=op.f("ck_annuaire_cache_status")
        ),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_annuaire_cache")),
    )
    with op.batch_alter_table("annuaire_cache", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_annuaire_cache_expires_at"), ["expires_at"], unique=False
        )

    op.create_table(
        "annuaire_mailbox_settings",
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("liste_rouge", sa.Boolean(), nullable=False),
        sa.Column("dematerialisation", sa.Boolean(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("responsible", sa.Text(), nullable=True),
        sa.Column("service", sa.Text(), nullable=True),
        sa.Column("phone", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_annuaire_mailbox_settings_mailbox_id_mailboxes"),
        ),
        sa.PrimaryKeyConstraint("mailbox_id", name=op.f("pk_annuaire_mailbox_settings")),
    )

    op.create_table(
        "annuaire_publications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(length=16), nullable=False),
        sa.Column("published", sa.Boolean(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_annuaire_publications_mailbox_id_mailboxes"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annuaire_publications")),
        sa.UniqueConstraint(
            "mailbox_id", "target", name=op.f("uq_annuaire_publications_mailbox_id_target")
        ),
    )


def downgrade() -> None:
    op.drop_table("annuaire_publications")
    op.drop_table("annuaire_mailbox_settings")
    with op.batch_alter_table("annuaire_cache", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_annuaire_cache_expires_at"))
    op.drop_table("annuaire_cache")
    with op.batch_alter_table("annuaire_entries", schema=None) as batch_op:
        for column in ("city_key", "postcode", "profession_code", "last_name_key", "idnat_ps"):
            batch_op.drop_index(batch_op.f(f"ix_annuaire_entries_{column}"))
    op.drop_table("annuaire_entries")
