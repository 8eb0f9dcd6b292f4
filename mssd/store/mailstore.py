"""What an IMAP session needs from the store: folders, flags, UIDs, modseqs.

Folders are named as stored ("INBOX", "Sent", "a/b"; "/" separates levels).
An account sees the folders of its first own mailbox at the top of its
namespace, and those of every other mailbox it may use (its other own mailboxes,
ORG/CAB mailboxes it is delegated on with the RFC 4314 "l" right) under
``Partagés/<mailbox address>/`` (:data:`SHARED_PREFIX`).

Invariants:
- every write runs in ``write_transaction`` or ``run_write`` (engine.py) and
  locks the folder rows it takes UIDs or modseqs from: ``SELECT ... FOR
  UPDATE`` in folder-id order on PostgreSQL (the group committer does the
  same, so writers cannot deadlock),
  the database write lock of ``BEGIN IMMEDIATE`` on SQLite. Folder creation,
  deletion and renaming also lock the mailbox row. Nothing is kept in memory:
  several processes may share one PostgreSQL.
- UIDs come from ``folders.uidnext``, strictly ascending, never reused:
  ``uidnext`` never goes down, not even on expunge (RFC 9051 §2.3.1.1).
- Modseq policy (RFC 7162 §3.1): each message whose state changes (new, flags
  changed, expunged) takes its own new modseq, ``highestmodseq + 1``, ``+ 2``...
  in ascending UID order, and the folder's ``highestmodseq`` ends at the last
  one. So a folder's modseqs are strictly increasing and unique, and
  ``highestmodseq`` is at least every placement's and expunge's modseq. A
  STORE that does not change a message's flags leaves its modseq alone.
- Expunges are recorded (``expunges``: uid, modseq) in the transaction that
  removes the placement (QRESYNC VANISHED). A deleted folder takes its
  placements and expunge records with it; blobs always stay (content-addressed,
  possibly shared with other placements).
- Changes are reported to ``on_change`` after COMMIT, never before.
- Rights: the functions that take a name and an account check RFC 4314 rights
  (create "k", delete "x", rename "x" and "k"); those that take a folder id
  trust the caller, which checks :attr:`FolderInfo.rights` (the IMAP layer).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mssd.store import quota as quotas
from mssd.store.audit import insert_audit
from mssd.store.changes import FlagState, FolderChange, FolderDelta
from mssd.store.delivery import INSERT_BLOB
from mssd.store.engine import run_read, run_write, small_write, write_transaction
from mssd.store.fastpath import FastInsert, FastStatement
from mssd.store.messages import as_utc
from mssd.store.quota import OverQuota, QuotaInfo
from mssd.store.records import AuditEvent
from mssd.store.schema import (
    accounts,
    blobs,
    delegations,
    expunges,
    folders,
    mailboxes,
    placements,
)

log = logging.getLogger(__name__)

SEPARATOR = "/"
SHARED_PREFIX = "Partagés"
"""Root of the shared namespace (RFC 2342): ``Partagés/<address>/<folder>``."""
OWNER_RIGHTS = "lrswipkxtea"
"""RFC 4314 §2.1: everything, for an account on its own mailboxes."""
MAX_NAME = 1024
_CHUNK = 1000  # rows per IN (...) list: far below SQLite's and asyncpg's parameter limits
_INLINE_OCTETS = 1024 * 1024
"""Message octets a read may bring in without leaving the event loop (``run_read``)."""

_SYSTEM_FLAGS = {
    f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
}


class MailStoreError(Exception):
    """A refused operation; ``code`` is the IMAP response code (RFC 5530, RFC 9051 §7.1)."""

    def __init__(self, code: str | None, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass(frozen=True)
class FolderInfo:
    id: int
    mailbox_id: int
    mailbox_address: str
    name: str
    """As the account sees it: "INBOX", "a/b", "Partagés/accueil@x/INBOX"."""
    special_use: str | None
    subscribed: bool
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    rights: str
    """RFC 4314 rights of the account on this folder."""


@dataclass(frozen=True)
class FolderSnapshot:
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: tuple[tuple[int, frozenset[str], int], ...]
    """(uid, flags, modseq), ascending uid."""


@dataclass(frozen=True, slots=True)
class MessageRow:
    uid: int
    flags: frozenset[str]
    modseq: int
    internal_date: dt.datetime
    size: int
    sha256: str


@dataclass(frozen=True)
class StoreResult:
    updated: tuple[FlagState, ...]
    """Messages whose flags changed, with their new modseq (ascending uid)."""
    unchanged: tuple[FlagState, ...]
    """Messages that passed UNCHANGEDSINCE but already had the requested flags."""
    modified: tuple[int, ...]
    """UIDs that failed UNCHANGEDSINCE (RFC 7162 §3.1.3 MODIFIED response code)."""


@functools.lru_cache(maxsize=4096)
def parse_flags(stored: str) -> frozenset[str]:
    """The stored flags column as a set; the few distinct values a store
    holds are parsed once and shared."""
    return frozenset(stored.split())


def format_flags(flags: Iterable[str]) -> str:
    """System flags in their canonical spelling (flags are case-insensitive,
    RFC 9051 §2.3.2); \\Recent is never stored (session state, RFC 3501)."""
    canonical = {_SYSTEM_FLAGS.get(flag.lower(), flag) for flag in flags}
    canonical.discard("\\Recent")
    return " ".join(sorted(canonical))


def _chunks(values: Sequence[int]) -> Iterator[list[int]]:
    unique = sorted(set(values))
    for start in range(0, len(unique), _CHUNK):
        yield unique[start : start + _CHUNK]


@dataclass
class _Counters:
    """A locked folder's counters, advanced in memory and saved before COMMIT."""

    uidnext: int
    highestmodseq: int

    def next_uid(self) -> int:
        self.uidnext += 1
        return self.uidnext - 1

    def next_modseq(self) -> int:
        self.highestmodseq += 1
        return self.highestmodseq


@dataclass(frozen=True)
class _Namespace:
    mailbox_id: int
    address: str
    rights: str
    prefix: str
    """"" for the account's first own mailbox, else "Partagés/<address>/"."""
    owned: bool
    """The account owns the mailbox (else it is a delegate)."""


