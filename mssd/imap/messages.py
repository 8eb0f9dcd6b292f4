"""Commands on messages: FETCH, STORE, COPY, MOVE, EXPUNGE, APPEND, CLOSE,
UNSELECT, CHECK (RFC 9051 §6.4, RFC 4315, RFC 6851, RFC 7162); SEARCH is in
``search``.

Message content comes from the immutable blob; the MIME tree is rebuilt for
each fetch (worker thread for large messages) and never cached as truth.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Literal

from mssd.imap import encode
from mssd.imap.commands import (
    AppendArgs,
    Command,
    CopyArgs,
    ExpungeArgs,
    FetchArgs,
    FetchAttr,
    SequenceSet,
    StoreArgs,
)
from mssd.imap.encode import ImapValue, Literal8
from mssd.imap.fetchdata import (
    SectionSpec,
    binary,
    binary_size,
    bodystructure,
    envelope,
    partial,
    resolve_part,
    section,
    wire_body,
    wire_envelope,
)
from mssd.imap.heads import FIELD_LISTS, Loaded
from mssd.imap.session import Session, during_uid_command
from mssd.imap.view import SelectedView
from mssd.mime import OFFLOAD_BYTES
from mssd.mime.structure import Part, header_value, parse
from mssd.store.mailstore import (
    FolderInfo,
    MailStoreError,
    MessageRow,
    format_flags,
    parse_flags,
)

_FETCH_BATCH = 50
_CONTENT_ITEMS = {"BODY", "BINARY", "BINARY.SIZE", "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
_STRUCTURE_ITEMS = {"ENVELOPE", "BODYSTRUCTURE"}
_VIEW_ITEMS = {"UID", "FLAGS", "MODSEQ"}
_SETS_SEEN = {"RFC822", "RFC822.TEXT"}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def selected(session: Session) -> SelectedView:
    assert session.view is not None
    return session.view


def resolve(session: Session, sequence: SequenceSet, uid: bool) -> list[int]:
    """The UIDs of the view a sequence set names, ascending (RFC 9051 §9 seq-set)."""
    view = selected(session)
    if not view.uids:
        return []
    if uid:
        # The ranges are sorted and disjoint, the view's UIDs ascending: the
        # answer is a slice of the view per range.
        found: list[int] = []
        for r in sequence.resolve(view.uids[-1], view.saved):
            start = bisect.bisect_left(view.uids, r.start)
            found += view.uids[start : bisect.bisect_left(view.uids, r.stop, start)]
        return found
    saved_seqs = [s for s in (view.seq_of(u) for u in view.saved) if s is not None]
    ranges = sequence.resolve(view.exists, saved_seqs)
    return [uid for r in ranges for uid in view.uids[r.start - 1 : r.stop - 1]]


def internal_date(moment: dt.datetime) -> str:
    """RFC 9051 date-time: ``17-Jul-1996 02:44:25 -0700``."""
    offset = moment.utcoffset() or dt.timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return (
        f"{moment.day:02d}-{_MONTHS[moment.month - 1]}-{moment.year:04d} "
        f"{moment:%H:%M:%S} {sign}{minutes // 60:02d}{minutes % 60:02d}"
    )


def section_name(attr: FetchAttr) -> str:
    """How a section is named back in the response (RFC 9051 §7.5.2)."""
    spec = attr.section or SectionSpec()
    parts = [".".join(str(n) for n in spec.part)] if spec.part else []
    if spec.text:
        text = spec.text
        if spec.fields:
            text += " (" + " ".join(spec.fields) + ")"
        parts.append(text)
    name = "BODY" if attr.name == "BODY" else attr.name
    out = f"{name}[{'.'.join(parts)}]"
    # The origin octet, for BINARY too: RFC 3516 §4.3 and RFC 9051 §7.5.2 name the
    # item BINARY[<section-binary>]<<number>>, <number> the offset in the decoded
    # data, though their ABNF (msg-att-static "BINARY" section-binary SP ...) has
    # no origin; errata 7246 and 8217 (RFC 9051) propose opposite fixes. Dovecot
    # sends BINARY[1]<0> (tests/test_imap_rev2.py compares), and so does mssd.
    if attr.partial is not None:
        out += f"<{attr.partial[0]}>"
    return out


async def parsed(raw: bytes) -> Loaded:
    root = await asyncio.to_thread(parse, raw) if len(raw) > OFFLOAD_BYTES else parse(raw)
    return Loaded(raw, root)


async def load(session: Session, row: MessageRow) -> Loaded:
    return await parsed(await session.services.mailstore.blob(row.sha256))


_HEADER_TEXTS = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT")


def _head_only(attr: FetchAttr) -> bool:
    """Whether an item needs nothing but the message's own header block."""
    if attr.name in ("ENVELOPE", "RFC822.HEADER", *_VIEW_ITEMS, "RFC822.SIZE", "INTERNALDATE"):
        return True
    spec = attr.section
    return attr.name == "BODY" and spec is not None and not spec.part and spec.text in _HEADER_TEXTS


