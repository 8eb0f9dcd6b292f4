"""Mailbox quotas (RFC 9208): the STORAGE a mailbox (BAL) may hold, enforced.

A mailbox is a quota root (RFC 9208 §3.2) with one resource, STORAGE (§5.1): the
octets of its placements, in every folder. Its limit is ``mailboxes.quota_bytes``
(``mssd mailbox create --quota``, ``mssd mailbox quota``; NULL: no limit). Its usage
is ``mailbox_usage.used_bytes``: a counter, not a SUM over the placements, so a check
costs one row whatever the mailbox holds.

Invariants:
- Every transaction that inserts or deletes placements moves ``used_bytes`` by their
  sizes, in that transaction: the mail store's APPEND, COPY, MOVE, EXPUNGE and folder
  deletion, and the group committer's deliveries. Migration 0006 started the counters
  from the placements then stored.
- A check and the change it allows happen in one write transaction, the usage row
  locked (``FOR UPDATE`` on PostgreSQL, the ``BEGIN IMMEDIATE`` write lock on SQLite):
  two concurrent APPENDs cannot both be granted the same free space.
- Lock order: mailbox rows (folder management), then folder rows in id order, then
  usage rows in mailbox-id order; never a folder after a usage row.
- The limit holds in whole KiB, the unit STORAGE is reported in (§5.1): a mailbox
  may hold ``quota_bytes // 1024 * 1024`` octets. So within its quota, the usage
  reported (rounded up) never exceeds the limit reported (rounded down).
- Delivery reports mssd writes to one of its own senders are placed even over the
  limit (counted, never refused): the report is the sender's only news that a
  message failed, a report cannot be bounced (RFC 3461 §6.2), and its size is
  bounded by what that sender sent. Mail from elsewhere, reports from other operators
  included, is refused like any other when it does not fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mssd.store.fastpath import FastStatement
from mssd.store.schema import folders, mailbox_usage, mailboxes

KIB = 1024


def kib(octets: int) -> int:
    """Octets in RFC 9208 §5.1 units of 1024 octets, rounded up."""
    return (octets + KIB - 1) // KIB


def limit_octets(quota_bytes: int | None) -> int | None:
    """What a mailbox may hold: its quota in whole KiB (see the module docstring)."""
    return None if quota_bytes is None else quota_bytes // KIB * KIB


def fits(used: int, quota_bytes: int | None, size: int) -> bool:
    limit = limit_octets(quota_bytes)
    return limit is None or used + size <= limit


@dataclass(frozen=True)
class QuotaInfo:
    """One quota root (RFC 9208 §3.2): a whole mailbox (BAL), in octets."""

    root: str
    used: int
    limit: int | None
    """``mailboxes.quota_bytes``; None: no limit, so no resource is reported."""

    @property
    def used_kib(self) -> int:
        return kib(self.used)

    @property
    def limit_kib(self) -> int | None:
        return None if self.limit is None else self.limit // KIB

    def describe(self) -> str:
        """For administrators: ``12 KiB used of 10240 KiB (0.1 %)``."""
        if self.limit_kib is None:
            return f"{self.used_kib} KiB used, no quota"
        share = f" ({100 * self.used / self.limit:.1f} %)" if self.limit else ""
        return f"{self.used_kib} KiB used of {self.limit_kib} KiB{share}"


_UNITS = {"": 1, "K": KIB, "M": KIB**2, "G": KIB**3, "T": KIB**4}


def parse_size(text: str) -> int | None:
    """An administrator's quota: octets, or a number with K, M, G or T (binary
    multiples, "KiB" and "MiB" spellings too); "none" for no limit."""
    value = text.replace(" ", "").upper().removesuffix("IB").removesuffix("B")
    if value in ("NONE", "UNLIMITED", "NO"):
        return None
    number, unit = value.rstrip("KMGT"), value[len(value.rstrip("KMGT")) :]
    if not number.isdigit() or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: use octets or 500K, 200M, 2G; or none")
    return int(number) * _UNITS[unit]


@dataclass(frozen=True)
class Refusal:
    """A mailbox that has no room for ``size`` more octets."""

    address: str
    used: int
    quota_bytes: int
    size: int

    @property
    def reason(self) -> str:
        text = f"mailbox full ({kib(self.used)} KiB used of its {self.quota_bytes // KIB} KiB quota"
        if fits(self.used, self.quota_bytes, 1):  # not full yet: this is too big
            return text + f", {kib(self.size)} KiB more do not fit)"
        return text + ")"


class OverQuota(Exception):
    """A write refused because a mailbox has no room for it; nothing was written."""

    def __init__(self, refusals: Sequence[Refusal]) -> None:
        self.refusals = tuple(refusals)
        super().__init__(self.text)

    @property
    def text(self) -> str:
        return "; ".join(f"{r.address}: {r.reason}" for r in self.refusals)


@dataclass
class Usage:
    """A mailbox's usage row, locked by :func:`lock`; :func:`save` writes the change."""

    mailbox_id: int
    address: str
    used: int
    quota_bytes: int | None
    delta: int = 0

    def refusal(self, size: int) -> Refusal | None:
        """Why ``size`` more octets do not fit; None when they do."""
        if self.quota_bytes is None or fits(self.used, self.quota_bytes, size):
            return None
        return Refusal(self.address, self.used, self.quota_bytes, size)

    def add(self, size: int) -> None:
        """Count ``size`` octets placed (negative: removed), without a check."""
        self.used += size
        self.delta += size

    def take(self, size: int) -> None:
        """Count ``size`` octets placed, or raise :class:`OverQuota` if they do not fit."""
        refusal = self.refusal(size)
        if refusal is not None:
            raise OverQuota([refusal])
        self.add(size)