# The statements of the IMAP hot paths, built once and run through the fast path
# (fastpath.py: compiled by SQLAlchemy once per dialect, executed on the DBAPI
# connection without Connection.execute's per-call machinery). Rows are tuples.
_ADVANCE = FastStatement(
    update(folders)
    .where(folders.c.id == bindparam("b_id"))
    .values(uidnext=bindparam("b_uidnext"), highestmodseq=bindparam("b_modseq"))
)
_SET_FLAGS = FastStatement(
    update(placements)
    .where(placements.c.folder_id == bindparam("b_folder"), placements.c.uid == bindparam("b_uid"))
    .values(flags=bindparam("b_flags"), modseq=bindparam("b_modseq"))
)
_MESSAGE_COLUMNS = (
    placements.c.uid,
    placements.c.flags,
    placements.c.modseq,
    placements.c.internal_date,
    placements.c.size,
    placements.c.blob_sha256,
)
_MESSAGES_IN = FastStatement(
    select(*_MESSAGE_COLUMNS)
    .where(
        placements.c.folder_id == bindparam("b_folder"),
        placements.c.uid.in_(bindparam("b_uids", expanding=True)),
    )
    .order_by(placements.c.uid)
)
_MESSAGES_BETWEEN = FastStatement(
    select(*_MESSAGE_COLUMNS)
    .where(
        placements.c.folder_id == bindparam("b_folder"),
        placements.c.uid.between(bindparam("b_low"), bindparam("b_high")),
    )
    .order_by(placements.c.uid)
)
_CHANGED = FastStatement(
    select(*_MESSAGE_COLUMNS)
    .where(
        placements.c.folder_id == bindparam("b_folder"),
        placements.c.modseq > bindparam("b_modseq"),
    )
    .order_by(placements.c.uid)
)
_EXPUNGED = FastStatement(
    select(expunges.c.uid, expunges.c.modseq).where(
        expunges.c.folder_id == bindparam("b_folder"), expunges.c.modseq > bindparam("b_modseq")
    )
)
_BLOBS = FastStatement(
    select(blobs.c.sha256, blobs.c.data).where(
        blobs.c.sha256.in_(bindparam("b_digests", expanding=True))
    )
)
_BLOB_HEADS = FastStatement(
    select(blobs.c.sha256, func.substr(blobs.c.data, 1, bindparam("b_limit"))).where(
        blobs.c.sha256.in_(bindparam("b_digests", expanding=True))
    )
)
_SNAPSHOT = FastStatement(
    select(
        folders.c.uidvalidity,
        folders.c.uidnext,
        folders.c.highestmodseq,
        placements.c.uid,
        placements.c.flags,
        placements.c.modseq,
    )
    .select_from(folders.outerjoin(placements, placements.c.folder_id == folders.c.id))
    .where(folders.c.id == bindparam("b_folder"))
    .order_by(placements.c.uid)
)
_OWN_MAILBOXES = FastStatement(
    select(mailboxes.c.id, mailboxes.c.address)
    .where(mailboxes.c.account_id == bindparam("b_account"), mailboxes.c.status == "active")
    .order_by(mailboxes.c.id)
)
_DELEGATED_MAILBOXES = FastStatement(
    select(mailboxes.c.id, mailboxes.c.address, delegations.c.rights)
    .join(delegations, delegations.c.mailbox_id == mailboxes.c.id)
    .where(
        delegations.c.account_id == bindparam("b_account"),
        mailboxes.c.status == "active",
        mailboxes.c.bal_type.in_(("ORG", "CAB")),
    )
    .order_by(mailboxes.c.address)
)
_FOLDER_COLUMNS = (
    folders.c.id,
    folders.c.mailbox_id,
    folders.c.name,
    folders.c.special_use,
    folders.c.subscribed,
    folders.c.uidvalidity,
    folders.c.uidnext,
    folders.c.highestmodseq,
)
"""What :meth:`MailStore._info` reads, in this order."""
_FOLDER_BY_NAME = FastStatement(
    select(*_FOLDER_COLUMNS).where(
        folders.c.mailbox_id == bindparam("b_mailbox"), folders.c.name == bindparam("b_name")
    )
)
_FOLDERS_OF = FastStatement(
    select(*_FOLDER_COLUMNS)
    .where(folders.c.mailbox_id.in_(bindparam("b_mailboxes", expanding=True)))
    .order_by(folders.c.name)
)
_FOLDER_COUNTERS = (
    select(folders.c.id, folders.c.uidnext, folders.c.highestmodseq)
    .where(folders.c.id.in_(bindparam("b_ids", expanding=True)))
    .order_by(folders.c.id)
)
_READ_COUNTERS = FastStatement(_FOLDER_COUNTERS)
_LOCK_COUNTERS = FastStatement(_FOLDER_COUNTERS.with_for_update())
_PLACEMENT_FLAGS = FastStatement(
    select(placements.c.uid, placements.c.flags, placements.c.modseq)
    .where(
        placements.c.folder_id == bindparam("b_folder"),
        placements.c.uid.in_(bindparam("b_uids", expanding=True)),
    )
    .order_by(placements.c.uid)
)
_INSERT_PLACEMENTS = FastInsert(placements)
"""Content-addressed: a blob stored already stays as it is."""
_INSERT_EXPUNGES = FastInsert(expunges)
_DELETE_PLACEMENTS = FastStatement(
    delete(placements).where(
        placements.c.folder_id == bindparam("b_folder"),
        placements.c.uid.in_(bindparam("b_uids", expanding=True)),
    )
)
_DELETED_WHERE = select(placements.c.uid, placements.c.flags, placements.c.size).where(
    placements.c.folder_id == bindparam("b_folder"),
    placements.c.flags.contains("\\Deleted", autoescape=True),
)
_DELETED = FastStatement(_DELETED_WHERE)
_DELETED_IN = FastStatement(
    _DELETED_WHERE.where(placements.c.uid.in_(bindparam("b_uids", expanding=True)))
)
_TRANSFERRED = FastStatement(
    select(
        placements.c.uid,
        placements.c.blob_sha256,
        placements.c.flags,
        placements.c.internal_date,
        placements.c.size,
    )
    .where(
        placements.c.folder_id == bindparam("b_folder"),
        placements.c.uid.in_(bindparam("b_uids", expanding=True)),
    )
    .order_by(placements.c.uid)
)
_SPARSE = 4
"""A UID range is read whole when it holds at most this many times the UIDs asked."""