async def _contents(
    session: Session, rows: Sequence[MessageRow], *, heads_only: bool
) -> dict[str, bytes] | dict[str, Loaded]:
    """The messages' bytes by digest, or their parsed header blocks when
    ``heads_only`` (from the shared cache, :mod:`mssd.imap.heads`)."""
    store = session.services.mailstore
    if heads_only:
        heads = await session.services.heads.heads(store, rows)
        return {digest: head.loaded for digest, head in heads.items()}
    return await store.blobs([row.sha256 for row in rows], octets=sum(row.size for row in rows))


def _fields_key(spec: SectionSpec) -> tuple[str, tuple[str, ...]] | None:
    """What a HEADER.FIELDS(.NOT) answer is kept under in ``Loaded.fields``."""
    if spec.part or spec.text not in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        return None
    return spec.text, tuple(name.lower() for name in spec.fields)


def _header_fields_memo(
    loaded: Loaded, spec: SectionSpec, key: tuple[str, tuple[str, ...]] | None = None
) -> bytes | None:
    """BODY[HEADER.FIELDS (...)] of a cached header block, made once per field
    list (clients ask for the same few lists again and again); ``key``, when
    the caller has it, is :func:`_fields_key`'s."""
    memo = loaded.fields
    if memo is None:
        return None
    key = key or _fields_key(spec)
    if key is None:
        return None
    data = memo.get(key)
    if data is None:
        data = section(loaded.raw, loaded.root, spec)
        if data is not None and len(memo) < FIELD_LISTS:
            memo[key] = data
    return data


def sets_seen(attrs: Sequence[FetchAttr]) -> bool:
    for attr in attrs:
        if attr.name in _SETS_SEEN or (
            attr.name in ("BODY", "BINARY") and attr.section is not None and not attr.peek
        ):
            return True
    return False


def fetch_item(
    attr: FetchAttr, row: MessageRow, loaded: Loaded | None, view: SelectedView
) -> tuple[str, ImapValue] | None:
    name = attr.name
    if name == "UID":
        return "UID", row.uid
    if name == "FLAGS":
        return "FLAGS", encode.message_flags(view.flags.get(row.uid, row.flags))
    if name == "INTERNALDATE":
        return "INTERNALDATE", internal_date(row.internal_date)
    if name == "RFC822.SIZE":
        return "RFC822.SIZE", row.size
    if name == "MODSEQ":
        return "MODSEQ", [view.modseqs.get(row.uid, row.modseq)]
    assert loaded is not None
    raw, root = loaded.raw, loaded.root
    if name == "ENVELOPE":
        return "ENVELOPE", wire_envelope(envelope(raw, root))
    if name == "BODYSTRUCTURE":
        return "BODYSTRUCTURE", wire_body(bodystructure(raw, root, extensible=True))
    if name == "BODY" and attr.section is None:
        return "BODY", wire_body(bodystructure(raw, root, extensible=False))
    if name == "RFC822":
        return "RFC822", raw
    if name == "RFC822.HEADER":
        return "RFC822.HEADER", section(raw, root, SectionSpec(text="HEADER")) or b""
    if name == "RFC822.TEXT":
        return "RFC822.TEXT", section(raw, root, SectionSpec(text="TEXT")) or b""
    spec = attr.section or SectionSpec()
    if name == "BODY":
        data = _header_fields_memo(loaded, spec)
        if data is None:
            data = section(raw, root, spec)
        if data is None:
            raise ValueError("invalid section")
        if attr.partial is not None:
            data = partial(data, *attr.partial)
        return section_name(attr), data
    if name == "BINARY":
        decoded = binary(raw, root, spec.part)
        if decoded is None:
            raise LookupError("UNKNOWN-CTE")
        if attr.partial is not None:
            decoded = partial(decoded, *attr.partial)
        # RFC 3516 §4.2: literal8 for content this server decoded (base64 or
        # quoted-printable) or that holds NUL; the part's own bytes otherwise, as
        # Dovecot does.
        target = resolve_part(root, spec.part) if spec.part else root
        encoding = header_value(target, "Content-Transfer-Encoding") if target else None
        decoded_here = (encoding or b"").strip().lower() in (b"base64", b"quoted-printable")
        wrap = decoded_here or b"\x00" in decoded
        return section_name(attr), Literal8(decoded) if wrap else decoded
    if name == "BINARY.SIZE":
        size = binary_size(raw, root, spec.part)
        if size is None:
            raise LookupError("UNKNOWN-CTE")
        return f"BINARY.SIZE[{'.'.join(str(n) for n in spec.part)}]", size
    return None


