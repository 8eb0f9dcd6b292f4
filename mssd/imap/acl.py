"""Access control lists (RFC 4314: MYRIGHTS, GETACL, LISTRIGHTS, SETACL,
DELETEACL) and quotas (RFC 9208: GETQUOTAROOT, GETQUOTA).

Rights belong to a whole mailbox (BAL), not to one folder: every folder of an
ORG or CAB mailbox shows its delegate the rights of their ``delegations`` row,
and changing the ACL of any folder changes that row. Identifiers are account
logins; the owning account always holds every right (``OWNER_RIGHTS``).

Quota roots are mailboxes, named by their address; the only resource is
STORAGE (RFC 9208 §5.1), counted in KiB over every folder of the mailbox.

It must never change a delegation except through ``MailStore.set_acl``, which
checks the "a" right and writes the audit record in the same transaction.
"""

from __future__ import annotations

from typing import Literal

from mssd.imap.commands import AclArgs, Command, MailboxArgs, QuotaRootArgs, SetAclArgs
from mssd.imap.encode import Atom, ImapValue
from mssd.imap.mailboxes import find_folder, name_out
from mssd.imap.session import Session
from mssd.store.mailstore import OWNER_RIGHTS, MailStoreError
from mssd.store.quota import QuotaInfo

# RFC 4314 §2.1.1: the obsolete "c" (create) is k and x, "d" (delete) is e and t.
_VIRTUAL = {"c": "kx", "d": "et"}


def rights_out(rights: str) -> ImapValue:
    """Rights as MYRIGHTS and ACL answer them: with "c" when k or x is held and
    "d" when e or t is (RFC 4314 §2.1.1); an atom, or "" when there are none."""
    out = "".join(r for r in OWNER_RIGHTS if r in rights)
    for virtual, members in _VIRTUAL.items():
        if set(members) & set(rights):
            out += virtual
    return Atom(out) if out else ""


def rights_in(text: str) -> str | None:
    """Rights a client sent, with "c" and "d" expanded; None when a right is unknown."""
    rights = set()
    for right in text:
        if right in _VIRTUAL:
            rights |= set(_VIRTUAL[right])
        elif right in OWNER_RIGHTS:
            rights.add(right)
        else:
            return None
    return "".join(r for r in OWNER_RIGHTS if r in rights)


async def cmd_myrights(session: Session, command: Command) -> None:
    """RFC 4314 §3.5: any right on the mailbox lets one ask for one's own."""
    assert isinstance(command.args, MailboxArgs)
    folder = await find_folder(session, command, command.args.mailbox)
    if folder is None:
        return
    await session.untagged(
        Atom("MYRIGHTS"), name_out(session, command.args.mailbox), rights_out(folder.rights)
    )
    await session.tagged(command, "OK", "MYRIGHTS completed")


async def cmd_getacl(session: Session, command: Command) -> None:
    """RFC 4314 §3.3; §4: needs the "a" right."""
    assert isinstance(command.args, MailboxArgs)
    folder = await find_folder(session, command, command.args.mailbox, needs="a")
    if folder is None:
        return
    values: list[ImapValue] = []
    for login, rights in await session.services.mailstore.acl(folder.mailbox_id):
        values += [login, rights_out(rights)]
    await session.untagged(Atom("ACL"), name_out(session, command.args.mailbox), *values)
    await session.tagged(command, "OK", "GETACL completed")


async def cmd_listrights(session: Session, command: Command) -> None:
    """RFC 4314 §3.4: the owner holds every right, tied together; anyone else
    may be given each right on its own. §4: needs the "a" right."""
    assert isinstance(command.args, AclArgs)
    folder = await find_folder(session, command, command.args.mailbox, needs="a")
    if folder is None:
        return
    acl = await session.services.mailstore.acl(folder.mailbox_id)
    owner = acl[0][0]
    identifier = command.args.identifier
    values: list[ImapValue]
    if identifier.lower() == owner:
        values = [rights_out(OWNER_RIGHTS)]
    else:
        values = ["", *(Atom(r) for r in OWNER_RIGHTS), *(Atom(v) for v in _VIRTUAL)]
    await session.untagged(
        Atom("LISTRIGHTS"), name_out(session, command.args.mailbox), identifier, *values
    )
    await session.tagged(command, "OK", "LISTRIGHTS completed")


async def cmd_setacl(session: Session, command: Command) -> None:
    """RFC 4314 §3.1 SETACL and §3.2 DELETEACL."""
    assert session.principal is not None
    args = command.args
    mode: Literal["replace", "add", "remove", "delete"]
    if isinstance(args, SetAclArgs):
        rights = rights_in(args.rights)
        if rights is None:
            # RFC 4314 §3.1: an unrecognised right MUST get BAD.
            await session.tagged(command, "BAD", f"Unknown right in {args.rights!r}")
            return
        mode = args.action
    else:
        assert isinstance(args, AclArgs)
        rights, mode = "", "delete"
    if args.identifier.startswith("-") or args.identifier.lower() in ("anyone", "anonymous"):
        await session.tagged(
            command, "NO", "Only rights of accounts can be set (no negative rights)", "CANNOT"
        )
        return
    folder = await find_folder(session, command, args.mailbox)
    if folder is None:
        return
    try:
        await session.services.mailstore.set_acl(
            session.principal.account_id,
            args.mailbox,
            args.identifier,
            mode=mode,
            rights=rights,
            actor=session.principal.login,
            remote=session.remote_ip,
        )
    except MailStoreError as error:
        await session.tagged(command, "NO", error.text, error.code)
        return
    await session.tagged(command, "OK", f"{command.name} completed")


# -- QUOTA (RFC 9208) --------------------------------------------------------------------


async def _send_quota(session: Session, quota: QuotaInfo) -> None:
    resources: list[ImapValue] = []
    if quota.limit_kib is not None:
        # RFC 9208 §5.1: STORAGE in units of 1024 octets; usage rounds up, the limit
        # down, as it is enforced (mssd/store/quota.py).
        resources = [Atom("STORAGE"), quota.used_kib, quota.limit_kib]
    await session.untagged(Atom("QUOTA"), quota.root, resources)


async def cmd_getquotaroot(session: Session, command: Command) -> None:
    """RFC 9208 §4.1.2: the mailbox's one root, then that root's usage."""
    assert isinstance(command.args, MailboxArgs) and session.principal is not None
    folder = await find_folder(session, command, command.args.mailbox)
    if folder is None:
        return
    quota = await session.services.mailstore.quota(
        session.principal.account_id, folder.mailbox_address
    )
    if quota is None:
        await session.tagged(command, "NO", "No quota root for this mailbox", "NONEXISTENT")
        return
    await session.untagged(Atom("QUOTAROOT"), name_out(session, command.args.mailbox), quota.root)
    await _send_quota(session, quota)
    await session.tagged(command, "OK", "GETQUOTAROOT completed")


async def cmd_getquota(session: Session, command: Command) -> None:
    """RFC 9208 §4.1.1 (roots are opaque names, §3.2): here the addresses of the
    mailboxes one may use."""
    assert isinstance(command.args, QuotaRootArgs) and session.principal is not None
    quota = await session.services.mailstore.quota(session.principal.account_id, command.args.root)
    if quota is None:
        await session.tagged(command, "NO", f"No quota root {command.args.root}", "NONEXISTENT")
        return
    await _send_quota(session, quota)
    await session.tagged(command, "OK", "GETQUOTA completed")
