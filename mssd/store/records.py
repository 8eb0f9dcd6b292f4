"""Value objects the store hands to the layers above it.

They are frozen: code above the store never mutates a record and expects the
change to be saved; it calls a repository function instead.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

BalType = Literal["PER", "ORG", "APP", "CAB"]
"""Mailbox (BAL) types of the MSSanté nomenclature TRE_R257."""
BAL_TYPES: tuple[BalType, ...] = get_args(BalType)

Status = Literal["active", "suspended", "closed"]


@dataclass(frozen=True)
class Account:
    """An identity that can authenticate: a professional, or the functional
    account of an ORG/APP/CAB mailbox."""

    id: int
    login: str
    status: Status
    idnat_ps: str | None = None
    """National id of the professional (``8``+RPPS or ``0``+ADELI), if a person."""
    cert_dn: str | None = None
    """Normalised RFC 4514 DN of an organisation certificate registered for EXTERNAL."""
    password_hash: str | None = None
    totp_secret: str | None = None
    """Base32 RFC 6238 secret, when a one-time code is required after the password."""


@dataclass(frozen=True)
class AuditEvent:
    """One line of the append-only audit trail: who did what to what, from where,
    with which result. Never carries message content or secrets."""

    actor: str
    action: str
    target: str = ""
    remote: str = ""
    result: str = "ok"
    details: dict[str, Any] = field(default_factory=dict)
    at: dt.datetime | None = None