def _whole(attr: FetchAttr) -> bool:
    """BODY[] (BODY.PEEK[], with or without <partial>) and RFC822: the message
    exactly as stored (RFC 9051 §6.4.5: the empty section is the whole message)."""
    if attr.name == "RFC822":
        return True
    spec = attr.section
    return attr.name == "BODY" and spec is not None and not spec.part and spec.text is None


_UNPARSED = Part(0, 0, 0, (), "", "", ())
"""The tree of a message read for whole-message items only (:func:`_whole`),
which never look at it."""


ItemWriter = Callable[[MessageRow, "Loaded | None", SelectedView, int], bytes | None]
"""One FETCH item of one message (its row, content, the view and its sequence
number there) on the wire (``NAME value``), or None for none."""


def item_writer(attr: FetchAttr, *, utf8: bool) -> ItemWriter:
    """How one FETCH item is written, decided once per command rather than per
    message: the items a message list asks for (UID, FLAGS, RFC822.SIZE, MODSEQ,
    BODY.PEEK[HEADER.FIELDS (...)]) straight to bytes, the others through
    :func:`fetch_item` and the encoder. Same octets either way."""
    name = attr.name
    if name == "UID":
        return lambda row, loaded, view, seq: b"UID %d" % row.uid
    if name == "FLAGS":
        return lambda row, loaded, view, seq: (
            b"FLAGS " + encode.message_flags_wire(view.flags.at(seq))
        )
    if name == "RFC822.SIZE":
        return lambda row, loaded, view, seq: b"RFC822.SIZE %d" % row.size
    if name == "MODSEQ":
        return lambda row, loaded, view, seq: b"MODSEQ (%d)" % view.modseqs.at(seq)
    if _whole(attr):
        label = section_name(attr).encode("ascii") + b" " if name == "BODY" else b"RFC822 "

        def whole(row: MessageRow, loaded: Loaded | None, view: SelectedView, seq: int) -> bytes:
            assert loaded is not None
            data = loaded.raw
            if attr.partial is not None:
                data = partial(data, *attr.partial)
            return label + b"{%d}\r\n" % len(data) + data

        return whole
    spec = attr.section
    key = None if spec is None or attr.partial is not None else _fields_key(spec)
    if name == "BODY" and spec is not None and key is not None:
        label = section_name(attr).encode("ascii") + b" "

        def header_fields(
            row: MessageRow, loaded: Loaded | None, view: SelectedView, seq: int
        ) -> bytes:
            assert loaded is not None and spec is not None
            data = _header_fields_memo(loaded, spec, key)
            if data is None:
                data = section(loaded.raw, loaded.root, spec)
            if data is None:
                raise ValueError("invalid section")
            return label + b"{%d}\r\n" % len(data) + data

        return header_fields

    def other(row: MessageRow, loaded: Loaded | None, view: SelectedView, seq: int) -> bytes | None:
        item = fetch_item(attr, row, loaded, view)
        if item is None:
            return None
        out = bytearray(item[0].encode("ascii") + b" ")
        encode.encode_into(out, item[1], utf8)
        return bytes(out)

    return other


