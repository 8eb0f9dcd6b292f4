"""Mailbox commands: SELECT, EXAMINE, CREATE, DELETE, RENAME, (UN)SUBSCRIBE,
LIST, LSUB, NAMESPACE, STATUS (RFC 9051 §6.3, RFC 5258, RFC 5819, RFC 6154).

Folder names reach this module decoded (``protocol``) and leave it encoded
for the session (modified UTF-7, or UTF-8 once enabled). What differs in
IMAP4rev2 sessions (SELECT without RECENT and UNSEEN but with the mailbox's
LIST, \\NonExistent, no STATUS RECENT) is decided here, per session."""

from __future__ import annotations

import bisect
import re
from collections.abc import Awaitable, Iterable

from mssd.imap import encode
from mssd.imap.commands import (
    Command,
    CreateArgs,
    ListArgs,
    MailboxArgs,
    RenameArgs,
    SelectArgs,
    StatusArgs,
)
from mssd.imap.encode import Atom, ImapValue
from mssd.imap.names import denormalised, encode_mailbox_name, forbidden_character
from mssd.imap.session import Session
from mssd.imap.view import SelectedView
from mssd.store.mailstore import SEPARATOR, SHARED_PREFIX, FolderInfo, MailStoreError

# Rights that make a selected folder writable (RFC 4314 §4).
_WRITE_RIGHTS = set("swte")

_NO_RECENT = "RECENT is not a STATUS item in IMAP4rev2 (RFC 9051 section 6.3.11)"


def name_out(session: Session, name: str) -> str:
    return encode_mailbox_name(name, session.utf8)


async def refuse(session: Session, command: Command, error: MailStoreError) -> None:
    await session.tagged(command, "NO", error.text, error.code)


async def find_folder(
    session: Session, command: Command, name: str, *, needs: str = ""
) -> FolderInfo | None:
    """The folder, or None once the command is answered: NO [NONEXISTENT] when
    the account cannot see it, NO [NOPERM] when it lacks the ``needs`` right
    (RFC 4314 §4 lists which command needs which right)."""
    assert session.principal is not None
    folder = await session.services.mailstore.folder(session.principal.account_id, name)
    if folder is None or "l" not in folder.rights:
        await session.tagged(command, "NO", f"No mailbox {name}", "NONEXISTENT")
        return None
    if needs and needs not in folder.rights:
        await session.tagged(command, "NO", f"The {needs} right is needed on {name}", "NOPERM")
        return None
    return folder