_USAGE_OF_FOLDERS = (
    select(
        folders.c.id,
        mailbox_usage.c.mailbox_id,
        mailboxes.c.address,
        mailbox_usage.c.used_bytes,
        mailboxes.c.quota_bytes,
    )
    .select_from(
        folders.join(mailbox_usage, mailbox_usage.c.mailbox_id == folders.c.mailbox_id).join(
            mailboxes, mailboxes.c.id == folders.c.mailbox_id
        )
    )
    .where(folders.c.id.in_(bindparam("b_folders", expanding=True)))
    .order_by(mailbox_usage.c.mailbox_id)
)
_USAGE_OF_MAILBOXES = (
    select(
        mailbox_usage.c.mailbox_id,
        mailbox_usage.c.mailbox_id,
        mailboxes.c.address,
        mailbox_usage.c.used_bytes,
        mailboxes.c.quota_bytes,
    )
    .select_from(mailbox_usage.join(mailboxes, mailboxes.c.id == mailbox_usage.c.mailbox_id))
    .where(mailbox_usage.c.mailbox_id.in_(bindparam("b_mailboxes", expanding=True)))
    .order_by(mailbox_usage.c.mailbox_id)
)
# Keyed by the name of the parameter that lists the ids: (SQLite, PostgreSQL).
# (They run on every write that changes a mailbox's size: on the fast path,
# mssd.store.fastpath.)
_QUERIES = {
    "b_folders": (
        FastStatement(_USAGE_OF_FOLDERS),
        FastStatement(_USAGE_OF_FOLDERS.with_for_update(of=mailbox_usage)),
    ),
    "b_mailboxes": (
        FastStatement(_USAGE_OF_MAILBOXES),
        FastStatement(_USAGE_OF_MAILBOXES.with_for_update(of=mailbox_usage)),
    ),
}
_ADD = FastStatement(
    update(mailbox_usage)
    .where(mailbox_usage.c.mailbox_id == bindparam("b_mailbox"))
    .values(used_bytes=mailbox_usage.c.used_bytes + bindparam("b_delta"))
)
_RELEASE_IN_FOLDER = FastStatement(
    update(mailbox_usage)
    .where(
        mailbox_usage.c.mailbox_id
        == select(folders.c.mailbox_id)
        .where(folders.c.id == bindparam("b_folder"))
        .scalar_subquery()
    )
    .values(used_bytes=mailbox_usage.c.used_bytes - bindparam("b_size"))
)


def _lock(conn: Connection, key: str, ids: Iterable[int]) -> dict[int, Usage]:
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    statement = _QUERIES[key][conn.dialect.name == "postgresql"]
    by_mailbox: dict[int, Usage] = {}
    found: dict[int, Usage] = {}
    for wanted_id, mailbox_id, address, used, quota_bytes in statement.rows(conn, {key: wanted}):
        if mailbox_id not in by_mailbox:
            limit = None if quota_bytes is None else int(quota_bytes)
            by_mailbox[mailbox_id] = Usage(mailbox_id, address, int(used), limit)
        found[wanted_id] = by_mailbox[mailbox_id]
    if len(found) != len(wanted):
        missing = sorted(set(wanted) - set(found))
        raise LookupError(f"no usage counter for {key[2:]} {missing}: run `mssd db upgrade`")
    return found


def lock(conn: Connection, mailbox_ids: Iterable[int]) -> dict[int, Usage]:
    """Lock the mailboxes' usage rows (in mailbox-id order) and read them."""
    return _lock(conn, "b_mailboxes", mailbox_ids)


def lock_for_folders(conn: Connection, folder_ids: Iterable[int]) -> dict[int, Usage]:
    """:func:`lock` for the mailboxes the folders belong to, keyed by folder id; two
    folders of one mailbox share one :class:`Usage`. Call with the folders locked."""
    return _lock(conn, "b_folders", folder_ids)


def save(conn: Connection, usages: Iterable[Usage]) -> None:
    """Write the counted changes (relative updates, so a row read without its lock
    is still right) and start counting afresh."""
    changed = {u.mailbox_id: u for u in usages if u.delta}
    if changed:
        _ADD.execute_many(
            conn, [{"b_mailbox": m, "b_delta": u.delta} for m, u in sorted(changed.items())]
        )
    for usage in changed.values():
        usage.delta = 0


def release(conn: Connection, folder_id: int, size: int) -> None:
    """Placements of ``size`` octets left the folder (EXPUNGE, folder deletion): the
    mailbox has that much more room. Nothing to check, so no read first."""
    if size:
        _RELEASE_IN_FOLDER.execute(conn, {"b_folder": folder_id, "b_size": size})


async def read(conn: AsyncConnection, mailbox_id: int) -> tuple[int, int | None]:
    """(used octets, quota_bytes) of a mailbox, as last committed (no lock)."""
    row = (
        await conn.execute(
            select(mailbox_usage.c.used_bytes, mailboxes.c.quota_bytes)
            .select_from(
                mailboxes.outerjoin(mailbox_usage, mailbox_usage.c.mailbox_id == mailboxes.c.id)
            )
            .where(mailboxes.c.id == mailbox_id)
        )
    ).one()
    return int(row[0] or 0), None if row[1] is None else int(row[1])