async def cmd_fetch(session: Session, command: Command) -> None:
    assert isinstance(command.args, FetchArgs)
    view = selected(session)
    args = command.args
    attrs = list(args.attrs)
    names = {a.name for a in attrs}
    if command.uid and "UID" not in names:
        attrs.insert(0, FetchAttr("UID"))
    if args.changed_since is not None:
        view.condstore = True
        if "MODSEQ" not in names:
            attrs.append(FetchAttr("MODSEQ"))
    uids = resolve(session, args.sequence, command.uid)
    if args.vanished and command.uid and args.changed_since is not None:
        await send_vanished_earlier(session, args.sequence, args.changed_since)
    needs_content = bool(names & (_CONTENT_ITEMS | _STRUCTURE_ITEMS))
    if names <= _VIEW_ITEMS:
        # FLAGS, UID and MODSEQ are in the view (UID FETCH 1:* (FLAGS) is how many
        # clients poll): no database round trip.
        rows = {uid: _view_row(view, uid) for uid in uids}
    else:
        folder_index = session.index
        assert folder_index is not None  # selected
        # The index at its latest: a message the view has is in it unless expunged.
        latest = await folder_index.latest()
        rows = await session.services.facts.rows(
            session.services.mailstore, view.folder.id, uids, latest.has
        )
    if args.changed_since is not None:
        uids = [u for u in uids if view.modseqs.get(u, 0) > args.changed_since]
    mark_seen = sets_seen(attrs) and not view.readonly
    if mark_seen:
        unseen = [u for u in uids if u in rows and "\\Seen" not in view.flags.get(u, frozenset())]
        if unseen and "s" in view.folder.rights:
            result = await session.services.mailstore.store_flags(
                view.folder.id,
                unseen,
                mode="add",
                flags=frozenset({"\\Seen"}),
                unchanged_since=None,
            )
            # The view's HIGHESTMODSEQ is left to Session.sync: moving it past
            # expunges not yet announced would lose them (RFC 9051 §7.5.1).
            for state in result.updated:
                if state.uid in view.flags:
                    view.set_state(state.uid, state.flags, state.modseq)
            if "FLAGS" not in names:
                attrs.append(FetchAttr("FLAGS"))
    if needs_content:
        # Who read which message is on record before the content leaves.
        readable = [u for u in uids if u in rows]
        if readable:
            await session.audit(
                "imap.fetch",
                view.folder.mailbox_address,
                folder=view.folder.name,
                uids=encode.compress_uids(readable),
            )
    heads_only = all(_head_only(a) for a in attrs if a.name in _CONTENT_ITEMS | _STRUCTURE_ITEMS)
    writers = [item_writer(attr, utf8=session.utf8) for attr in attrs]
    # BODY[] and RFC822 are the stored bytes as they are: no MIME parse for them.
    needs_tree = any(a.name in _CONTENT_ITEMS | _STRUCTURE_ITEMS for a in attrs if not _whole(a))
    contents: dict[str, bytes | Loaded] = {}
    for index, uid in enumerate(uids):
        row = rows.get(uid)
        seq = view.seq_of(uid)
        if row is None or seq is None:
            continue  # expunged by another session; RFC 9051 §7.5.1 allows silence
        loaded = None
        if needs_content:
            if row.sha256 not in contents:
                # Read a batch at a time: one query, bounded memory.
                batch = [rows[u] for u in uids[index : index + _FETCH_BATCH] if u in rows]
                contents = dict(await _contents(session, batch, heads_only=heads_only))
            content = contents[row.sha256]
            if isinstance(content, Loaded):
                loaded = content
            elif needs_tree:
                loaded = await parsed(content)
            else:
                loaded = Loaded(content, _UNPARSED)
        try:
            written = [item for write in writers if (item := write(row, loaded, view, seq))]
        except ValueError as error:
            await session.tagged(command, "BAD", f"FETCH: {error}")
            return
        except LookupError:
            await session.tagged(command, "NO", "Unknown Content-Transfer-Encoding", "UNKNOWN-CTE")
            return
        # encode.fetch_response's form, from items already written.
        if session.queue(b"* %d FETCH (%s)\r\n" % (seq, b" ".join(written))):
            await session.send(b"")
    await session.sync(allow_expunge=during_uid_command(command))
    await session.tagged(command, "OK", "FETCH completed")


