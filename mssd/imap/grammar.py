"""IMAP command grammar: one command's lines and literals in, a typed `Command` out.

This module owns the client-command grammar (RFC 3501 §9, RFC 9051 §9 and the extensions
mssd implements): `Parser` reads the tag and the command name and dispatches, through one
table (`_GRAMMARS`), to the method that parses that command's arguments. The token
primitives are in `mssd.imap.scanner`, the FETCH and SEARCH/SORT/THREAD arguments in
`mssd.imap.grammar_fetch_search`. It never touches a socket or the session state: the
reader (`mssd.imap.protocol.CommandReader`) frames the command and turns a `ParseError`
into a `ProtocolError`.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from collections.abc import Callable
from typing import Literal

from mssd.imap.commands import (
    AclArgs,
    AppendArgs,
    AppendMessage,
    AuthenticateArgs,
    Command,
    CommandArgs,
    CopyArgs,
    CreateArgs,
    EnableArgs,
    ExpungeArgs,
    IdArgs,
    ListArgs,
    LoginArgs,
    MailboxArgs,
    NoArgs,
    QresyncParams,
    QuotaRootArgs,
    RenameArgs,
    SelectArgs,
    SequenceSet,
    SetAclArgs,
    StatusArgs,
    StoreArgs,
)
from mssd.imap.grammar_fetch_search import FetchSearchGrammar
from mssd.imap.scanner import TAG_RE, ParseError

_BASE64_RE = re.compile(rb"[A-Za-z0-9+/]*={0,2}")

_SPECIAL_USE = {
    f.upper(): f
    for f in (
        "\\All",
        "\\Archive",
        "\\Drafts",
        "\\Flagged",
        "\\Junk",
        "\\Sent",
        "\\Trash",
        "\\Important",
    )
}
_STATUS_ITEMS = frozenset(
    {
        "MESSAGES",
        "UIDNEXT",
        "UIDVALIDITY",
        "UNSEEN",
        "DELETED",
        "SIZE",
        "RECENT",
        "HIGHESTMODSEQ",
        "APPENDLIMIT",
    }
)
UID_COMMANDS = frozenset({"COPY", "MOVE", "FETCH", "SEARCH", "STORE", "EXPUNGE", "SORT", "THREAD"})


class Parser(FetchSearchGrammar):
    """Recursive-descent parser over one command: its lines and the literals between them."""

    # -- commands ----------------------------------------------------------------------

    def command(self) -> Command:
        tag = self.regex(TAG_RE, "a tag").decode("ascii")
        self.tag = tag
        self.sp()
        name = self.keyword()
        uid = False
        if name == "UID":
            self.sp()
            name = self.keyword()
            uid = True
            if name not in UID_COMMANDS:
                self.fail(f"UID {name} is not a command")
        grammar = _GRAMMARS.get(name)
        if grammar is None:
            self.fail("unknown command")
        args = grammar(self, uid)
        if not self.done():
            self.fail(f"unexpected characters after {name} arguments")
        return Command(tag, name, uid, args)

    def no_args(self, uid: bool) -> CommandArgs:
        return NoArgs()

    def login(self, uid: bool) -> CommandArgs:
        self.sp()
        user = self.astring()
        self.sp()
        password = self.astring()
        return LoginArgs(
            user.decode("utf-8", "surrogateescape"), password.decode("utf-8", "surrogateescape")
        )

    def authenticate(self, uid: bool) -> CommandArgs:
        self.sp()
        mechanism = self.keyword()
        initial: bytes | None = None
        if self.accept(b" "):
            # RFC 4959 §3: "=" is an empty initial response.
            initial = b"" if self.accept(b"=") else _b64(self.regex(_BASE64_RE, "base64"))
        return AuthenticateArgs(mechanism, initial)

    def enable(self, uid: bool) -> CommandArgs:
        caps: list[str] = []
        while True:
            self.sp()
            caps.append(self.keyword())
            if self.peek() != ord(" "):
                return EnableArgs(tuple(caps))

    def id(self, uid: bool) -> CommandArgs:
        self.sp()
        if self.accept_word(b"NIL"):
            return IdArgs(None)
        params: list[tuple[str, str | None]] = []

        def pair() -> None:
            key = self.text(self.string())
            self.sp()
            value = self.nstring()
            params.append((key, None if value is None else self.text(value)))

        self.list_items(pair)
        return IdArgs(tuple(params))

    def select(self, uid: bool) -> CommandArgs:
        self.sp()
        mailbox = self.mailbox()
        condstore = False
        qresync: QresyncParams | None = None
        if self.accept(b" "):

            def param() -> None:
                nonlocal condstore, qresync
                name = self.keyword()
                if name == "CONDSTORE":  # RFC 7162 §3.1.8
                    condstore = True
                elif name == "QRESYNC":  # RFC 7162 §3.2.5
                    self.sp()
                    qresync = self.qresync()
                else:
                    self.fail(f"unknown SELECT parameter {name}")

            self.list_items(param, allow_empty=False)
        return SelectArgs(mailbox, condstore, qresync)

    def qresync(self) -> QresyncParams:
        self.open_list()
        uidvalidity = self.number(nonzero=True)
        self.sp()
        modseq = self.mod_sequence()
        known: SequenceSet | None = None
        match: tuple[SequenceSet, SequenceSet] | None = None
        if self.accept(b" ") and self.peek() != ord("("):
            known = self.sequence_set()
            self.accept(b" ")
        if self.accept(b"("):
            seqs = self.sequence_set()
            self.sp()
            match = (seqs, self.sequence_set())
            self.expect(b")", '")"')
        self.expect(b")", '")"')
        return QresyncParams(uidvalidity, modseq, known, match)

    def mailbox_only(self, uid: bool) -> CommandArgs:
        self.sp()
        return MailboxArgs(self.mailbox())

    def create(self, uid: bool) -> CommandArgs:
        self.sp()
        mailbox = self.mailbox()
        uses: list[str] = []
        if self.accept(b" "):

            def use_attr() -> None:
                self.expect(b"\\", "a special-use attribute")
                attr = "\\" + self.atom().decode("ascii")
                uses.append(_SPECIAL_USE.get(attr.upper(), attr))

            def param() -> None:
                if self.keyword() != "USE":  # RFC 6154 §3
                    self.fail("unknown CREATE parameter")
                self.sp()
                self.list_items(use_attr)

            self.list_items(param, allow_empty=False)
        return CreateArgs(mailbox, tuple(uses))

    def rename(self, uid: bool) -> CommandArgs:
        self.sp()
        old = self.mailbox()
        self.sp()
        return RenameArgs(old, self.mailbox())

    def status_items(self) -> tuple[str, ...]:
        items: list[str] = []

        def item() -> None:
            name = self.keyword()
            if name not in _STATUS_ITEMS:
                self.fail(f"unknown STATUS item {name}")
            items.append(name)

        self.list_items(item, allow_empty=False)
        return tuple(items)

    def status(self, uid: bool) -> CommandArgs:
        self.sp()
        mailbox = self.mailbox()
        self.sp()
        return StatusArgs(mailbox, self.status_items())

    def list(self, uid: bool) -> CommandArgs:
        # RFC 5258 §6: list = "LIST" [SP list-select-opts] SP mailbox SP mbox-or-pat
        #                     [SP list-return-opts]
        self.sp()
        select: set[str] = set()
        extended = False
        if self.peek() == ord("("):
            extended = True

            def select_opt() -> None:
                opt = self.keyword()
                if opt not in ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"):
                    self.fail(f"unknown LIST selection option {opt}")
                select.add(opt)

            self.list_items(select_opt)
            self.sp()
            if "RECURSIVEMATCH" in select and select <= {"RECURSIVEMATCH", "REMOTE"}:
                self.fail("RECURSIVEMATCH needs another selection option")  # RFC 5258 §3
        reference = self.mailbox_name(self.astring())
        self.sp()
        patterns: list[str] = []
        if self.peek() == ord("("):
            extended = True
            self.list_items(lambda: patterns.append(self.list_mailbox()), allow_empty=False)
        else:
            patterns.append(self.list_mailbox())
        returns: set[str] = set()
        status: tuple[str, ...] | None = None
        if self.accept(b" "):
            extended = True
            if self.keyword() != "RETURN":
                self.fail("expected RETURN")
            self.sp()

            def return_opt() -> None:
                nonlocal status
                opt = self.keyword()
                if opt == "STATUS":  # RFC 5819 §2
                    self.sp()
                    status = self.status_items()
                elif opt not in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE"):
                    self.fail(f"unknown LIST return option {opt}")
                returns.add(opt)

            self.list_items(return_opt)
        return ListArgs(
            reference, tuple(patterns), frozenset(select), frozenset(returns), status, extended
        )

    def lsub(self, uid: bool) -> CommandArgs:
        self.sp()
        reference = self.mailbox_name(self.astring())
        self.sp()
        return ListArgs(reference, (self.list_mailbox(),))

    def append(self, uid: bool) -> CommandArgs:
        # RFC 3502 §6: append = "APPEND" SP mailbox 1*append-message
        self.sp()
        mailbox = self.mailbox()
        messages: list[AppendMessage] = []
        while True:
            self.sp()
            flags: tuple[str, ...] = ()
            when: datetime.datetime | None = None
            if self.peek() == ord("("):
                flags = self.flag_list()
                self.sp()
            if self.peek() == ord('"'):
                when = self.date_time()
                self.sp()
            if self.accept_word(b"UTF8"):
                # RFC 6855 §4: append-data =/ "UTF8" SP "(" literal8 ")"
                self.sp()
                self.open_list()
                data, _ = self.literal(allow_binary=True)
                self.expect(b")", '")"')
                messages.append(AppendMessage(flags, when, data, binary=True, utf8=True))
            else:
                data, binary = self.literal(allow_binary=True)  # RFC 3516 §4.4 literal8
                messages.append(AppendMessage(flags, when, data, binary=binary))
            if self.done():
                return AppendArgs(mailbox, tuple(messages))

    def store(self, uid: bool) -> CommandArgs:
        self.sp()
        sequence = self.sequence_set()
        self.sp()
        unchanged: int | None = None
        if self.peek() == ord("("):

            def modifier() -> None:
                nonlocal unchanged
                if self.keyword() != "UNCHANGEDSINCE":  # RFC 7162 §3.1.3
                    self.fail("unknown STORE modifier")
                self.sp()
                unchanged = self.mod_sequence(allow_zero=True)

            self.list_items(modifier, allow_empty=False)
            self.sp()
        action: Literal["replace", "add", "remove"] = "replace"
        if self.accept(b"+"):
            action = "add"
        elif self.accept(b"-"):
            action = "remove"
        item = self.keyword()
        if item not in ("FLAGS", "FLAGS.SILENT"):
            self.fail("expected FLAGS, +FLAGS or -FLAGS")
        self.sp()
        if self.peek() == ord("("):
            flags = self.flag_list()
        else:
            single = [self.flag()]
            while self.accept(b" "):
                single.append(self.flag())
            flags = tuple(single)
        return StoreArgs(sequence, action, item.endswith(".SILENT"), flags, unchanged)

    def copy(self, uid: bool) -> CommandArgs:
        self.sp()
        sequence = self.sequence_set()
        self.sp()
        return CopyArgs(sequence, self.mailbox())

    def expunge(self, uid: bool) -> CommandArgs:
        if not uid:
            return ExpungeArgs()
        self.sp()
        return ExpungeArgs(self.sequence_set())

    def setacl(self, uid: bool) -> CommandArgs:
        self.sp()
        mailbox = self.mailbox()
        self.sp()
        identifier = self.text(self.astring())
        self.sp()
        rights = self.text(self.astring())
        action: Literal["replace", "add", "remove"] = "replace"
        if rights[:1] in ("+", "-"):  # RFC 4314 §3.1 mod-rights
            action = "add" if rights[0] == "+" else "remove"
            rights = rights[1:]
        return SetAclArgs(mailbox, identifier, action, rights)

    def acl_identifier(self, uid: bool) -> CommandArgs:
        self.sp()
        mailbox = self.mailbox()
        self.sp()
        return AclArgs(mailbox, self.text(self.astring()))

    def getquota(self, uid: bool) -> CommandArgs:
        self.sp()
        return QuotaRootArgs(self.text(self.astring()))


def _b64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise ParseError("invalid base64") from None


_Grammar = Callable[[Parser, bool], CommandArgs]
_GRAMMARS: dict[str, _Grammar] = {
    **{
        name: Parser.no_args
        for name in (
            "CAPABILITY",
            "NOOP",
            "LOGOUT",
            "STARTTLS",
            "CHECK",
            "CLOSE",
            "UNSELECT",
            "IDLE",
            "NAMESPACE",
        )
    },
    "LOGIN": Parser.login,
    "AUTHENTICATE": Parser.authenticate,
    "ENABLE": Parser.enable,
    "ID": Parser.id,
    "SELECT": Parser.select,
    "EXAMINE": Parser.select,
    "CREATE": Parser.create,
    "DELETE": Parser.mailbox_only,
    "SUBSCRIBE": Parser.mailbox_only,
    "UNSUBSCRIBE": Parser.mailbox_only,
    "RENAME": Parser.rename,
    "STATUS": Parser.status,
    "LIST": Parser.list,
    "LSUB": Parser.lsub,
    "APPEND": Parser.append,
    "FETCH": Parser.fetch,
    "STORE": Parser.store,
    "COPY": Parser.copy,
    "MOVE": Parser.copy,
    "EXPUNGE": Parser.expunge,
    "SEARCH": Parser.search,
    "SORT": Parser.sort,
    "THREAD": Parser.thread,
    "GETACL": Parser.mailbox_only,
    "MYRIGHTS": Parser.mailbox_only,
    "SETACL": Parser.setacl,
    "DELETEACL": Parser.acl_identifier,
    "LISTRIGHTS": Parser.acl_identifier,
    "GETQUOTA": Parser.getquota,
    "GETQUOTAROOT": Parser.mailbox_only,
}