async def cmd_select(session: Session, command: Command) -> None:
    assert isinstance(command.args, SelectArgs)
    examine = command.name == "EXAMINE"
    closing = session.view is not None
    session.leave_folder()
    if closing and (session.rev2 or "QRESYNC" in session.enabled):
        # RFC 9051 §6.3.2, RFC 7162 §3.2.11: what follows is about the new mailbox,
        # even if it cannot be selected.
        await session.send(encode.untagged_status("OK", "CLOSED", "Previous mailbox closed"))
    folder = await find_folder(session, command, command.args.mailbox, needs="r")
    if folder is None:
        return
    index = await session.services.indexes.acquire(folder.id)
    readonly = examine or not (_WRITE_RIGHTS & set(folder.rights))
    view = SelectedView(folder, readonly, index.state)
    session.select(view, index)  # from here, leaving the folder releases the index
    view.condstore = (
        command.args.condstore or command.args.qresync is not None or "CONDSTORE" in session.enabled
    )
    if command.args.condstore:
        session.enabled.add("CONDSTORE")
    flags = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"]
    # Over the distinct flag sets (a folder has few), not every message.
    distinct = view.distinct_flags()
    keywords = sorted({f for fl in distinct for f in fl if not f.startswith("\\")})
    await session.untagged(Atom("FLAGS"), encode.flag_list(flags + keywords))
    await session.send(b"* %d EXISTS\r\n" % view.exists)
    if not session.rev2:
        await session.send(b"* 0 RECENT\r\n")  # RFC 9051 Appendix E: \Recent is gone
    permanent = [] if readonly else [*flags, *keywords, "\\*"]
    await session.send(
        encode.untagged_status(
            "OK",
            "PERMANENTFLAGS " + encode.encode(encode.flag_list(permanent), utf8=False).decode(),
            "Flags permitted",
        )
    )
    await session.send(
        encode.untagged_status("OK", f"UIDVALIDITY {view.uidvalidity}", "UIDs valid")
    )
    await session.send(
        encode.untagged_status("OK", f"UIDNEXT {view.uidnext}", "Predicted next UID")
    )
    if view.condstore:
        await session.send(
            encode.untagged_status("OK", f"HIGHESTMODSEQ {view.highestmodseq}", "Highest")
        )
    if session.rev2:
        # RFC 9051 §6.3.2: the mailbox's LIST response replaces [UNSEEN n].
        attributes = (await hierarchy(session)).attributes(folder.name, rev2=True)
        await session.untagged(Atom("LIST"), attributes, SEPARATOR, name_out(session, folder.name))
    else:
        unseen = next(
            (seq for seq in range(1, view.exists + 1) if "\\Seen" not in view.flags.at(seq)),
            None,
        )
        if unseen is not None:
            await session.send(encode.untagged_status("OK", f"UNSEEN {unseen}", "First unseen"))
    if command.args.qresync is not None:
        await resynchronise(session, command)
    await session.audit(
        "imap.select", folder.mailbox_address, folder=folder.name, readonly=readonly
    )
    mode = "READ-ONLY" if readonly else "READ-WRITE"
    await session.tagged(command, "OK", f"{command.name} completed", mode)


async def resynchronise(session: Session, command: Command) -> None:
    """SELECT ... (QRESYNC (uidvalidity modseq [known-uids])) (RFC 7162 §3.2.5):
    what was expunged and what changed since the client's modseq, in one go."""
    assert isinstance(command.args, SelectArgs) and command.args.qresync is not None
    view = session.view
    assert view is not None
    params = command.args.qresync
    if params.uidvalidity != view.uidvalidity:
        return  # §3.2.5.2: the client's cache is invalid; it must resynchronise fully
    changed, vanished = await session.services.mailstore.changes_since(
        view.folder.id, params.modseq
    )
    if params.known_uids is not None:
        top = max([view.uidnext - 1, *vanished, 1])
        known = {u for r in params.known_uids.resolve(top) for u in r}
        vanished = [u for u in vanished if u in known]
    if vanished:
        uids = encode.compress_uids(sorted(vanished))
        await session.send(f"* VANISHED (EARLIER) {uids}\r\n".encode())
    for row in changed:
        seq = view.seq_of(row.uid)
        if seq is None:
            continue
        items: list[tuple[str, ImapValue]] = [
            ("UID", row.uid),
            ("FLAGS", encode.message_flags(view.flags[row.uid])),
            ("MODSEQ", [view.modseqs[row.uid]]),
        ]
        await session.send(encode.fetch_response(seq, items, utf8=session.utf8))


async def carry_out(session: Session, command: Command, operation: Awaitable[object]) -> None:
    """Run a folder operation: tagged OK, or NO with the store's response code."""
    try:
        await operation
    except MailStoreError as error:
        await refuse(session, command, error)
        return
    await session.tagged(command, "OK", f"{command.name} completed")


async def refuse_name(session: Session, command: Command, name: str) -> bool:
    """Answer NO [CANNOT] when a new name holds what RFC 9051 §5.1 forbids, or is
    not in NFC (see :func:`denormalised`: refused, not converted, so no OLDNAME
    response is ever owed): names are shared by rev1 and rev2 sessions, so the
    rule holds for both, whether the name came as UTF-8 or modified UTF-7.

    A plain RENAME owes no OLDNAME either: RFC 9051 §6.3.9.7 defines the item for
    unsolicited LIST responses (NOTIFY, RFC 5465 §5.4, which mssd does not offer)
    and for the denormalised names refused here; RENAME's own answer is OK."""
    ch = forbidden_character(name)
    if ch is not None:
        text = f"Mailbox names cannot contain U+{ord(ch):04X} (RFC 9051 section 5.1)"
    elif denormalised(name):
        text = "Mailbox names must be in Unicode NFC (RFC 9051 section 5.1, RFC 5198)"
    else:
        return False
    await session.tagged(command, "NO", text, "CANNOT")
    return True