async def send_vanished_earlier(session: Session, sequence: SequenceSet, modseq: int) -> None:
    """UID FETCH ... (CHANGEDSINCE n VANISHED) (RFC 7162 §3.2.6): the UIDs of the
    set expunged since ``n``."""
    view = selected(session)
    _, vanished = await session.services.mailstore.changes_since(view.folder.id, modseq)
    top = max([view.uidnext - 1, *vanished, 1])
    wanted = {u for r in sequence.resolve(top) for u in r}
    gone = sorted(u for u in vanished if u in wanted)
    if gone:
        await session.send(f"* VANISHED (EARLIER) {encode.compress_uids(gone)}\r\n".encode())


def _rights_for(flags: frozenset[str]) -> set[str]:
    needed = set()
    for flag in flags:
        needed.add({"\\Seen": "s", "\\Deleted": "t"}.get(flag, "w"))
    return needed


async def cmd_store(session: Session, command: Command) -> None:
    assert isinstance(command.args, StoreArgs)
    view = selected(session)
    args = command.args
    if view.readonly:
        await session.tagged(command, "NO", "Mailbox is read-only", "READ-ONLY")
        return
    flags = frozenset(f for f in args.flags if f != "\\Recent")
    if not _rights_for(flags) <= set(view.folder.rights):
        await session.tagged(command, "NO", "Not allowed to change these flags", "NOPERM")
        return
    uids = resolve(session, args.sequence, command.uid)
    modes: dict[str, Literal["set", "add", "remove"]] = {
        "replace": "set",
        "add": "add",
        "remove": "remove",
    }
    mode = modes[args.action]
    if args.unchanged_since is not None:
        view.condstore = True
    result = await session.services.mailstore.store_flags(
        view.folder.id,
        uids,
        mode=mode,
        flags=flags,
        unchanged_since=args.unchanged_since,
    )
    # view.highestmodseq moves only once every change below it, expunges
    # included, has been told (RFC 9051 §7.5.1): here if this STORE was the
    # only change, else in Session.sync. (The FETCH responses below tell it.)
    highest = session.own_change(len(result.updated))
    if highest is not None:
        await session.own_update(result.updated, [], highest, allow_expunge=False)
    else:
        for state in (*result.updated, *result.unchanged):
            if state.uid in view.flags:
                view.set_state(state.uid, state.flags, state.modseq)
    report = sorted(
        result.updated if args.silent else (*result.updated, *result.unchanged), key=lambda s: s.uid
    )
    for state in report:
        seq = view.seq_of(state.uid)
        if seq is None:
            continue
        items: list[tuple[str, ImapValue]] = []
        if not args.silent:
            items.append(("FLAGS", encode.message_flags(state.flags)))
        if command.uid:
            items.insert(0, ("UID", state.uid))
        if view.condstore:
            items.append(("MODSEQ", [state.modseq]))
        if items and (not args.silent or view.condstore):
            await session.send(encode.fetch_response(seq, items, utf8=session.utf8))
    await session.sync(allow_expunge=during_uid_command(command))
    if result.modified:
        numbers = (
            result.modified
            if command.uid
            else [s for s in (view.seq_of(u) for u in result.modified) if s]
        )
        code = "MODIFIED " + encode.compress_uids(sorted(numbers))
        await session.tagged(command, "OK", "Conditional STORE failed for some messages", code)
        return
    await session.tagged(command, "OK", "STORE completed")


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _view_row(view: SelectedView, uid: int) -> MessageRow:
    """What the view knows of a message, for searches that need nothing else."""
    return MessageRow(uid, view.flags[uid], view.modseqs[uid], _EPOCH, 0, "")


# -- COPY, MOVE, EXPUNGE, APPEND, CLOSE ----------------------------------------------


