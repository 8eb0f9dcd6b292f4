"""The tables of the store (SQLAlchemy Core).

Migrations under ``migrations/versions`` create these tables; a test checks that
the migrated schema and this module agree. Change both in the same commit.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Timestamp = DateTime(timezone=True)

domains = Table(
    "domains",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(253), nullable=False, unique=True),
    Column("created_at", Timestamp, nullable=False),
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("login", String(320), nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("idnat_ps", String(16), unique=True),
    Column("cert_dn", String(1024), unique=True),
    Column("password_hash", String(255)),
    Column("totp_secret", String(64)),
    Column("totp_last_step", BigInteger, nullable=False, server_default="0"),
    Column("created_at", Timestamp, nullable=False),
    CheckConstraint("status IN ('active', 'suspended', 'closed')", name="status"),
)

mailboxes = Table(
    "mailboxes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("address", String(320), nullable=False, unique=True),
    Column("domain_id", Integer, ForeignKey("domains.id"), nullable=False),
    Column("bal_type", String(3), nullable=False),
    Column("status", String(16), nullable=False),
    Column("owner_idnat", String(16), nullable=False),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("display_name", String(255)),
    Column("quota_bytes", BigInteger),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # The lowest UIDVALIDITY a new folder of this mailbox may take (migration 0002).
    Column("next_uidvalidity", BigInteger, nullable=False, server_default="0"),
    CheckConstraint("bal_type IN ('PER', 'ORG', 'APP', 'CAB')", name="bal_type"),
    CheckConstraint("status IN ('active', 'suspended', 'closed')", name="status"),
)

# What each mailbox's placements weigh (migration 0006): the sum of their ``size``,
# kept by the writers that add or remove placements, in the same transactions
# (mssd/store/quota.py). A table of its own so that its row locks never meet the
# mailbox row that folder creation, deletion and renaming lock.
mailbox_usage = Table(
    "mailbox_usage",
    metadata,
    Column("mailbox_id", Integer, ForeignKey("mailboxes.id"), primary_key=True),
    Column("used_bytes", BigInteger, nullable=False),
)

delegations = Table(
    "delegations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("mailbox_id", Integer, ForeignKey("mailboxes.id"), nullable=False),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("rights", String(32), nullable=False),
    Column("may_send", Boolean, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    UniqueConstraint("mailbox_id", "account_id"),
)

folders = Table(
    "folders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("mailbox_id", Integer, ForeignKey("mailboxes.id"), nullable=False),
    Column("name", String(1024), nullable=False),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("uidnext", BigInteger, nullable=False),
    Column("highestmodseq", BigInteger, nullable=False),
    Column("special_use", String(32)),
    Column("subscribed", Boolean, nullable=False),
    UniqueConstraint("mailbox_id", "name"),
)

blobs = Table(
    "blobs",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", Timestamp, nullable=False),
)

placements = Table(
    "placements",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("folder_id", Integer, ForeignKey("folders.id"), nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("blob_sha256", String(64), ForeignKey("blobs.sha256"), nullable=False, index=True),
    Column("flags", Text, nullable=False),
    Column("modseq", BigInteger, nullable=False),
    Column("internal_date", Timestamp, nullable=False),
    Column("size", BigInteger, nullable=False),
    UniqueConstraint("folder_id", "uid"),
    Index("ix_placements_folder_modseq", "folder_id", "modseq"),
)

expunges = Table(
    "expunges",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("folder_id", Integer, ForeignKey("folders.id"), nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("modseq", BigInteger, nullable=False),
    Column("expunged_at", Timestamp, nullable=False),
    Index("ix_expunges_folder_modseq", "folder_id", "modseq"),
)

envelopes = Table(
    "envelopes",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("blob_sha256", String(64), ForeignKey("blobs.sha256"), nullable=False, index=True),
    Column("mail_from", String(320), nullable=False),
    Column("source", String(16), nullable=False),
    Column("auth_login", String(320)),
    Column("remote", String(64), nullable=False),
    Column("dsn_ret", String(4)),
    Column("dsn_envid", String(100)),
    Column("body", String(16)),
    Column("smtputf8", Boolean, nullable=False),
    Column("received_at", Timestamp, nullable=False),
)

envelope_recipients = Table(
    "envelope_recipients",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("envelope_id", String(32), ForeignKey("envelopes.id"), nullable=False, index=True),
    Column("address", String(320), nullable=False),
    Column("mailbox_id", Integer, ForeignKey("mailboxes.id")),
    Column("dsn_notify", String(64)),
    Column("dsn_orcpt", String(500)),
    Column("status", String(16), nullable=False),
    # A failure the sender is still owed a report on (migration 0009): why the mailbox
    # refused the message, written with the row, NULL again in the transaction that
    # stores the report (mssd/delivery/local_reports.py). The partial index holds only these.
    Column("report_due", Text),
    Index(
        "ix_envelope_recipients_report_due",
        "envelope_id",
        postgresql_where=text("report_due IS NOT NULL"),
        sqlite_where=text("report_due IS NOT NULL"),
    ),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", Timestamp, nullable=False, index=True),
    Column("actor", String(1024), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(1024), nullable=False),
    Column("remote", String(64), nullable=False),
    Column("result", String(64), nullable=False),
    Column("details", Text, nullable=False),
)

# The ANS whitelist (migration 0003): each accepted list as published, newest last, and
# every refused update. mssd keeps a few recent lists; the newest is the one in force.
whitelist_lists = Table(
    "whitelist_lists",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("content", LargeBinary, nullable=False),
    Column("source", String(2048), nullable=False),
    Column("generated_at", String(64)),
    Column("domain_count", Integer, nullable=False),
    Column("entry_count", Integer, nullable=False),
    Column("loaded_at", Timestamp, nullable=False),
)

whitelist_refusals = Table(
    "whitelist_refusals",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", Timestamp, nullable=False, index=True),
    Column("source", String(2048), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("sha256", String(64)),
    Column("message", Text, nullable=False),
)

# -- national directory (mssd/annuaire; migration 0004) ---------------------------

# Mailboxes of the national directory loaded from the public extraction file
# (`mssd annuaire import`): one row per mailbox, replaced as a whole by each import.
# The *_key columns hold folded text (no accents, case-folded) for searches.
annuaire_entries = Table(
    "annuaire_entries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("address", String(320), nullable=False, unique=True),
    Column("bal_type", String(3)),
    Column("idnat_ps", String(16), index=True),
    Column("civility", Text),
    Column("last_name", Text),
    Column("first_name", Text),
    Column("last_name_key", String(255), index=True),
    Column("first_name_key", String(255)),
    Column("profession_code", String(16), index=True),
    Column("profession_label", Text),
    Column("profession_key", String(255)),
    Column("savoir_faire", Text),
    Column("structure_id", String(64)),
    Column("structure_name", Text),
    Column("trade_name", Text),
    Column("structure_category", String(16)),
    Column("service", Text),
    Column("street", Text),
    Column("postcode", String(16), index=True),
    Column("city", Text),
    Column("city_key", String(255), index=True),
    Column("description", Text),
    Column("responsible", Text),
    Column("phone", String(64)),
    Column("dematerialisation", Boolean),
    Column("liste_rouge", Boolean, nullable=False),
    Column("imported_at", Timestamp, nullable=False),
)

# Answers of the directory backends, shared by every process using this store.
annuaire_cache = Table(
    "annuaire_cache",
    metadata,
    Column("key", String(400), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("source", String(32), nullable=False),
    Column("entries", Text, nullable=False),
    Column("expires_at", Timestamp, nullable=False, index=True),
    CheckConstraint("status IN ('found', 'not_found')", name="status"),
)

# What the directory should say about each of our mailboxes (MOS BoiteLettreMSS
# fields mssd has no other place for).
annuaire_mailbox_settings = Table(
    "annuaire_mailbox_settings",
    metadata,
    Column("mailbox_id", Integer, ForeignKey("mailboxes.id"), primary_key=True),
    Column("liste_rouge", Boolean, nullable=False),
    Column("dematerialisation", Boolean, nullable=False),
    Column("description", Text),
    Column("responsible", Text),
    Column("service", Text),
    Column("phone", String(64)),
    Column("updated_at", Timestamp, nullable=False),
)

# The outcome of the last publication of each mailbox to each target (fhir, ldap).
annuaire_publications = Table(
    "annuaire_publications",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("mailbox_id", Integer, ForeignKey("mailboxes.id"), nullable=False),
    Column("target", String(16), nullable=False),
    Column("published", Boolean, nullable=False),
    Column("fingerprint", String(64)),
    # Where the mailbox is published on FHIR (resource|system|value); NULL when it
    # is not, for LDAP (the DN is the address), or when published before 0007.
    Column("location", String(512)),
    Column("action", String(16), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("http_status", Integer),
    Column("message", Text, nullable=False),
    Column("attempted_at", Timestamp, nullable=False),
    UniqueConstraint("mailbox_id", "target"),
)

# The outbound queue (migrations 0005, 0008): one entry per remote recipient of an
# envelope, written in the transaction that stores the message. What the recipient is
# (address, NOTIFY, ORCPT) and when the message arrived are in envelope_recipients and
# envelopes; an entry holds only its delivery state. ``state``: queued (waiting for
# ``next_attempt_at``), sending (claimed by a worker until ``next_attempt_at``, its lease),
# delivered, failed. ``claim_token`` identifies the claim, so a worker whose lease ran out
# cannot overwrite the outcome of the worker that took the entry over.
outbound_queue = Table(
    "outbound_queue",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "recipient_id",
        Integer,
        ForeignKey("envelope_recipients.id"),
        nullable=False,
        unique=True,
    ),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", Timestamp, nullable=False),
    Column("last_attempt_at", Timestamp),
    Column("last_error", Text),
    Column("remote_mta", String(255)),
    Column("claim_token", String(32)),
    Column("delay_reported", Boolean, nullable=False),
    CheckConstraint("state IN ('queued', 'sending', 'delivered', 'failed')", name="state"),
    Index("ix_outbound_queue_state_next_attempt_at", "state", "next_attempt_at"),
)