async def cmd_create(session: Session, command: Command) -> None:
    assert isinstance(command.args, CreateArgs) and session.principal is not None
    special = command.args.special_use[0] if command.args.special_use else None
    name = command.args.mailbox.rstrip(SEPARATOR)
    if await refuse_name(session, command, name):
        return
    await carry_out(
        session,
        command,
        session.services.mailstore.create_folder(
            session.principal.account_id, name, special_use=special
        ),
    )


async def cmd_delete(session: Session, command: Command) -> None:
    assert isinstance(command.args, MailboxArgs) and session.principal is not None
    if session.view is not None and session.view.folder.name == command.args.mailbox:
        session.leave_folder()
    await carry_out(
        session,
        command,
        session.services.mailstore.delete_folder(
            session.principal.account_id, command.args.mailbox
        ),
    )


async def cmd_rename(session: Session, command: Command) -> None:
    assert isinstance(command.args, RenameArgs) and session.principal is not None
    if await refuse_name(session, command, command.args.new):
        return
    await carry_out(
        session,
        command,
        session.services.mailstore.rename_folder(
            session.principal.account_id, command.args.old, command.args.new
        ),
    )


async def cmd_subscribe(session: Session, command: Command) -> None:
    assert isinstance(command.args, MailboxArgs) and session.principal is not None
    await carry_out(
        session,
        command,
        session.services.mailstore.set_subscribed(
            session.principal.account_id, command.args.mailbox, command.name == "SUBSCRIBE"
        ),
    )


def pattern_regex(reference: str, pattern: str) -> re.Pattern[str]:
    """RFC 9051 §6.3.9: ``*`` matches anything, ``%`` anything but the separator."""
    full = reference + pattern if not pattern.startswith(SEPARATOR) else pattern
    parts = []
    for char in full:
        if char == "*":
            parts.append(".*")
        elif char == "%":
            parts.append(f"[^{re.escape(SEPARATOR)}]*")
        else:
            parts.append(re.escape(char))
    flags = 0
    body = "".join(parts)
    if full.upper().startswith("INBOX"):
        body = "(?i:INBOX)" + "".join(parts[5:])
    return re.compile(body, flags)


def special_use(folder: FolderInfo | None) -> str | None:
    """The special use to advertise: only the account's own folders have one.

    RFC 6154 §2: special uses are user-specific; a delegate's \\Sent is not the
    ORG mailbox's Sent folder (Thunderbird would file its own sent mail there)."""
    if folder is None or folder.name.startswith(SHARED_PREFIX + SEPARATOR):
        return None
    return folder.special_use


def ancestors_of(names: Iterable[str]) -> set[str]:
    """Every name strictly above one of ``names`` ("a" and "a/b" for "a/b/c"),
    in one pass: a parent already found ends the climb, so each level above is
    built once however many names share it."""
    above: set[str] = set()
    for name in names:
        parts = name.split(SEPARATOR)
        for depth in range(len(parts) - 1, 0, -1):
            parent = SEPARATOR.join(parts[:depth])
            if parent in above:
                break
            above.add(parent)
    return above