def _postgres(conn: Connection | AsyncConnection) -> bool:
    return conn.dialect.name == "postgresql"


def _lock_folders(conn: Connection, ids: Iterable[int]) -> dict[int, _Counters]:
    """Lock the folders' rows (PostgreSQL; SQLite's write lock covers them) and
    read their counters. From async code: ``await conn.run_sync(_lock_folders, ids)``."""
    wanted = sorted(set(ids))
    query = _LOCK_COUNTERS if _postgres(conn) else _READ_COUNTERS
    rows = query.rows(conn, {"b_ids": wanted})
    found = {row[0]: _Counters(row[1], row[2]) for row in rows}
    if len(found) != len(wanted):
        raise MailStoreError("NONEXISTENT", "no such folder (deleted meanwhile?)")
    return found


def _save(conn: Connection, counters: dict[int, _Counters]) -> None:
    _ADVANCE.execute_many(
        conn,
        [
            {"b_id": folder_id, "b_uidnext": c.uidnext, "b_modseq": c.highestmodseq}
            for folder_id, c in counters.items()
        ],
    )


def _expunge_locked(
    conn: Connection, folder_id: int, folder: _Counters, uids: Sequence[int]
) -> None:
    """Remove placements, recording each with a new modseq (ascending uid)."""
    stamp = dt.datetime.now(dt.UTC)
    ordered = sorted(set(uids))
    if not ordered:
        return
    _INSERT_EXPUNGES.rows(
        conn,
        [
            {
                "folder_id": folder_id,
                "uid": uid,
                "modseq": folder.next_modseq(),
                "expunged_at": stamp,
            }
            for uid in ordered
        ],
    )
    for chunk in _chunks(ordered):
        _DELETE_PLACEMENTS.execute(conn, {"b_folder": folder_id, "b_uids": chunk})


async def _lock_mailbox(conn: AsyncConnection, mailbox_id: int) -> int:
    """Serialise changes to a mailbox's folder names; returns next_uidvalidity."""
    query = select(mailboxes.c.next_uidvalidity).where(mailboxes.c.id == mailbox_id)
    if _postgres(conn):
        query = query.with_for_update()
    return int(await conn.scalar(query) or 0)


async def _allocate_uidvalidity(conn: AsyncConnection, mailbox_id: int, count: int) -> int:
    """``count`` consecutive UIDVALIDITY values never used in this mailbox
    (RFC 9051 §2.3.1.1): creation time in seconds, pushed past every value the
    mailbox ever handed out. Call with the mailbox row locked."""
    floor = await _lock_mailbox(conn, mailbox_id)
    highest = await conn.scalar(
        select(func.max(folders.c.uidvalidity)).where(folders.c.mailbox_id == mailbox_id)
    )
    first = max(int(time.time()), floor, int(highest or 0) + 1)
    await conn.execute(
        update(mailboxes).where(mailboxes.c.id == mailbox_id).values(next_uidvalidity=first + count)
    )
    return first


def _normalise(name: str) -> str:
    """INBOX is case-insensitive, also as the first level of a name (RFC 9051 §5.1)."""
    head, sep, rest = name.partition(SEPARATOR)
    return "INBOX" + sep + rest if head.upper() == "INBOX" else name


def _check_name(name: str, *, top_level: bool) -> None:
    if (
        not name
        or len(name) > MAX_NAME
        or any(not part for part in name.split(SEPARATOR))
        or any(c in "%*" or ord(c) < 0x20 or ord(c) == 0x7F for c in name)
    ):
        raise MailStoreError("CANNOT", f"invalid folder name {name!r}")
    if top_level and name.split(SEPARATOR, 1)[0].casefold() == SHARED_PREFIX.casefold():
        raise MailStoreError("CANNOT", f"{SHARED_PREFIX} is reserved for shared mailboxes")


def _shared(address: str) -> str:
    return f"{SHARED_PREFIX}{SEPARATOR}{address}{SEPARATOR}"


def _parents(name: str) -> list[str]:
    parts = name.split(SEPARATOR)
    return [SEPARATOR.join(parts[:i]) for i in range(1, len(parts))]


