"""SORT and THREAD (RFC 5256), with the DISPLAYFROM and DISPLAYTO sort keys of
RFC 5957.

Messages are chosen with the SEARCH machinery (``search.matching``), then only
their header block is read from the blob and parsed (``mime.structure``), on a
worker thread for big folders. The ordering rules (base subject, sent date,
the REFERENCES algorithm) are pure functions over :class:`Headers`, so they can
be tested without a server.

Invariants:
- Ties are always broken by sequence number (RFC 5256 §3), so an answer never
  depends on the order rows came back from the store.
- Nothing here writes: SORT and THREAD never set \\Seen.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.header
import email.utils
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mssd.imap.commands import Command, SearchKey, SortArgs, ThreadArgs
from mssd.imap.search import has_modseq, matching, modseq_of_result
from mssd.imap.session import Session
from mssd.mime.structure import unfold

_OFFLOAD_COUNT = 200  # parse on a worker thread past this many messages
_WANTED = ("subject", "from", "to", "cc", "date", "message-id", "in-reply-to", "references")
_MSG_ID = re.compile(r"<([^<>\s]+)>")
_WSP = re.compile(r"[ \t\r\n]+")
# RFC 5256 §5 subj-blob: "[" *BLOBCHAR "]" *WSP, BLOBCHAR excluding "[" and "]".
_BLOB = re.compile(r"\[[^\[\]]*\] *")
# RFC 5256 §5 subj-refwd: ("re" / ("fw" ["d"])) *WSP [subj-blob] ":", after any blobs.
_REFWD = re.compile(r"(?:\[[^\[\]]*\] *)*(?:re|fwd?) *(?:\[[^\[\]]*\] *)?:", re.IGNORECASE)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Headers:
    """What SORT and THREAD need of one message, decoded (RFC 2047) to text."""

    seq: int
    uid: int
    size: int
    arrival: dt.datetime
    fields: dict[str, str] = field(default_factory=dict)
    """Lower-case field name → first value, unfolded and decoded."""

    def get(self, name: str) -> str:
        return self.fields.get(name, "")

    @property
    def sent(self) -> dt.datetime:
        """RFC 5256 §3 DATE: the Date header in UTC, else the internal date."""
        value = self.fields.get("date")
        if value:
            try:
                moment = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                moment = None
            if moment is not None:
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=dt.UTC)
                return moment.astimezone(dt.UTC)
        return self.arrival


def decode_text(raw: bytes) -> str:
    text = unfold(raw).decode("utf-8", "replace")
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


def wanted_fields(headers: Iterable[tuple[str, bytes]]) -> dict[str, str]:
    """The first instance of each wanted field among a message's header fields
    (``Part.headers``: name as written, raw value)."""
    found: dict[str, str] = {}
    for field_name, value in headers:
        name = field_name.lower()
        if name in _WANTED and name not in found:
            found[name] = decode_text(value)
    return found


# -- RFC 5256 §2.1 base subject ------------------------------------------------------


def base_subject(subject: str) -> tuple[str, bool]:
    """(base subject, whether the subject marks a reply or a forward)."""
    # (1) decoded already; runs of whitespace become one space.
    text = _WSP.sub(" ", subject).strip(" ")
    reply = False
    while True:
        # (2) remove trailing subj-trailer: "(fwd)" / WSP.
        while True:
            stripped = text.rstrip(" ")
            if stripped.lower().endswith("(fwd)"):
                stripped = stripped[: -len("(fwd)")]
                reply = True
            if stripped == text:
                break
            text = stripped
        # (3) and (4), repeated until nothing changes.
        while True:
            before = text
            text = text.lstrip(" ")
            match = _REFWD.match(text)
            if match:
                text = text[match.end() :]
                reply = True
            blob = _BLOB.match(text)
            if blob and text[blob.end() :].strip(" "):
                # (4) a leading subj-blob goes only if something remains.
                text = text[blob.end() :]
            if text == before:
                break
        # (5) subj-fwd = "[fwd:" subject "]"
        if text.lower().startswith("[fwd:") and text.endswith("]"):
            text = text[len("[fwd:") : -1]
            reply = True
            continue
        return text, reply


def _first_address(value: str) -> tuple[str, str, str]:
    """(display name, local part, addr-spec) of the first address of a field."""
    pairs = email.utils.getaddresses([value]) if value else []
    for name, address in pairs:
        if name or address:
            return name, address.partition("@")[0], address
    return "", "", ""


def sort_key(headers: Headers, key: str) -> object:
    """RFC 5256 §3 and RFC 5957 §3: the value one criterion compares
    (strings with the i;unicode-casemap collation, approximated by casefold)."""
    if key == "ARRIVAL":
        return headers.arrival
    if key == "DATE":
        return headers.sent
    if key == "SIZE":
        return headers.size
    if key == "SUBJECT":
        return base_subject(headers.get("subject"))[0].casefold()
    field_name = {"DISPLAYFROM": "from", "DISPLAYTO": "to"}.get(key, key.lower())
    name, mailbox, address = _first_address(headers.get(field_name))
    if key.startswith("DISPLAY"):
        # RFC 5957 §3: the display-name when there is one, else the addr-spec.
        return (name or address).casefold()
    return mailbox.casefold()  # RFC 5256 §3: the addr-mailbox of the first address


def sort_messages(items: Sequence[Headers], criteria: Sequence[tuple[str, bool]]) -> list[int]:
    """Sequence order, then one stable pass per criterion from the last to the
    first: equal messages keep ascending sequence order (RFC 5256 §3)."""
    ordered = sorted(items, key=lambda h: h.seq)
    for key, reverse in reversed(criteria):
        values = {h.seq: sort_key(h, key) for h in ordered}
        ordered.sort(key=lambda h: values[h.seq], reverse=reverse)  # type: ignore[arg-type, return-value]
    return [h.seq for h in ordered]


# -- THREAD --------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """A thread container (RFC 5256 §3): a message, or a dummy (``message`` None)."""

    message: Headers | None = None
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)

    def is_ancestor_of(self, other: Node) -> bool:
        current: Node | None = other
        while current is not None:
            if current is self:
                return True
            current = current.parent
        return False

    def adopt(self, child: Node) -> None:
        if child.parent is not None:
            child.parent.children.remove(child)
        child.parent = self
        self.children.append(child)

    def sort_date(self) -> tuple[dt.datetime, int]:
        """A dummy takes the date of its first child (children sorted first)."""
        if self.message is not None:
            return self.message.sent, self.message.seq
        return self.children[0].sort_date() if self.children else (_EPOCH, 0)

    def subject(self) -> tuple[str, bool]:
        if self.message is not None:
            return base_subject(self.message.get("subject"))
        return self.children[0].subject() if self.children else ("", False)


def _sort_tree(nodes: list[Node]) -> None:
    for node in nodes:
        _sort_tree(node.children)
    nodes.sort(key=Node.sort_date)


def _prune(nodes: list[Node], at_root: bool) -> list[Node]:
    """RFC 5256 §3 step 4: drop empty dummies; promote a dummy's children,
    except at the root when it holds more than one child."""
    result: list[Node] = []
    for node in nodes:
        node.children = _prune(node.children, False)
        for child in node.children:
            child.parent = node
        if node.message is None:
            if not node.children:
                continue
            if not at_root or len(node.children) == 1:
                for child in node.children:
                    child.parent = None
                result.extend(node.children)
                continue
        result.append(node)
    return result


def thread_references(items: Sequence[Headers]) -> list[Node]:
    """RFC 5256 §3 REFERENCES."""
    table: dict[str, Node] = {}
    unique = 0
    for item in sorted(items, key=lambda h: h.seq):
        # (1) the message's own container; a missing or duplicate Message-ID gets a fresh one.
        ids = _MSG_ID.findall(item.get("message-id"))
        own_id = ids[0] if ids else ""
        if not own_id or (own_id in table and table[own_id].message is not None):
            unique += 1
            own_id = f"\0mssd-{unique}"
        node = table.setdefault(own_id, Node())
        node.message = item
        references = _MSG_ID.findall(item.get("references"))
        if not references:
            references = _MSG_ID.findall(item.get("in-reply-to"))[:1]
        # (1.A) link the references in order, without replacing a parent or making a loop.
        previous: Node | None = None
        for ref in references:
            container = table.setdefault(ref, Node())
            if (
                previous is not None
                and container.parent is None
                and container is not previous
                and not container.is_ancestor_of(previous)
            ):
                previous.adopt(container)
            previous = container
        # (1.B) the last reference becomes the parent, replacing any earlier one.
        if previous is not None and previous is not node and not node.is_ancestor_of(previous):
            previous.adopt(node)
        elif previous is None and node.parent is not None:
            node.parent.children.remove(node)
            node.parent = None
    # (2) the root set; (3) the table goes; (4) prune dummies.
    roots = _prune([n for n in table.values() if n.parent is None], True)
    _sort_tree(roots)
    # (5) gather threads by base subject.
    by_subject: dict[str, Node] = {}
    for root in roots:
        subject, reply = root.subject()
        if not subject:
            continue
        old = by_subject.get(subject.casefold())
        if (
            old is None
            or (root.message is None and old.message is not None)
            or (old.message is not None and old.subject()[1] and not reply)
        ):
            by_subject[subject.casefold()] = root
    merged: list[Node] = []
    for root in roots:
        subject, reply = root.subject()
        holder = by_subject.get(subject.casefold()) if subject else None
        if holder is None or holder is root:
            merged.append(root)
            continue
        if holder.message is None and root.message is None:
            for child in list(root.children):
                holder.adopt(child)
        elif holder.message is None:
            holder.adopt(root)
        elif reply and holder.message is not None and not holder.subject()[1]:
            holder.adopt(root)
        else:
            # Neither is a dummy nor the other's reply: both go under a new dummy
            # that takes the holder's place.
            dummy = Node()
            position = merged.index(holder) if holder in merged else -1
            dummy.adopt(holder)
            dummy.adopt(root)
            by_subject[subject.casefold()] = dummy
            if position >= 0:
                merged[position] = dummy
            else:
                merged.append(dummy)
            continue
    final = [n for n in merged if n.parent is None]
    # (6) sort every level by sent date (then sequence number).
    _sort_tree(final)
    return final


def thread_ordered_subject(items: Sequence[Headers]) -> list[Node]:
    """RFC 5256 §3 ORDEREDSUBJECT: by base subject then sent date; the first
    message of each subject is the parent of all the others."""
    ordered = sorted(
        items, key=lambda h: (base_subject(h.get("subject"))[0].casefold(), h.sent, h.seq)
    )
    roots: list[Node] = []
    current = ""
    for item in ordered:
        subject = base_subject(item.get("subject"))[0].casefold()
        node = Node(item)
        if roots and subject == current:
            roots[-1].adopt(node)
        else:
            roots.append(node)
            current = subject
    roots.sort(key=Node.sort_date)
    return roots


def _number(node: Node, uid: bool) -> int:
    assert node.message is not None
    return node.message.uid if uid else node.message.seq


def _members(node: Node, uid: bool) -> str:
    """RFC 5256 §5 thread-members / thread-nested for one container."""
    if node.message is None:
        if len(node.children) == 1:
            return _members(node.children[0], uid)
        return "".join(f"({_members(child, uid)})" for child in node.children)
    text = str(_number(node, uid))
    if len(node.children) == 1:
        return f"{text} {_members(node.children[0], uid)}"
    if node.children:
        return text + " " + "".join(f"({_members(child, uid)})" for child in node.children)
    return text


def format_threads(roots: Sequence[Node], uid: bool) -> str:
    """``* THREAD`` and its thread-lists (RFC 5256 §4)."""
    return (
        "* THREAD"
        + ("" if not roots else " ")
        + "".join(f"({_members(root, uid)})" for root in roots)
    )


# -- commands ------------------------------------------------------------------------


async def load_headers(session: Session, key: SearchKey) -> list[Headers]:
    chosen = await matching(session, key)
    services = session.services
    heads = await services.heads.heads(services.mailstore, [row for _, row in chosen])
    fields = [heads[row.sha256].root.headers for _, row in chosen]

    def decode_all() -> list[dict[str, str]]:
        return [wanted_fields(headers) for headers in fields]

    parsed = await asyncio.to_thread(decode_all) if len(fields) > _OFFLOAD_COUNT else decode_all()
    return [
        Headers(seq, row.uid, row.size, row.internal_date, found)
        for (seq, row), found in zip(chosen, parsed, strict=True)
    ]


async def cmd_sort(session: Session, command: Command) -> None:
    """RFC 5256 §3 SORT / UID SORT: ``* SORT`` with sequence numbers or UIDs,
    and the highest mod-sequence returned when a MODSEQ criterion chose them."""
    assert isinstance(command.args, SortArgs)
    items = await load_headers(session, command.args.key)
    criteria = [(c.key, c.reverse) for c in command.args.criteria]
    seqs = sort_messages(items, criteria)
    by_seq = {h.seq: h.uid for h in items}
    numbers = [by_seq[s] for s in seqs] if command.uid else seqs
    line = "* SORT" + "".join(f" {n}" for n in numbers)
    if has_modseq(command.args.key):
        # RFC 7162 §3.1.9: with a MODSEQ criterion, a non-empty SORT response ends
        # with the highest mod-sequence of the messages returned, as SEARCH does
        # (§3.1.6); sort-data and search-sort-mod-seq in §7.
        modseq = modseq_of_result(session, [h.uid for h in items], None)
        if modseq is not None:
            line += f" (MODSEQ {modseq})"
    await session.send((line + "\r\n").encode())
    await session.sync(allow_expunge=False)
    await session.tagged(command, "OK", "SORT completed")


_ALGORITHMS: dict[str, Callable[[Sequence[Headers]], list[Node]]] = {
    "REFERENCES": thread_references,
    "ORDEREDSUBJECT": thread_ordered_subject,
}


async def cmd_thread(session: Session, command: Command) -> None:
    """RFC 5256 §3 THREAD / UID THREAD."""
    assert isinstance(command.args, ThreadArgs)
    items = await load_headers(session, command.args.key)
    roots = _ALGORITHMS[command.args.algorithm](items)
    await session.send((format_threads(roots, command.uid) + "\r\n").encode())
    await session.sync(allow_expunge=False)
    await session.tagged(command, "OK", "THREAD completed")