class Hierarchy:
    """The names an account can list: its folders and the levels above them."""

    def __init__(self, folders: list[FolderInfo]) -> None:
        self.folders = {f.name: f for f in folders if "l" in f.rights}
        self.parents: set[str] = set()
        """Names with at least one name below them."""
        for name in self.folders:
            parts = name.split(SEPARATOR)
            self.parents.update(SEPARATOR.join(parts[:depth]) for depth in range(1, len(parts)))
        self._sorted = sorted(self.parents | set(self.folders))
        self.names = sorted(self._sorted, key=lambda n: (n.upper() != "INBOX", n))

    def below(self, name: str) -> list[str]:
        """The names under ``name``: one slice of the sorted names, since every
        name starting with "name/" sorts between "name/" and "name0" ("0" follows
        the separator "/")."""
        low = bisect.bisect_left(self._sorted, name + SEPARATOR)
        high = bisect.bisect_left(self._sorted, name + chr(ord(SEPARATOR) + 1), low)
        return self._sorted[low:high]

    def attributes(self, name: str, *, rev2: bool, uses: bool = True) -> list[ImapValue]:
        """The attributes a LIST response carries whatever the options asked
        (RFC 9051 §7.3.1, RFC 5258 §4), special uses (RFC 6154 §2) if ``uses``."""
        folder = self.folders.get(name)
        attributes: list[ImapValue] = []
        if folder is None:
            # A level of the shared namespace exists without being a mailbox; any
            # other name that is no folder does not exist. IMAP4rev2 tells the two
            # apart (\NonExistent implies \Noselect; RFC 9051 §7.3.1 allows one).
            shared = name == SHARED_PREFIX or name.startswith(SHARED_PREFIX + SEPARATOR)
            attributes.append(Atom("\\NonExistent" if rev2 and not shared else "\\Noselect"))
        attributes.append(Atom("\\HasChildren" if name in self.parents else "\\HasNoChildren"))
        use = special_use(folder)
        if use is not None and uses:
            attributes.append(Atom(use))
        return attributes


async def hierarchy(session: Session) -> Hierarchy:
    assert session.principal is not None
    return Hierarchy(await session.services.mailstore.folders(session.principal.account_id))


async def cmd_list(session: Session, command: Command) -> None:
    assert isinstance(command.args, ListArgs)
    args = command.args
    lsub = command.name == "LSUB"
    if args.patterns == ("",):
        # RFC 9051 §6.3.9: the hierarchy delimiter and root.
        await session.untagged(Atom("LIST"), [Atom("\\Noselect")], SEPARATOR, "")
        await session.tagged(command, "OK", "LIST completed")
        return
    if session.rev2 and "RECENT" in (args.status_items or ()):
        await session.tagged(command, "BAD", _NO_RECENT)
        return
    tree = await hierarchy(session)
    subscribed_only = lsub or "SUBSCRIBED" in args.select_options
    special_only = "SPECIAL-USE" in args.select_options
    # RFC 5258 §3: the SUBSCRIBED selection option implies the SUBSCRIBED return option.
    show_subscribed = {"SUBSCRIBED"} & (args.select_options | args.return_options)
    # RFC 5258 §3.5: what CHILDINFO says a descendant was chosen for.
    criteria = [o for o in ("SUBSCRIBED", "SPECIAL-USE") if o in args.select_options]
    regexes = [pattern_regex(args.reference, p) for p in args.patterns]
    # The patterns with "%" read as "*": what "%" would have reached had it not
    # stopped at a hierarchy delimiter (LSUB's \Noselect names, below).
    deeper = [pattern_regex(args.reference, p.replace("%", "*")) for p in args.patterns]

    def matches(name: str) -> bool:
        return any(r.fullmatch(name) for r in regexes)

    def chosen(name: str) -> bool:
        """Whether a name meets the selection criteria."""
        folder = tree.folders.get(name)
        if subscribed_only and (folder is None or not folder.subscribed):
            return False
        return not special_only or special_use(folder) is not None

    # RFC 3501 §6.3.9: "if "foo/bar" is subscribed but "foo" is not, a "%"
    # wildcard to LSUB must return foo, not foo/bar, in the LSUB response, and it
    # MUST be flagged with the \Noselect attribute": the names above a subscribed
    # name the patterns leave out only because "%" stopped. Gathered once from the
    # subscribed names, not by walking every listed name's descendants (quadratic
    # in the number of folders).
    stopped_above: set[str] = set()
    if lsub:
        stopped_above = ancestors_of(
            n
            for n in tree.names
            if chosen(n) and not matches(n) and any(r.fullmatch(n) for r in deeper)
        )

    for name in tree.names:
        if not matches(name):
            continue
        childinfo = False
        if "RECURSIVEMATCH" in args.select_options:
            # RFC 9051 §6.3.9, RFC 5258 §3.5: a name with chosen descendants gets
            # CHILDINFO; one not chosen itself is listed only when the pattern
            # leaves one of those descendants out (no redundant responses).
            descendants = [n for n in tree.below(name) if chosen(n)]
            childinfo = bool(descendants)
            if not chosen(name) and all(matches(n) for n in descendants):
                continue
        elif not chosen(name) and name not in stopped_above:
            continue
        folder = tree.folders.get(name)
        attributes = tree.attributes(name, rev2=session.rev2, uses=not lsub)
        if lsub and not chosen(name) and Atom("\\Noselect") not in attributes:
            # Here \Noselect says "not subscribed", not "cannot be selected": LIST
            # (SUBSCRIBED) must not do the same (RFC 5258 §3.5), CHILDINFO says it.
            attributes.insert(0, Atom("\\Noselect"))
        if folder is not None and folder.subscribed and show_subscribed:
            attributes.append(Atom("\\Subscribed"))
        extended: list[ImapValue] = []
        if childinfo:
            extended.append(["CHILDINFO", list(criteria)])
        await session.untagged(
            Atom("LSUB" if lsub else "LIST"),
            attributes,
            SEPARATOR,
            name_out(session, name),
            *extended,
        )
        if folder is not None and args.status_items and "r" in folder.rights:
            await send_status(session, folder, args.status_items)
    await session.tagged(command, "OK", f"{command.name} completed")