class MailStore:
    """The store as IMAP sees it; see the module docstring for the invariants."""

    def __init__(
        self, engine: AsyncEngine, *, on_change: Callable[[FolderChange], None] | None = None
    ) -> None:
        self._engine = engine
        self._on_change = on_change

    def _emit(self, changes: Iterable[FolderChange]) -> None:
        if self._on_change is None:
            return
        for change in changes:
            try:
                self._on_change(change)
            except Exception:
                log.exception("change notification failed after commit")

    # -- namespaces -------------------------------------------------------------

    async def _namespaces(self, conn: AsyncConnection, account_id: int) -> list[_Namespace]:
        return await conn.run_sync(self._namespaces_sync, account_id)

    @staticmethod
    def _namespaces_sync(conn: Connection, account_id: int) -> list[_Namespace]:
        own = _OWN_MAILBOXES.rows(conn, {"b_account": account_id})
        spaces = [
            _Namespace(
                mailbox_id, address, OWNER_RIGHTS, "" if index == 0 else _shared(address), True
            )
            for index, (mailbox_id, address) in enumerate(own)
        ]
        for mailbox_id, address, rights in _DELEGATED_MAILBOXES.rows(
            conn, {"b_account": account_id}
        ):
            # RFC 4314 §4: without "l" the mailbox does not exist for this account.
            if "l" in rights:
                spaces.append(_Namespace(mailbox_id, address, rights, _shared(address), False))
        return spaces

    def _resolve(self, spaces: list[_Namespace], name: str) -> tuple[_Namespace, str]:
        """The namespace a presented name lives in, and the name as stored."""
        shared_root = SHARED_PREFIX + SEPARATOR
        if name == SHARED_PREFIX or name.startswith(shared_root):
            address, _, rest = name[len(shared_root) :].partition(SEPARATOR)
            for space in spaces:
                if space.prefix and space.address == address.lower():
                    if not rest:
                        raise MailStoreError("CANNOT", f"{name} is a shared namespace root")
                    return space, _normalise(rest)
            if not address:
                raise MailStoreError("CANNOT", f"{name} is a shared namespace root")
            raise MailStoreError("NONEXISTENT", f"no shared mailbox {address}")
        primary = next((space for space in spaces if not space.prefix), None)
        if primary is None:
            raise MailStoreError("NONEXISTENT", "this account has no active mailbox")
        return primary, _normalise(name)

    def _info(self, space: _Namespace, row: tuple[Any, ...]) -> FolderInfo:
        """``row``: the :data:`_FOLDER_COLUMNS` of one folder."""
        folder_id, _, name, special_use, subscribed, uidvalidity, uidnext, highestmodseq = row
        return FolderInfo(
            id=folder_id,
            mailbox_id=space.mailbox_id,
            mailbox_address=space.address,
            name=space.prefix + name,
            special_use=special_use,
            # Subscriptions live on the folder row, i.e. belong to the mailbox's
            # owner: a delegate's shared folders always show as subscribed.
            subscribed=bool(subscribed) or not space.owned,
            uidvalidity=uidvalidity,
            uidnext=uidnext,
            highestmodseq=highestmodseq,
            rights=space.rights,
        )

    async def folders(self, account_id: int) -> list[FolderInfo]:
        def work(conn: Connection) -> tuple[list[_Namespace], list[tuple[Any, ...]]]:
            spaces = self._namespaces_sync(conn, account_id)
            if not spaces:
                return [], []
            ids = [space.mailbox_id for space in spaces]
            return spaces, _FOLDERS_OF.rows(conn, {"b_mailboxes": ids})

        spaces, rows = await run_read(self._engine, work)
        by_mailbox = {space.mailbox_id: space for space in spaces}
        found = [self._info(by_mailbox[row[1]], row) for row in rows]
        order = {space.mailbox_id: index for index, space in enumerate(spaces)}
        # Each mailbox's INBOX first, then its folders by name.
        found.sort(
            key=lambda f: (
                order[f.mailbox_id],
                f.name != by_mailbox[f.mailbox_id].prefix + "INBOX",
                f.name,
            )
        )
        return found

    async def folder(self, account_id: int, name: str) -> FolderInfo | None:
        def work(conn: Connection) -> FolderInfo | None:
            try:
                space, stored = self._resolve(self._namespaces_sync(conn, account_id), name)
            except MailStoreError:
                return None
            found = _FOLDER_BY_NAME.rows(conn, {"b_mailbox": space.mailbox_id, "b_name": stored})
            return self._info(space, found[0]) if found else None

        return await run_read(self._engine, work)

    async def _resolve_for(
        self, conn: AsyncConnection, account_id: int, name: str, right: str
    ) -> tuple[_Namespace, str]:
        space, stored = self._resolve(await self._namespaces(conn, account_id), name)
        if right not in space.rights:
            raise MailStoreError("NOPERM", f"right {right!r} missing on {space.address}")
        return space, stored

    # -- folder management --------------------------------------------------------

    async def _insert_folders(
        self,
        conn: AsyncConnection,
        mailbox_id: int,
        names: Sequence[str],
        *,
        special_use: str | None = None,
        last_counters: tuple[int, int] = (1, 1),
    ) -> int:
        """Create ``names`` (the last one gets ``special_use`` and
        ``last_counters``: uidnext, highestmodseq); returns the last one's id."""
        first = await _allocate_uidvalidity(conn, mailbox_id, len(names))
        folder_id = 0
        for index, name in enumerate(names):
            last = index == len(names) - 1
            result = await conn.execute(
                insert(folders).values(
                    mailbox_id=mailbox_id,
                    name=name,
                    uidvalidity=first + index,
                    uidnext=last_counters[0] if last else 1,
                    highestmodseq=last_counters[1] if last else 1,
                    special_use=special_use if last else None,
                    subscribed=True,
                )
            )
            assert result.inserted_primary_key is not None
            folder_id = int(result.inserted_primary_key[0])
        return folder_id

    async def _existing_names(self, conn: AsyncConnection, mailbox_id: int) -> dict[str, int]:
        rows = await conn.execute(
            select(folders.c.name, folders.c.id).where(folders.c.mailbox_id == mailbox_id)
        )
        return {name: folder_id for name, folder_id in rows}

    async def create_folder(
        self, account_id: int, name: str, *, special_use: str | None = None
    ) -> FolderInfo:
        # RFC 9051 §6.3.4: a trailing separator only declares the intent to create children.
        if name.endswith(SEPARATOR):
            name = name[:-1]
        try:
            async with write_transaction(self._engine) as conn:
                space, stored = await self._resolve_for(conn, account_id, name, "k")
                _check_name(stored, top_level=not space.prefix)
                await _lock_mailbox(conn, space.mailbox_id)
                existing = await self._existing_names(conn, space.mailbox_id)
                if stored in existing:
                    raise MailStoreError("ALREADYEXISTS", f"{name} already exists")
                # RFC 9051 §6.3.4: create the superior names the new one needs.
                missing = [p for p in _parents(stored) if p not in existing]
                await self._insert_folders(
                    conn, space.mailbox_id, [*missing, stored], special_use=special_use
                )
        except IntegrityError:
            raise MailStoreError("ALREADYEXISTS", f"{name} was created concurrently") from None
        info = await self.folder(account_id, name)
        if info is None:
            raise MailStoreError("NONEXISTENT", f"{name} was deleted concurrently")
        return info

    async def delete_folder(self, account_id: int, name: str) -> None:
        async with write_transaction(self._engine) as conn:
            space, stored = await self._resolve_for(conn, account_id, name, "x")
            if stored == "INBOX":
                raise MailStoreError("CANNOT", "INBOX cannot be deleted")  # RFC 9051 §6.3.5
            floor = await _lock_mailbox(conn, space.mailbox_id)
            existing = await self._existing_names(conn, space.mailbox_id)
            folder_id = existing.get(stored)
            if folder_id is None:
                raise MailStoreError("NONEXISTENT", f"no folder {name}")
            if any(other.startswith(stored + SEPARATOR) for other in existing):
                # RFC 9051 §6.3.5: refusing is allowed; HASCHILDREN says why.
                raise MailStoreError("HASCHILDREN", f"{name} has subfolders: delete them first")
            await conn.run_sync(_lock_folders, [folder_id])
            uidvalidity = int(
                await conn.scalar(select(folders.c.uidvalidity).where(folders.c.id == folder_id))
                or 0
            )
            # One SUM over the rows this deletes anyway: the mailbox's room comes back.
            freed = await conn.scalar(
                select(func.coalesce(func.sum(placements.c.size), 0)).where(
                    placements.c.folder_id == folder_id
                )
            )
            await conn.run_sync(quotas.release, folder_id, int(freed or 0))
            await conn.execute(delete(placements).where(placements.c.folder_id == folder_id))
            await conn.execute(delete(expunges).where(expunges.c.folder_id == folder_id))
            await conn.execute(delete(folders).where(folders.c.id == folder_id))
            # A folder created again under this name must get a new UIDVALIDITY.
            await conn.execute(
                update(mailboxes)
                .where(mailboxes.c.id == space.mailbox_id)
                .values(next_uidvalidity=max(floor, uidvalidity + 1))
            )
        self._emit([FolderChange(folder_id, 0, "resync")])

    async def rename_folder(self, account_id: int, old: str, new: str) -> None:
        if new.endswith(SEPARATOR):
            new = new[:-1]
        changes: list[FolderChange] = []
        try:
            async with write_transaction(self._engine) as conn:
                spaces = await self._namespaces(conn, account_id)
                space, source = self._resolve(spaces, old)
                target_space, target = self._resolve(spaces, new)
                if target_space.mailbox_id != space.mailbox_id:
                    raise MailStoreError("CANNOT", "folders cannot move between mailboxes")
                for right in "xk":  # RFC 4314 §4: RENAME needs x on old, k on the new parent
                    if right not in space.rights:
                        raise MailStoreError(
                            "NOPERM", f"right {right!r} missing on {space.address}"
                        )
                _check_name(target, top_level=not space.prefix)
                if target == source or target.startswith(source + SEPARATOR):
                    raise MailStoreError("CANNOT", f"cannot rename {old} into itself")
                await _lock_mailbox(conn, space.mailbox_id)
                existing = await self._existing_names(conn, space.mailbox_id)
                if source not in existing:
                    raise MailStoreError("NONEXISTENT", f"no folder {old}")
                if target in existing:
                    raise MailStoreError("ALREADYEXISTS", f"{new} already exists")
                missing = [p for p in _parents(target) if p not in existing]
                if source == "INBOX":
                    changes = await self._rename_inbox(
                        conn, space, existing["INBOX"], missing, target
                    )
                else:
                    changes = await self._rename_tree(
                        conn, space, existing, source, target, missing
                    )
        except IntegrityError:
            raise MailStoreError("ALREADYEXISTS", f"{new} was created concurrently") from None
        self._emit(changes)

    async def _rename_inbox(
        self,
        conn: AsyncConnection,
        space: _Namespace,
        inbox_id: int,
        missing: list[str],
        target: str,
    ) -> list[FolderChange]:
        """RFC 9051 §6.3.6: renaming INBOX moves its messages to a new folder and
        leaves INBOX, empty, in place; INBOX's subfolders stay where they are."""
        counters = (await conn.run_sync(_lock_folders, [inbox_id]))[inbox_id]
        new_id = await self._insert_folders(
            conn,
            space.mailbox_id,
            [*missing, target],
            last_counters=(counters.uidnext, counters.highestmodseq),
        )
        uids = list(
            await conn.scalars(
                select(placements.c.uid)
                .where(placements.c.folder_id == inbox_id)
                .order_by(placements.c.uid)
            )
        )
        # The messages keep their UIDs and modseqs in the new folder (new UIDVALIDITY).
        await conn.execute(
            update(placements).where(placements.c.folder_id == inbox_id).values(folder_id=new_id)
        )
        stamp = dt.datetime.now(dt.UTC)
        if uids:
            await conn.execute(
                insert(expunges),
                [
                    {
                        "folder_id": inbox_id,
                        "uid": uid,
                        "modseq": counters.next_modseq(),
                        "expunged_at": stamp,
                    }
                    for uid in uids
                ],
            )
        await conn.run_sync(_save, {inbox_id: counters})
        return [FolderChange(inbox_id, counters.highestmodseq, "expunge")]

    async def _rename_tree(
        self,
        conn: AsyncConnection,
        space: _Namespace,
        existing: dict[str, int],
        source: str,
        target: str,
        missing: list[str],
    ) -> list[FolderChange]:
        """RFC 9051 §6.3.6: the folder and its subfolders move; each gets a new
        UIDVALIDITY (clients must not trust caches keyed by the old name)."""
        moved = sorted(
            (name, folder_id)
            for name, folder_id in existing.items()
            if name == source or name.startswith(source + SEPARATOR)
        )
        renamed = {name: target + name[len(source) :] for name, _ in moved}
        if any(new_name in existing for new_name in renamed.values()):
            raise MailStoreError("ALREADYEXISTS", f"a subfolder of {target} already exists")
        if missing:
            await self._insert_folders(conn, space.mailbox_id, missing)
        first = await _allocate_uidvalidity(conn, space.mailbox_id, len(moved))
        for index, (name, folder_id) in enumerate(moved):
            await conn.execute(
                update(folders)
                .where(folders.c.id == folder_id)
                .values(name=renamed[name], uidvalidity=first + index)
            )
        return [FolderChange(folder_id, 0, "resync") for _, folder_id in moved]

    async def set_subscribed(self, account_id: int, name: str, subscribed: bool) -> None:
        async with write_transaction(self._engine) as conn:
            space, stored = self._resolve(await self._namespaces(conn, account_id), name)
            where = (folders.c.mailbox_id == space.mailbox_id, folders.c.name == stored)
            if await conn.scalar(select(folders.c.id).where(*where)) is None:
                raise MailStoreError("NONEXISTENT", f"no folder {name}")
            # Subscriptions live on the folder row, so they are the owner's: a
            # delegate's (un)subscription is accepted and not stored.
            if space.owned:
                await conn.execute(update(folders).where(*where).values(subscribed=subscribed))

    # -- reading ---------------------------------------------------------------------

    async def snapshot(self, folder_id: int) -> FolderSnapshot:
        """One statement, so one consistent view on either backend."""
        rows = await run_read(
            self._engine, lambda conn: _SNAPSHOT.rows(conn, {"b_folder": folder_id})
        )
        if not rows:
            raise MailStoreError("NONEXISTENT", f"no folder {folder_id}")
        uidvalidity, uidnext, highestmodseq = rows[0][0], rows[0][1], rows[0][2]
        messages = tuple(
            (row[3], parse_flags(row[4]), row[5]) for row in rows if row[3] is not None
        )
        return FolderSnapshot(uidvalidity, uidnext, highestmodseq, messages)

    @staticmethod
    def _message_row(row: Any) -> MessageRow:
        return MessageRow(row[0], parse_flags(row[1]), row[2], as_utc(row[3]), row[4], row[5])

    async def messages(self, folder_id: int, uids: Sequence[int]) -> list[MessageRow]:
        """The rows of these UIDs (those still in the folder), ascending."""
        if not uids:
            return []
        low, high = min(uids), max(uids)

        def work(conn: Connection) -> list[MessageRow]:
            if high - low + 1 <= _SPARSE * len(uids) + 64:
                # A dense set (a whole folder, the newest messages): one range
                # query rather than lists of parameters.
                wanted = set(uids)
                rows = _MESSAGES_BETWEEN.rows(
                    conn, {"b_folder": folder_id, "b_low": low, "b_high": high}
                )
                return [self._message_row(row) for row in rows if row[0] in wanted]
            found: list[MessageRow] = []
            for chunk in _chunks(uids):
                rows = _MESSAGES_IN.rows(conn, {"b_folder": folder_id, "b_uids": chunk})
                found.extend(self._message_row(row) for row in rows)
            return found

        return await run_read(self._engine, work)

    async def blobs(self, digests: Sequence[str], *, octets: int | None = None) -> dict[str, bytes]:
        """Several messages' bytes in one query (a FETCH of many bodies);
        ``octets``, when the caller knows it, is their total size (a small
        read is done without leaving the event loop, ``run_read``)."""
        wanted = sorted(set(digests))

        def work(conn: Connection) -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            for start in range(0, len(wanted), _CHUNK):
                rows = _BLOBS.rows(conn, {"b_digests": wanted[start : start + _CHUNK]})
                found.update((sha, bytes(data)) for sha, data in rows)
            return found

        small = octets is not None and octets <= _INLINE_OCTETS
        return await run_read(self._engine, work, small=small)

    async def blob_heads(self, digests: Sequence[str], limit: int) -> dict[str, bytes]:
        """The first ``limit`` octets of several messages in one query each
        :data:`_CHUNK` (their headers, without the bodies)."""
        wanted = sorted(set(digests))

        def work(conn: Connection) -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            for start in range(0, len(wanted), _CHUNK):
                rows = _BLOB_HEADS.rows(
                    conn, {"b_digests": wanted[start : start + _CHUNK], "b_limit": limit}
                )
                found.update((sha, bytes(data)) for sha, data in rows)
            return found

        return await run_read(self._engine, work, small=len(wanted) * limit <= _INLINE_OCTETS)

    async def blob(self, sha256: str) -> bytes:
        data = (await self.blobs([sha256])).get(sha256)
        if data is None:
            raise MailStoreError("NONEXISTENT", f"no message blob {sha256}")
        return data

    async def changes_since(
        self, folder_id: int, modseq: int
    ) -> tuple[list[MessageRow], list[int]]:
        """RFC 7162 §3.1.4.1 CHANGEDSINCE and §3.2.5.2 VANISHED: messages whose
        modseq is above ``modseq``, and UIDs expunged above it (ascending)."""
        changed, vanished, _ = await self.changes(folder_id, modseq)
        return changed, vanished

    async def changes(self, folder_id: int, modseq: int) -> tuple[list[MessageRow], list[int], int]:
        """:meth:`changes_since`, and the highest modseq among those changes and
        expunges (``modseq`` when there are none): where a reader that applied
        them all stands."""
        where = {"b_folder": folder_id, "b_modseq": modseq}

        def work(conn: Connection) -> tuple[list[MessageRow], list[Any]]:
            changed = [self._message_row(row) for row in _CHANGED.rows(conn, where)]
            return changed, _EXPUNGED.rows(conn, where)

        # Both statements must see the same committed state.
        changed, expunged = await run_read(self._engine, work, snapshot=True)
        highest = max([modseq, *(row.modseq for row in changed), *(m for _, m in expunged)])
        return changed, sorted({uid for uid, _ in expunged}), highest

    async def usage(self, mailbox_id: int) -> int:
        """Octets stored in the mailbox's folders (RFC 9208 STORAGE counts KiB): its
        usage counter, kept by every writer (quota.py)."""
        async with self._engine.connect() as conn:
            used, _ = await quotas.read(conn, mailbox_id)
        return used

    # -- writing messages ------------------------------------------------------------

    async def store_flags(
        self,
        folder_id: int,
        uids: Sequence[int],
        *,
        mode: Literal["set", "add", "remove"],
        flags: frozenset[str],
        unchanged_since: int | None = None,
    ) -> StoreResult:
        """RFC 9051 §6.4.6 STORE with RFC 7162 §3.1.3 UNCHANGEDSINCE. UIDs not in
        the folder (expunged meanwhile) are ignored."""
        requested = parse_flags(format_flags(flags))

        def work(conn: Connection) -> tuple[StoreResult, FolderChange]:
            updated: list[FlagState] = []
            unchanged: list[FlagState] = []
            modified: list[int] = []
            counters = _lock_folders(conn, [folder_id])
            folder = counters[folder_id]
            since = folder.highestmodseq
            for chunk in _chunks(uids):
                rows = _PLACEMENT_FLAGS.rows(conn, {"b_folder": folder_id, "b_uids": chunk})
                for uid, stored, modseq in rows:
                    current = parse_flags(stored)
                    if unchanged_since is not None and modseq > unchanged_since:
                        modified.append(uid)
                        continue
                    if mode == "set":
                        wanted = requested
                    elif mode == "add":
                        wanted = current | requested
                    else:
                        wanted = current - requested
                    if wanted == current:
                        unchanged.append(FlagState(uid, current, modseq))
                    else:
                        updated.append(FlagState(uid, wanted, folder.next_modseq()))
            if updated:
                _SET_FLAGS.execute_many(
                    conn,
                    [
                        {
                            "b_folder": folder_id,
                            "b_uid": s.uid,
                            "b_flags": format_flags(s.flags),
                            "b_modseq": s.modseq,
                        }
                        for s in updated
                    ],
                )
                _save(conn, counters)
            result = StoreResult(tuple(updated), tuple(unchanged), tuple(modified))
            change = FolderChange(
                folder_id, folder.highestmodseq, "flags", FolderDelta(since, result.updated)
            )
            return result, change

        result, change = await run_write(self._engine, work, small=small_write(len(uids)))
        if result.updated:
            self._emit([change])
        return result

    async def expunge(self, folder_id: int, *, uids: Sequence[int] | None = None) -> list[int]:
        """RFC 9051 §6.4.3 EXPUNGE, or RFC 4315 §2.1 UID EXPUNGE when ``uids`` is given."""

        def work(conn: Connection) -> tuple[list[int], int, int]:
            counters = _lock_folders(conn, [folder_id])
            since = counters[folder_id].highestmodseq
            candidates: list[tuple[int, str, int]] = []
            if uids is None:
                candidates.extend(_DELETED.rows(conn, {"b_folder": folder_id}))
            else:
                for chunk in _chunks(uids):
                    candidates.extend(
                        _DELETED_IN.rows(conn, {"b_folder": folder_id, "b_uids": chunk})
                    )
            sizes = {uid: size for uid, stored, size in candidates if "\\Deleted" in stored.split()}
            doomed = sorted(sizes)
            if doomed:
                _expunge_locked(conn, folder_id, counters[folder_id], doomed)
                _save(conn, counters)
                quotas.release(conn, folder_id, sum(sizes.values()))
            return doomed, since, counters[folder_id].highestmodseq

        small = uids is not None and small_write(len(uids))
        doomed, since, highest = await run_write(self._engine, work, small=small)
        if doomed:
            delta = FolderDelta(since, vanished=tuple(doomed))
            self._emit([FolderChange(folder_id, highest, "expunge", delta)])
        return doomed

    async def copy(
        self, src_folder_id: int, uids: Sequence[int], dst_folder_id: int
    ) -> list[tuple[int, int]]:
        """RFC 9051 §6.4.7 COPY; the pairs make RFC 4315 COPYUID (ascending source
        UIDs, destination UIDs allocated in the same order)."""
        return await self._transfer(src_folder_id, uids, dst_folder_id, move=False)

    async def move(
        self, src_folder_id: int, uids: Sequence[int], dst_folder_id: int
    ) -> list[tuple[int, int]]:
        """RFC 6851 MOVE: the copy and the expunge commit together or not at all."""
        return await self._transfer(src_folder_id, uids, dst_folder_id, move=True)

    async def _transfer(
        self, src: int, uids: Sequence[int], dst: int, *, move: bool
    ) -> list[tuple[int, int]]:
        def work(conn: Connection) -> tuple[list[tuple[int, int]], list[FolderChange]]:
            pairs: list[tuple[int, int]] = []
            counters = _lock_folders(conn, [src, dst])
            before = {folder: counters[folder].highestmodseq for folder in (src, dst)}
            target = counters[dst]
            rows: list[Any] = []
            for chunk in _chunks(uids):
                rows.extend(_TRANSFERRED.rows(conn, {"b_folder": src, "b_uids": chunk}))
            if not rows:
                return [], []
            usage = quotas.lock_for_folders(conn, [src, dst])
            total = sum(int(row[4]) for row in rows)
            if not (move and usage[src] is usage[dst]):
                # RFC 9208 §4.3.1: refused if the target's quota root would go over.
                # A MOVE inside one mailbox adds nothing: allowed even over quota
                # (to Trash, say), so that a full mailbox can be tidied.
                usage[dst].take(total)
                if move:
                    usage[src].add(-total)
                quotas.save(conn, usage.values())
            new_rows = []
            for uid, sha, flags, internal_date, size in rows:
                new_uid = target.next_uid()
                pairs.append((uid, new_uid))
                new_rows.append(
                    {
                        "folder_id": dst,
                        "uid": new_uid,
                        "blob_sha256": sha,
                        "flags": flags,
                        "modseq": target.next_modseq(),
                        "internal_date": internal_date,
                        "size": size,
                    }
                )
            if move:
                # Remove first: with src == dst the new rows must not be expunged.
                _expunge_locked(conn, src, counters[src], [uid for uid, _ in pairs])
            _INSERT_PLACEMENTS.rows(conn, new_rows)
            _save(conn, counters)
            added = tuple(
                FlagState(row["uid"], parse_flags(row["flags"]), row["modseq"]) for row in new_rows
            )
            gone = tuple(uid for uid, _ in pairs) if move else ()
            if src == dst:
                delta = FolderDelta(before[dst], added, gone)
                kind: Literal["exists", "expunge"] = "expunge" if move else "exists"
                return pairs, [FolderChange(dst, target.highestmodseq, kind, delta)]
            changes = [
                FolderChange(dst, target.highestmodseq, "exists", FolderDelta(before[dst], added))
            ]
            if move:
                delta = FolderDelta(before[src], vanished=gone)
                changes.append(FolderChange(src, counters[src].highestmodseq, "expunge", delta))
            return pairs, changes

        try:
            pairs, changes = await run_write(self._engine, work)
        except OverQuota as refused:
            raise MailStoreError("OVERQUOTA", refused.text) from None
        self._emit(changes)
        return pairs

    async def append(
        self,
        folder_id: int,
        content: bytes,
        *,
        flags: frozenset[str],
        internal_date: dt.datetime,
    ) -> int:
        """RFC 9051 §6.3.12 APPEND; returns the new UID (RFC 4315 APPENDUID)."""
        (uid,) = await self.append_many(folder_id, [(content, flags, internal_date)])
        return uid

    async def append_many(
        self,
        folder_id: int,
        messages: Sequence[tuple[bytes, frozenset[str], dt.datetime]],
    ) -> list[int]:
        """MULTIAPPEND (RFC 3502 §6.3.11): every message or none, in one
        transaction; returns the new UIDs in order."""
        if any(moment.tzinfo is None for _, _, moment in messages):
            raise ValueError("internal_date must be timezone-aware")
        now = dt.datetime.now(dt.UTC)
        digests = [hashlib.sha256(content).hexdigest() for content, _, _ in messages]

        def work(conn: Connection) -> tuple[list[int], FolderChange]:
            # The blobs first, then the folder lock: the group committer's order.
            INSERT_BLOB.rows(
                conn,
                [
                    {"sha256": sha, "size": len(content), "data": content, "created_at": now}
                    for sha, (content, _, _) in dict(zip(digests, messages, strict=True)).items()
                ],
            )
            counters = _lock_folders(conn, [folder_id])
            folder = counters[folder_id]
            since = folder.highestmodseq
            # RFC 9208 §4.3.1, RFC 3502 §6.3.11: the whole MULTIAPPEND fits, or none of it.
            usage = quotas.lock_for_folders(conn, [folder_id])[folder_id]
            usage.take(sum(len(content) for content, _, _ in messages))
            quotas.save(conn, [usage])
            added = tuple(
                FlagState(folder.next_uid(), parse_flags(format_flags(flags)), folder.next_modseq())
                for _, flags, _ in messages
            )
            rows = [
                {
                    "folder_id": folder_id,
                    "uid": state.uid,
                    "blob_sha256": sha,
                    "flags": format_flags(state.flags),
                    "modseq": state.modseq,
                    "internal_date": moment.astimezone(dt.UTC),
                    "size": len(content),
                }
                for state, sha, (content, _, moment) in zip(added, digests, messages, strict=True)
            ]
            _INSERT_PLACEMENTS.rows(conn, rows)
            _save(conn, counters)
            delta = FolderDelta(since, added)
            uids = [state.uid for state in added]
            return uids, FolderChange(folder_id, folder.highestmodseq, "exists", delta)

        try:
            small = small_write(len(messages), sum(len(content) for content, _, _ in messages))
            uids, change = await run_write(self._engine, work, small=small)
        except OverQuota as refused:
            raise MailStoreError("OVERQUOTA", refused.text) from None
        self._emit([change])
        return uids

    # -- access control lists (RFC 4314) and quotas (RFC 9208) ------------------------

    async def acl(self, mailbox_id: int) -> list[tuple[str, str]]:
        """RFC 4314 §3.3 GETACL: (login, rights) of the owning account, which holds
        every right, then of each delegate by login. Identifiers are account logins."""
        async with self._engine.connect() as conn:
            owner = await conn.scalar(
                select(accounts.c.login)
                .select_from(mailboxes.join(accounts, accounts.c.id == mailboxes.c.account_id))
                .where(mailboxes.c.id == mailbox_id)
            )
            rows = await conn.execute(
                select(accounts.c.login, delegations.c.rights)
                .join(accounts, accounts.c.id == delegations.c.account_id)
                .where(delegations.c.mailbox_id == mailbox_id)
                .order_by(accounts.c.login)
            )
            entries = [(str(login), str(rights)) for login, rights in rows]
        if owner is None:
            raise MailStoreError("NONEXISTENT", f"no mailbox {mailbox_id}")
        return [(str(owner), OWNER_RIGHTS), *entries]

    async def set_acl(
        self,
        account_id: int,
        name: str,
        identifier: str,
        *,
        mode: Literal["replace", "add", "remove", "delete"],
        rights: str,
        actor: str,
        remote: str,
    ) -> str:
        """RFC 4314 §3.1 SETACL and §3.2 DELETEACL on the mailbox that holds folder
        ``name``: the rights of one delegate (an account login) on the whole mailbox,
        which must be an ORG or CAB mailbox. Needs the "a" right; the owner's rights
        never change. Empty resulting rights remove the delegation. The change and
        its audit record ("acl.set" / "acl.delete") commit together. Returns the
        delegate's rights afterwards ("" when none)."""
        async with write_transaction(self._engine) as conn:
            space, stored = await self._resolve_for(conn, account_id, name, "a")
            if not await conn.scalar(
                select(folders.c.id).where(
                    folders.c.mailbox_id == space.mailbox_id, folders.c.name == stored
                )
            ):
                raise MailStoreError("NONEXISTENT", f"no folder {name}")
            await _lock_mailbox(conn, space.mailbox_id)
            mailbox = (
                await conn.execute(
                    select(mailboxes.c.bal_type, mailboxes.c.account_id).where(
                        mailboxes.c.id == space.mailbox_id
                    )
                )
            ).one()
            login = identifier.lower()
            target = await conn.scalar(select(accounts.c.id).where(accounts.c.login == login))
            if target is None:
                raise MailStoreError("NONEXISTENT", f"no account {identifier}")
            if target == mailbox.account_id:
                raise MailStoreError("CANNOT", "the owner's rights on its mailbox cannot change")
            if mailbox.bal_type not in ("ORG", "CAB"):
                raise MailStoreError("CANNOT", "only ORG and CAB mailboxes are shared")
            where = (
                delegations.c.mailbox_id == space.mailbox_id,
                delegations.c.account_id == target,
            )
            previous = await conn.scalar(select(delegations.c.rights).where(*where))
            current = set(previous or "")
            if mode == "replace":
                wanted = set(rights)
            elif mode == "add":
                wanted = current | set(rights)
            elif mode == "remove":
                wanted = current - set(rights)
            else:
                wanted = set()
            result = "".join(r for r in OWNER_RIGHTS if r in wanted)
            if not result:
                await conn.execute(delete(delegations).where(*where))
            elif previous is None:
                await conn.execute(
                    insert(delegations).values(
                        mailbox_id=space.mailbox_id,
                        account_id=target,
                        rights=result,
                        may_send=False,  # sending as the mailbox is granted by an administrator
                        created_at=dt.datetime.now(dt.UTC),
                    )
                )
            else:
                await conn.execute(update(delegations).where(*where).values(rights=result))
            await insert_audit(
                conn,
                AuditEvent(
                    actor=actor,
                    action="acl.delete" if mode == "delete" else "acl.set",
                    target=space.address,
                    remote=remote,
                    details={"account": login, "rights": result, "previous": previous or ""},
                ),
            )
        return result

    async def quota(self, account_id: int, root: str) -> QuotaInfo | None:
        """RFC 9208 §3.2, §4.1.1: the quota root of one mailbox (BAL) the account may see,
        named by the mailbox's address; None when it has no such root."""
        async with self._engine.connect() as conn:
            spaces = await self._namespaces(conn, account_id)
            space = next((s for s in spaces if s.address == root.lower()), None)
            if space is None:
                return None
            used, limit = await quotas.read(conn, space.mailbox_id)
        return QuotaInfo(space.address, used, limit)