async def cmd_copy(session: Session, command: Command) -> None:
    assert isinstance(command.args, CopyArgs) and session.principal is not None
    view = selected(session)
    move = command.name == "MOVE"
    target = await session.services.mailstore.folder(
        session.principal.account_id, command.args.mailbox
    )
    if target is None:
        await session.tagged(command, "NO", f"No mailbox {command.args.mailbox}", "TRYCREATE")
        return
    if "i" not in target.rights or (move and not {"t", "e"} <= set(view.folder.rights)):
        await session.tagged(command, "NO", "Not allowed", "NOPERM")
        return
    if move and view.readonly:
        await session.tagged(command, "NO", "Mailbox is read-only", "READ-ONLY")
        return
    uids = resolve(session, command.args.sequence, command.uid)
    if not uids:
        await session.tagged(command, "OK", f"{command.name} completed (nothing to do)")
        return
    operation = session.services.mailstore.move if move else session.services.mailstore.copy
    try:
        pairs = await operation(view.folder.id, uids, target.id)
    except MailStoreError as error:
        await session.tagged(command, "NO", error.text, error.code)
        return
    code = encode.copyuid(target.uidvalidity, [s for s, _ in pairs], [d for _, d in pairs])
    if move:
        # RFC 6851 §4.3: COPYUID in an untagged OK, then the EXPUNGEs, then the tagged OK.
        await session.send(encode.untagged_status("OK", code, "Moved"))
        await session.sync(allow_expunge=True)
        await session.tagged(command, "OK", "MOVE completed")
        return
    await session.sync(allow_expunge=False)
    await session.tagged(command, "OK", "COPY completed", code)


async def cmd_expunge(session: Session, command: Command) -> None:
    assert isinstance(command.args, ExpungeArgs)
    view = selected(session)
    if view.readonly:
        await session.tagged(command, "NO", "Mailbox is read-only", "READ-ONLY")
        return
    if "e" not in view.folder.rights:
        await session.tagged(command, "NO", "Not allowed to expunge", "NOPERM")
        return
    uids = None
    if command.args.sequence is not None:
        uids = resolve(session, command.args.sequence, True)
    doomed = await session.services.mailstore.expunge(view.folder.id, uids=uids)
    highest = session.own_change(len(doomed))
    if highest is None:
        await session.sync(allow_expunge=True)
    else:
        await session.announce(await session.own_update([], doomed, highest, allow_expunge=True))
    await session.tagged(command, "OK", "EXPUNGE completed")


async def cmd_close(session: Session, command: Command) -> None:
    view = selected(session)
    if command.name == "CLOSE" and not view.readonly and "e" in view.folder.rights:
        # RFC 9051 §6.4.1: expunge silently, no untagged EXPUNGE.
        await session.services.mailstore.expunge(view.folder.id)
    session.leave_folder()
    await session.tagged(command, "OK", f"{command.name} completed")


async def cmd_check(session: Session, command: Command) -> None:
    await session.sync(allow_expunge=True)
    await session.tagged(command, "OK", "CHECK completed")


async def cmd_append(session: Session, command: Command) -> None:
    assert isinstance(command.args, AppendArgs) and session.principal is not None
    name, view = command.args.mailbox, session.view
    if view is not None and (
        name == view.folder.name or (name.upper() == "INBOX" == view.folder.name)
    ):
        target: FolderInfo | None = view.folder  # as SELECT found it, rights included
    else:
        target = await session.services.mailstore.folder(session.principal.account_id, name)
    if target is None:
        await session.tagged(command, "NO", f"No mailbox {command.args.mailbox}", "TRYCREATE")
        return
    if "i" not in target.rights:
        await session.tagged(command, "NO", "Not allowed to append here", "NOPERM")
        return
    limit = session.services.append_limit
    if any(len(m.data) > limit for m in command.args.messages):
        await session.tagged(command, "NO", f"Message larger than {limit} octets", "TOOBIG")
        return
    now = dt.datetime.now(dt.UTC)
    # RFC 3502 §6.3.11: all the messages of a MULTIAPPEND, or none.
    messages = [
        (m.data, frozenset(f for f in m.flags if f != "\\Recent"), m.date_time or now)
        for m in command.args.messages
    ]
    try:
        uids = await session.services.mailstore.append_many(target.id, messages)
    except MailStoreError as error:  # [OVERQUOTA] (RFC 9208 §4.3.1)...: nothing was stored
        await session.tagged(command, "NO", error.text, error.code)
        return
    if view is not None and view.folder.id == target.id:
        highest = session.own_change(len(uids))
        if highest is None:
            await session.sync(allow_expunge=False)
        else:
            first = highest - len(uids) + 1
            rows = [
                MessageRow(uid, parse_flags(format_flags(flags)), first + i, moment, len(data), "")
                for i, (uid, (data, flags, moment)) in enumerate(zip(uids, messages, strict=True))
            ]
            await session.announce(await session.own_update(rows, [], highest, allow_expunge=False))
    await session.tagged(
        command, "OK", "APPEND completed", encode.appenduid(target.uidvalidity, uids)
    )