async def cmd_namespace(session: Session, command: Command) -> None:
    # RFC 2342: personal namespace, no other users', shared ORG mailboxes.
    personal: list[ImapValue] = [["", SEPARATOR]]
    shared: list[ImapValue] = [[name_out(session, SHARED_PREFIX + SEPARATOR), SEPARATOR]]
    await session.untagged(Atom("NAMESPACE"), personal, None, shared)
    await session.tagged(command, "OK", "NAMESPACE completed")


async def send_status(session: Session, folder: FolderInfo, items: tuple[str, ...]) -> None:
    snapshot = await session.services.mailstore.snapshot(folder.id)
    values: list[ImapValue] = []
    for item in items:
        name = item.upper()
        value: int
        if name == "MESSAGES":
            value = len(snapshot.messages)
        elif name == "UIDNEXT":
            value = snapshot.uidnext
        elif name == "UIDVALIDITY":
            value = snapshot.uidvalidity
        elif name == "UNSEEN":
            value = sum(1 for _, flags, _ in snapshot.messages if "\\Seen" not in flags)
        elif name == "DELETED":
            value = sum(1 for _, flags, _ in snapshot.messages if "\\Deleted" in flags)
        elif name == "RECENT":
            value = 0
        elif name == "HIGHESTMODSEQ":
            value = snapshot.highestmodseq
        elif name == "SIZE":
            rows = await session.services.mailstore.messages(
                folder.id, [uid for uid, _, _ in snapshot.messages]
            )
            value = sum(row.size for row in rows)
        elif name == "APPENDLIMIT":
            value = session.services.append_limit
        else:
            continue
        values += [Atom(name), value]
    await session.untagged(Atom("STATUS"), name_out(session, folder.name), values)


async def cmd_status(session: Session, command: Command) -> None:
    assert isinstance(command.args, StatusArgs)
    if session.rev2 and "RECENT" in command.args.items:
        await session.tagged(command, "BAD", _NO_RECENT)
        return
    folder = await find_folder(session, command, command.args.mailbox, needs="r")
    if folder is None:
        return
    await send_status(session, folder, command.args.items)
    await session.tagged(command, "OK", "STATUS completed")
