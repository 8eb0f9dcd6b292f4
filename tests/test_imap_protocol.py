"""The sans-I/O IMAP command reader: framing, literals, per-command grammars, recovery."""

from __future__ import annotations

import dataclasses
import datetime

import pytest
from fuzzing import mutated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mssd.imap import protocol
from mssd.imap.commands import (
    AclArgs,
    AppendArgs,
    AppendMessage,
    AuthenticateArgs,
    Command,
    CopyArgs,
    CreateArgs,
    EnableArgs,
    ExpungeArgs,
    FetchArgs,
    FetchAttr,
    IdArgs,
    IdleDone,
    ListArgs,
    LoginArgs,
    MailboxArgs,
    NeedContinuation,
    NoArgs,
    ProtocolError,
    QresyncParams,
    QuotaRootArgs,
    RenameArgs,
    SaslResponse,
    SearchAll,
    SearchAnd,
    SearchArgs,
    SearchDate,
    SearchFlag,
    SearchHeader,
    SearchKey,
    SearchModSeq,
    SearchNot,
    SearchOr,
    SearchSet,
    SearchSize,
    SearchText,
    SelectArgs,
    SequenceSet,
    SetAclArgs,
    SortArgs,
    SortCriterion,
    StatusArgs,
    StoreArgs,
    ThreadArgs,
)
from mssd.imap.fetchdata import SectionSpec
from mssd.imap.names import decode_mailbox_name, encode_mailbox_name
from mssd.imap.protocol import CommandReader

Event = Command | NeedContinuation | ProtocolError


def events(data: bytes, reader: CommandReader | None = None) -> list[Event]:
    reader = reader or CommandReader()
    reader.feed(data)
    out: list[Event] = []
    while (event := reader.next()) is not None:
        out.append(event)
    return out


def one(data: bytes, *, utf8: bool = False) -> Command:
    reader = CommandReader()
    reader.utf8 = utf8
    result = [e for e in events(data, reader) if not isinstance(e, NeedContinuation)]
    assert len(result) == 1, result
    command = result[0]
    assert isinstance(command, Command), command
    return command


def error(data: bytes) -> ProtocolError:
    result = events(data)
    assert len(result) == 1, result
    assert isinstance(result[0], ProtocolError), result
    return result[0]


def search_key(text: bytes) -> SearchKey:
    args = one(b"s SEARCH " + text + b"\r\n").args
    assert isinstance(args, SearchArgs)
    return args.key


# --- RFC examples ---------------------------------------------------------------------


def test_rfc3501_fetch_example_parses_header_fields_section() -> None:
    command = one(b"a002 FETCH 2:4 (FLAGS BODY[HEADER.FIELDS (DATE FROM)])\r\n")
    assert command == Command(
        "a002",
        "FETCH",
        False,
        FetchArgs(
            SequenceSet(((2, 4),)),
            (
                FetchAttr("FLAGS"),
                FetchAttr("BODY", SectionSpec((), "HEADER.FIELDS", ("DATE", "FROM"))),
            ),
        ),
    )


def test_rfc4731_search_return_example() -> None:
    command = one(b'A282 SEARCH RETURN (MIN COUNT) FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"\r\n')
    assert command.args == SearchArgs(
        SearchAnd(
            (
                SearchFlag("\\Flagged", True),
                SearchDate("INTERNAL", "SINCE", datetime.date(1994, 2, 1)),
                SearchNot(SearchHeader("FROM", "Smith")),
            )
        ),
        None,
        ("MIN", "COUNT"),
    )


RFC_MESSAGE = (
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\r\n"
    b"From: Fred Foobar <foobar@Blurdybloop.COM>\r\n"
    b"Subject: afternoon meeting\r\n"
    b"To: mooch@owatagu.siam.edu\r\n"
    b"Message-Id: <B27397-0100000@Blurdybloop.COM>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
    b"\r\n"
    b"Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n"
)


def test_rfc3501_append_asks_for_continuation_then_returns_the_message() -> None:
    reader = CommandReader()
    reader.feed(b"A003 APPEND saved-messages (\\Seen) {%d}\r\n" % len(RFC_MESSAGE))
    assert reader.next() == NeedContinuation("A003", "APPEND", len(RFC_MESSAGE), False)
    assert reader.next() is None
    reader.feed(RFC_MESSAGE + b"\r\n")
    command = reader.next()
    assert command == Command(
        "A003",
        "APPEND",
        False,
        AppendArgs("saved-messages", (AppendMessage(("\\Seen",), None, RFC_MESSAGE),)),
    )
    assert reader.next() is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"a001 CAPABILITY", Command("a001", "CAPABILITY", False, NoArgs())),
        (b"a002 noop", Command("a002", "NOOP", False, NoArgs())),
        (b"A023 LOGOUT", Command("A023", "LOGOUT", False, NoArgs())),
        (b"a001 login SMITH SESAME", Command("a001", "LOGIN", False, LoginArgs("SMITH", "SESAME"))),
        (b"A142 SELECT INBOX", Command("A142", "SELECT", False, SelectArgs("INBOX"))),
        (b"A932 EXAMINE blurdybloop", Command("A932", "EXAMINE", False, SelectArgs("blurdybloop"))),
        (b"A003 CREATE owatagusiam/", Command("A003", "CREATE", False, CreateArgs("owatagusiam/"))),
        (b"A683 DELETE blurdybloop", Command("A683", "DELETE", False, MailboxArgs("blurdybloop"))),
        (
            b"A682 RENAME blurdybloop sarasoop",
            Command("A682", "RENAME", False, RenameArgs("blurdybloop", "sarasoop")),
        ),
        (
            b"A002 SUBSCRIBE #news.comp.mail.mime",
            Command("A002", "SUBSCRIBE", False, MailboxArgs("#news.comp.mail.mime")),
        ),
        (
            b'A101 LIST "" ""',
            Command("A101", "LIST", False, ListArgs("", ("",))),
        ),
        (
            b"A202 LIST ~/Mail/ %",
            Command("A202", "LIST", False, ListArgs("~/Mail/", ("%",))),
        ),
        (
            b'A002 LSUB "#news." "comp.mail.*"',
            Command("A002", "LSUB", False, ListArgs("#news.", ("comp.mail.*",))),
        ),
        (
            b"A042 STATUS blurdybloop (UIDNEXT MESSAGES)",
            Command("A042", "STATUS", False, StatusArgs("blurdybloop", ("UIDNEXT", "MESSAGES"))),
        ),
        (b"FXXZ CHECK", Command("FXXZ", "CHECK", False, NoArgs())),
        (b"A341 CLOSE", Command("A341", "CLOSE", False, NoArgs())),
        (b"A202 EXPUNGE", Command("A202", "EXPUNGE", False, ExpungeArgs())),
        (
            b"A003 STORE 2:4 +FLAGS (\\Deleted)",
            Command(
                "A003",
                "STORE",
                False,
                StoreArgs(SequenceSet(((2, 4),)), "add", False, ("\\Deleted",)),
            ),
        ),
        (
            b"A003 COPY 2:4 MEETING",
            Command("A003", "COPY", False, CopyArgs(SequenceSet(((2, 4),)), "MEETING")),
        ),
        (
            b"A999 UID FETCH 4827313:4828442 FLAGS",
            Command(
                "A999",
                "FETCH",
                True,
                FetchArgs(SequenceSet(((4827313, 4828442),)), (FetchAttr("FLAGS"),)),
            ),
        ),
        (
            b"a UID MOVE 42:69 foo",
            Command("a", "MOVE", True, CopyArgs(SequenceSet(((42, 69),)), "foo")),
        ),
        (
            b"A003 UID EXPUNGE 3000:3002",
            Command("A003", "EXPUNGE", True, ExpungeArgs(SequenceSet(((3000, 3002),)))),
        ),
        (b"abcd IDLE", Command("abcd", "IDLE", False, NoArgs())),
        (b"A001 NAMESPACE", Command("A001", "NAMESPACE", False, NoArgs())),
        (b"A301 UNSELECT", Command("A301", "UNSELECT", False, NoArgs())),
        (b"a STARTTLS", Command("a", "STARTTLS", False, NoArgs())),
        (
            b"t2 ENABLE CONDSTORE qresync",
            Command("t2", "ENABLE", False, EnableArgs(("CONDSTORE", "QRESYNC"))),
        ),
        (
            b'a023 ID ("name" "sodr" "version" "19.34" "vendor" NIL)',
            Command(
                "a023",
                "ID",
                False,
                IdArgs((("name", "sodr"), ("version", "19.34"), ("vendor", None))),
            ),
        ),
        (b"a023 ID NIL", Command("a023", "ID", False, IdArgs(None))),
        (
            b"a1 AUTHENTICATE PLAIN dGVzdAB0ZXN0AHRlc3Q=",
            Command("a1", "AUTHENTICATE", False, AuthenticateArgs("PLAIN", b"test\0test\0test")),
        ),
        (
            b"a1 AUTHENTICATE EXTERNAL =",
            Command("a1", "AUTHENTICATE", False, AuthenticateArgs("EXTERNAL", b"")),
        ),
        (
            b"a1 authenticate xoauth2",
            Command("a1", "AUTHENTICATE", False, AuthenticateArgs("XOAUTH2", None)),
        ),
        (b"A01 GETACL INBOX", Command("A01", "GETACL", False, MailboxArgs("INBOX"))),
        (
            b"A035 SETACL INBOX/Drafts John lrQswicda",
            Command(
                "A035", "SETACL", False, SetAclArgs("INBOX/Drafts", "John", "replace", "lrQswicda")
            ),
        ),
        (
            b"A036 SETACL INBOX/Drafts Fred -w",
            Command("A036", "SETACL", False, SetAclArgs("INBOX/Drafts", "Fred", "remove", "w")),
        ),
        (
            b'A002 SETACL INBOX/Drafts John "+r"',
            Command("A002", "SETACL", False, SetAclArgs("INBOX/Drafts", "John", "add", "r")),
        ),
        (
            b"A036 DELETEACL INBOX/Drafts Fred",
            Command("A036", "DELETEACL", False, AclArgs("INBOX/Drafts", "Fred")),
        ),
        (
            b"a001 LISTRIGHTS ~/Mail/saved smith",
            Command("a001", "LISTRIGHTS", False, AclArgs("~/Mail/saved", "smith")),
        ),
        (b"A003 MYRIGHTS INBOX", Command("A003", "MYRIGHTS", False, MailboxArgs("INBOX"))),
        (
            b'G0001 GETQUOTA "!partition/sda4"',
            Command("G0001", "GETQUOTA", False, QuotaRootArgs("!partition/sda4")),
        ),
        (b"A003 GETQUOTAROOT INBOX", Command("A003", "GETQUOTAROOT", False, MailboxArgs("INBOX"))),
    ],
)
def test_rfc_example_commands_parse(line: bytes, expected: Command) -> None:
    assert one(line + b"\r\n") == expected


def test_command_names_and_keywords_are_case_insensitive() -> None:
    assert one(b"x uid fetch 1 (flags body.peek[text])\r\n") == Command(
        "x",
        "FETCH",
        True,
        FetchArgs(
            SequenceSet(((1, 1),)),
            (FetchAttr("FLAGS"), FetchAttr("BODY", SectionSpec((), "TEXT"), None, True)),
        ),
    )


def test_inbox_is_case_insensitive_other_names_are_not() -> None:
    assert one(b"a SELECT iNbOx\r\n").args == SelectArgs("INBOX")
    assert one(b"a SELECT iNbOx/Sub\r\n").args == SelectArgs("iNbOx/Sub")


def test_select_with_condstore_and_full_qresync() -> None:
    command = one(
        b"A03 SELECT INBOX (QRESYNC (67890007 90060115194045000 41:211,214:541 "
        b"(1:5,7 41:45,49)) CONDSTORE)\r\n"
    )
    assert command.args == SelectArgs(
        "INBOX",
        True,
        QresyncParams(
            67890007,
            90060115194045000,
            SequenceSet(((41, 211), (214, 541))),
            (SequenceSet(((1, 5), (7, 7))), SequenceSet(((41, 45), (49, 49)))),
        ),
    )


def test_create_with_special_use() -> None:
    assert one(b"t1 CREATE MySpecial (USE (\\drafts \\Sent))\r\n").args == CreateArgs(
        "MySpecial", ("\\Drafts", "\\Sent")
    )


def test_list_extended_with_selection_patterns_and_return_options() -> None:
    command = one(
        b'A04 LIST (SUBSCRIBED RECURSIVEMATCH) "" ("%" "foo/*") '
        b"RETURN (CHILDREN SPECIAL-USE STATUS (MESSAGES UNSEEN))\r\n"
    )
    assert command.args == ListArgs(
        "",
        ("%", "foo/*"),
        frozenset({"SUBSCRIBED", "RECURSIVEMATCH"}),
        frozenset({"CHILDREN", "SPECIAL-USE", "STATUS"}),
        ("MESSAGES", "UNSEEN"),
        True,
    )


def test_list_recursivematch_alone_is_an_error() -> None:
    assert error(b'A04 LIST (RECURSIVEMATCH) "" %\r\n').tag == "A04"


def test_multiappend_with_dates_flags_literal_plus_and_literal8() -> None:
    command = one(
        b'A003 APPEND saved (\\Seen $Label) " 7-Feb-1994 21:52:25 -0800" {3+}\r\nabc'
        b" ~{2+}\r\n\x00\x01 UTF8 (~{2+}\r\n\xc3\xa9)\r\n"
    )
    tz = datetime.timezone(-datetime.timedelta(hours=8))
    assert command.args == AppendArgs(
        "saved",
        (
            AppendMessage(
                ("\\Seen", "$Label"), datetime.datetime(1994, 2, 7, 21, 52, 25, tzinfo=tz), b"abc"
            ),
            AppendMessage((), None, b"\x00\x01", binary=True),
            AppendMessage((), None, b"\xc3\xa9", binary=True, utf8=True),
        ),
    )


def test_fetch_macros_expand() -> None:
    args = one(b"a FETCH 1:* ALL\r\n").args
    assert isinstance(args, FetchArgs)
    assert [a.name for a in args.attrs] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]
    args = one(b"a FETCH 1 fast\r\n").args
    assert isinstance(args, FetchArgs)
    assert [a.name for a in args.attrs] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]


def test_fetch_every_item_kind() -> None:
    args = one(
        b"a UID FETCH 1,3:* (UID INTERNALDATE RFC822.SIZE RFC822 RFC822.HEADER RFC822.TEXT "
        b"ENVELOPE BODY BODYSTRUCTURE MODSEQ BODY[] BODY.PEEK[1.2.HEADER.FIELDS.NOT (X-A)]<10.20> "
        b"BODY[3.MIME] BODY[2] BINARY[1]<0.5> BINARY.PEEK[] BINARY.SIZE[2.1]) "
        b"(CHANGEDSINCE 12345 VANISHED)\r\n"
    ).args
    assert args == FetchArgs(
        SequenceSet(((1, 1), (3, None))),
        (
            FetchAttr("UID"),
            FetchAttr("INTERNALDATE"),
            FetchAttr("RFC822.SIZE"),
            FetchAttr("RFC822"),
            FetchAttr("RFC822.HEADER"),
            FetchAttr("RFC822.TEXT"),
            FetchAttr("ENVELOPE"),
            FetchAttr("BODY"),
            FetchAttr("BODYSTRUCTURE"),
            FetchAttr("MODSEQ"),
            FetchAttr("BODY", SectionSpec()),
            FetchAttr("BODY", SectionSpec((1, 2), "HEADER.FIELDS.NOT", ("X-A",)), (10, 20), True),
            FetchAttr("BODY", SectionSpec((3,), "MIME")),
            FetchAttr("BODY", SectionSpec((2,))),
            FetchAttr("BINARY", SectionSpec((1,)), (0, 5)),
            FetchAttr("BINARY", SectionSpec(), None, True),
            FetchAttr("BINARY.SIZE", SectionSpec((2, 1))),
        ),
        12345,
        True,
    )


@pytest.mark.parametrize(
    "line",
    [
        b"a FETCH 1 (CHANGEDSINCE 1 VANISHED)",
        b"a FETCH 1 FLAGS (VANISHED)",
        b"a FETCH 1 BODY[1.]",
        b"a FETCH 1 BODY[MIME]",
        b"a FETCH 1 BODY.PEEK",
        b"a FETCH 1 BODY[]<1>",
        b"a FETCH 1 BINARY[TEXT]",
        b"a FETCH 0 FLAGS",
        b"a FETCH 1 ()",
        b"a FETCH 1 FLAGS extra",
        b"a FETCH 99999999999 FLAGS",
    ],
)
def test_malformed_fetch_is_bad(line: bytes) -> None:
    assert error(line + b"\r\n").tag == "a"


@pytest.mark.parametrize(
    "line",
    [b"a SEARCH OR ", b"a SEARCH NOT ", b"a SEARCH OR SEEN ", b"a UID SORT (DATE) UTF-8 OR "],
)
def test_a_search_key_missing_at_the_end_of_the_line_is_bad(line: bytes) -> None:
    """The line ends where a search key must start (found by the fuzz test below)."""
    assert error(line + b"\r\n") == ProtocolError("a", "a search key is missing", None, "BAD")


def test_store_forms() -> None:
    assert one(b"a STORE 1 FLAGS.SILENT \\Seen $Junk\r\n").args == StoreArgs(
        SequenceSet(((1, 1),)), "replace", True, ("\\Seen", "$Junk")
    )
    assert one(b"a UID STORE $ (UNCHANGEDSINCE 320162338) -FLAGS.SILENT (\\deleted)\r\n").args == (
        StoreArgs(SequenceSet((), saved=True), "remove", True, ("\\Deleted",), 320162338)
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (b"ALL", SearchAll()),
        (b"ANSWERED", SearchFlag("\\Answered", True)),
        (b"BCC x", SearchHeader("BCC", "x")),
        (b"BEFORE 1-Feb-1994", SearchDate("INTERNAL", "BEFORE", datetime.date(1994, 2, 1))),
        (b'BODY "a b"', SearchText("BODY", "a b")),
        (b"CC x", SearchHeader("CC", "x")),
        (b"DELETED", SearchFlag("\\Deleted", True)),
        (b"DRAFT", SearchFlag("\\Draft", True)),
        (b"FLAGGED", SearchFlag("\\Flagged", True)),
        (b"FROM Smith", SearchHeader("FROM", "Smith")),
        (b'HEADER "X-Id" ""', SearchHeader("X-ID", "")),
        (b"KEYWORD $Forwarded", SearchFlag("$Forwarded", True)),
        (b"LARGER 1000", SearchSize("LARGER", 1000)),
        (b"NEW", SearchAnd((SearchFlag("\\Recent", True), SearchFlag("\\Seen", False)))),
        (b"NOT SEEN", SearchNot(SearchFlag("\\Seen", True))),
        (b"OLD", SearchFlag("\\Recent", False)),
        (b'ON "12-Dec-2023"', SearchDate("INTERNAL", "ON", datetime.date(2023, 12, 12))),
        (
            b"OR SEEN (FLAGGED DELETED)",
            SearchOr(
                SearchFlag("\\Seen", True),
                SearchAnd((SearchFlag("\\Flagged", True), SearchFlag("\\Deleted", True))),
            ),
        ),
        (b"RECENT", SearchFlag("\\Recent", True)),
        (b"SEEN", SearchFlag("\\Seen", True)),
        (b"SENTBEFORE 1-Jan-2000", SearchDate("SENT", "BEFORE", datetime.date(2000, 1, 1))),
        (b"SENTON 1-jan-2000", SearchDate("SENT", "ON", datetime.date(2000, 1, 1))),
        (b"SENTSINCE 01-JAN-2000", SearchDate("SENT", "SINCE", datetime.date(2000, 1, 1))),
        (b"SINCE 1-Feb-1994", SearchDate("INTERNAL", "SINCE", datetime.date(1994, 2, 1))),
        (b"SMALLER 10", SearchSize("SMALLER", 10)),
        (b"SUBJECT {4}\r\nhi!!", SearchHeader("SUBJECT", "hi!!")),
        (b"TEXT hello", SearchText("TEXT", "hello")),
        (b"TO x", SearchHeader("TO", "x")),
        (b"UID 1:*", SearchSet(SequenceSet(((1, None),)), True)),
        (b"UNANSWERED", SearchFlag("\\Answered", False)),
        (b"UNDELETED", SearchFlag("\\Deleted", False)),
        (b"UNDRAFT", SearchFlag("\\Draft", False)),
        (b"UNFLAGGED", SearchFlag("\\Flagged", False)),
        (b"UNKEYWORD foo", SearchFlag("foo", False)),
        (b"UNSEEN", SearchFlag("\\Seen", False)),
        (b"2,4:7,9", SearchSet(SequenceSet(((2, 2), (4, 7), (9, 9))), False)),
        (b"$", SearchSet(SequenceSet((), saved=True), False)),
        (b"MODSEQ 620162338", SearchModSeq(620162338)),
        (
            b'MODSEQ "/flags/\\\\draft" all 620162338',
            SearchModSeq(620162338, "/flags/\\draft", "all"),
        ),
    ],
)
def test_every_search_key(text: bytes, key: SearchKey) -> None:
    assert search_key(text) == key


def test_search_charset_decodes_literals_and_unknown_charset_is_badcharset() -> None:
    args = one(b"A284 SEARCH CHARSET ISO-8859-1 TEXT {1}\r\n\xe9\r\n").args
    assert args == SearchArgs(SearchText("TEXT", "é"), "ISO-8859-1")
    refused = error(b"A285 SEARCH CHARSET KOI8-R TEXT x\r\n")
    assert (refused.tag, refused.status) == ("A285", "NO")
    assert refused.code is not None and refused.code.startswith("BADCHARSET")


def test_search_nesting_is_bounded() -> None:
    assert error(b"a SEARCH " + b"NOT " * 1000 + b"ALL\r\n").tag == "a"
    assert error(b"a SEARCH " + b"(" * 1000 + b"ALL" + b")" * 1000 + b"\r\n").tag == "a"


def test_sort_and_thread() -> None:
    assert one(b"A283 SORT (SUBJECT REVERSE DATE) UTF-8 ALL\r\n").args == SortArgs(
        (SortCriterion("SUBJECT"), SortCriterion("DATE", True)), "UTF-8", SearchAll()
    )
    assert one(b"A284 UID THREAD ORDEREDSUBJECT UTF-8 SINCE 5-MAR-2000\r\n").args == ThreadArgs(
        "ORDEREDSUBJECT", "UTF-8", SearchDate("INTERNAL", "SINCE", datetime.date(2000, 3, 5))
    )
    assert error(b"a THREAD BOGUS UTF-8 ALL\r\n").tag == "a"


# --- strings, literals, framing -------------------------------------------------------


def test_quoted_strings_unescape_backslash_and_quote() -> None:
    assert one(b'a LOGIN "a\\\\b" "say \\"hi\\""\r\n').args == LoginArgs("a\\b", 'say "hi"')


def test_8bit_quoted_strings_need_utf8_accept() -> None:
    line = 'a SELECT "Boîte"\r\n'.encode()
    assert error(line).tag == "a"
    assert one(line, utf8=True).args == SelectArgs("Boîte")


def test_literal_plus_needs_no_continuation() -> None:
    assert events(b"a LOGIN {4+}\r\nfred {6+}\r\nsecret\r\n") == [
        Command("a", "LOGIN", False, LoginArgs("fred", "secret"))
    ]


def test_synchronizing_literals_each_ask_for_continuation() -> None:
    result = events(b"a LOGIN {4}\r\nfred {6}\r\nsecret\r\n")
    assert result == [
        NeedContinuation("a", "LOGIN", 4, False),
        NeedContinuation("a", "LOGIN", 6, False),
        Command("a", "LOGIN", False, LoginArgs("fred", "secret")),
    ]


def test_literal_split_at_every_byte_boundary() -> None:
    data = b"A003 APPEND saved (\\Seen) {%d+}\r\n" % len(RFC_MESSAGE) + RFC_MESSAGE + b"\r\n"
    data += b"A004 NOOP\r\n"
    expected = events(data)
    assert len(expected) == 2
    for cut in range(1, len(data)):
        reader = CommandReader()
        assert events(data[:cut], reader) + events(data[cut:], reader) == expected, cut


def test_byte_at_a_time_feeding() -> None:
    data = b"a LOGIN {4}\r\nfred {6}\r\nsecret\r\nb NOOP\r\n"
    reader = CommandReader()
    got: list[Event] = []
    for i in range(len(data)):
        got += events(data[i : i + 1], reader)
    assert got == events(data)


def test_synchronizing_literal_over_the_limit_is_refused_and_reader_recovers() -> None:
    reader = CommandReader(max_literal=100)
    assert events(b"a APPEND INBOX {101}\r\n", reader) == [
        ProtocolError("a", "literal too big", "TOOBIG")
    ]
    assert events(b"b NOOP\r\n", reader) == [Command("b", "NOOP", False, NoArgs())]


def test_non_synchronizing_literal_over_the_limit_is_discarded() -> None:
    reader = CommandReader(max_literal=10)
    first = events(b"a APPEND INBOX {20+}\r\n0123456789", reader)
    assert first == [ProtocolError("a", "literal too big", "TOOBIG")]
    # The rest of the literal, and a further literal of the same command, are skipped.
    assert events(b"0123456789 {3+}\r\nx\r\n\r\nb NOOP\r\n", reader)[-1] == Command(
        "b", "NOOP", False, NoArgs()
    )


def test_literal_minus_limits_non_synchronizing_literals_to_4096() -> None:
    reader = CommandReader(literal_plus=False)
    assert events(b"a APPEND INBOX {4096+}\r\n" + b"x" * 4096 + b"\r\n", reader)[0].tag == "a"
    refused = events(b"b APPEND INBOX {4097+}\r\n" + b"x" * 4097 + b"\r\nc NOOP\r\n", reader)
    assert refused == [
        ProtocolError("b", "literal too big", "TOOBIG"),
        Command("c", "NOOP", False, NoArgs()),
    ]


def test_abort_literal_drops_the_command() -> None:
    reader = CommandReader()
    assert events(b"a APPEND INBOX {5000}\r\n", reader) == [
        NeedContinuation("a", "APPEND", 5000, False)
    ]
    reader.abort_literal()
    assert events(b"b NOOP\r\n", reader) == [Command("b", "NOOP", False, NoArgs())]


def test_literal8_announcement_says_binary() -> None:
    assert events(b"a APPEND INBOX ~{3}\r\n") == [NeedContinuation("a", "APPEND", 3, True)]


def test_literal8_outside_append_is_bad() -> None:
    assert events(b"a LOGIN ~{1+}\r\nx y\r\n") == [ProtocolError("a", "literal8 not allowed here")]


def test_too_long_line_is_reported_after_discarding_it() -> None:
    reader = CommandReader(max_line=100)
    assert events(b"a1 LOGIN " + b"x" * 500, reader) == []
    assert events(b"y" * 500, reader) == []
    assert events(b" z\r\nb NOOP\r\n", reader) == [
        ProtocolError("a1", "command line too long"),
        Command("b", "NOOP", False, NoArgs()),
    ]


def test_too_long_line_ending_in_a_literal_skips_the_literal() -> None:
    reader = CommandReader(max_line=100)
    result = events(b"a1 APPEND " + b"x" * 500 + b" {5+}\r\nhello\r\nb NOOP\r\n", reader)
    assert result == [
        ProtocolError("a1", "command line too long"),
        Command("b", "NOOP", False, NoArgs()),
    ]


@pytest.mark.parametrize(
    ("data", "tag"),
    [
        (b"\r\n", None),
        (b"+ NOOP\r\n", None),
        (b"a\r\n", "a"),
        (b"a NOTACOMMAND\r\n", "a"),
        (b"a UID NOOP\r\n", "a"),
        (b"a LOGIN\r\n", "a"),
        (b'a LOGIN "unterminated\r\n', "a"),
        (b"a SELECT &Jjo\r\n", "a"),
        (b"a SEARCH SINCE 31-Feb-2000\r\n", "a"),
        (b"a SEARCH FOO\r\n", "a"),
        (b"a STATUS INBOX (BOGUS)\r\n", "a"),
        (b"a LOGIN {x}\r\n", "a"),
        (b"a AUTHENTICATE PLAIN ###\r\n", "a"),
        (b'a APPEND INBOX "01-Foo-2000 00:00:00 +0000" {1+}\r\nx\r\n', "a"),
    ],
)
def test_malformed_commands_get_a_protocol_error_and_reader_stays_usable(
    data: bytes, tag: str | None
) -> None:
    reader = CommandReader()
    result = events(data + b"z NOOP\r\n", reader)
    assert len(result) == 2, result
    assert isinstance(result[0], ProtocolError) and result[0].tag == tag
    assert result[1] == Command("z", "NOOP", False, NoArgs())


def test_bare_lf_is_tolerated() -> None:
    assert events(b"a NOOP\n") == [Command("a", "NOOP", False, NoArgs())]


# --- raw line modes -------------------------------------------------------------------


def test_idle_done_and_anything_else() -> None:
    reader = CommandReader()
    reader.feed(b"t IDLE\r\n")
    assert reader.next() == Command("t", "IDLE", False, NoArgs())
    assert reader.next_idle_done() is None
    reader.feed(b"done\r\nxyz\r\nu NOOP\r\n")
    assert reader.next_idle_done() == IdleDone()
    assert isinstance(reader.next_idle_done(), ProtocolError)
    assert reader.next() == Command("u", "NOOP", False, NoArgs())


def test_sasl_continuation_lines() -> None:
    reader = CommandReader()
    reader.feed(b"dGVzdA==\r\n*\r\n!!\r\n\r\n")
    assert reader.next_sasl_response() == SaslResponse(b"test")
    assert reader.next_sasl_response() == SaslResponse(b"", cancelled=True)
    assert isinstance(reader.next_sasl_response(), ProtocolError)
    assert reader.next_sasl_response() == SaslResponse(b"")
    assert reader.next_sasl_response() is None


# --- mailbox names and sequence sets --------------------------------------------------


def test_rfc3501_modified_utf7_example_round_trips() -> None:
    wire = "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert decode_mailbox_name(wire, utf8=False) == "~peter/mail/台北/日本語"
    assert decode_mailbox_name(wire.encode(), utf8=False) == "~peter/mail/台北/日本語"
    assert encode_mailbox_name("~peter/mail/台北/日本語", utf8=False) == wire


def test_modified_utf7_ampersand_and_utf8_mode() -> None:
    assert encode_mailbox_name("R&D", utf8=False) == "R&-D"
    assert decode_mailbox_name("R&-D", utf8=False) == "R&D"
    assert encode_mailbox_name("Boîte & co", utf8=True) == "Boîte & co"
    assert decode_mailbox_name("Boîte".encode(), utf8=True) == "Boîte"
    assert one(b"a SELECT &U,BTFw-\r\n").args == SelectArgs("台北")


@pytest.mark.parametrize("bad", ["&U,BTFw", "&AGE-", "&U,BTF-", "a\x01", "&@@@-", "&2D0-"])
def test_malformed_modified_utf7_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_mailbox_name(bad, utf8=False)


@given(st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_modified_utf7_round_trips_any_name(name: str) -> None:
    try:
        wire = encode_mailbox_name(name, utf8=False)
    except UnicodeEncodeError:
        return  # lone surrogates have no UTF-16 form
    assert wire.isascii()
    assert decode_mailbox_name(wire, utf8=False) == name


def test_sequence_set_resolve_and_contains() -> None:
    seq = one(b"a FETCH 2,4:7,9,12:* FLAGS\r\n").args
    assert isinstance(seq, FetchArgs)
    assert seq.sequence.resolve(15) == [range(2, 3), range(4, 8), range(9, 10), range(12, 16)]
    assert seq.sequence.contains(5, 15) and not seq.sequence.contains(8, 15)
    assert str(seq.sequence) == "2,4:7,9,12:*"
    assert SequenceSet(((559, None),)).resolve(500) == [range(500, 501)]  # RFC 9051 §6.4.9
    assert SequenceSet(((None, None),)).resolve(0) == []
    assert SequenceSet(((7, 3), (4, 9))).resolve(100) == [range(3, 10)]
    saved = SequenceSet((), saved=True)
    assert saved.resolve(10, saved=[3, 4, 8, 11]) == [range(3, 5), range(8, 9)]
    with pytest.raises(ValueError):
        saved.resolve(10)


# --- fuzzing ---------------------------------------------------------------------------

VALID = [
    b"a002 FETCH 2:4 (FLAGS BODY[HEADER.FIELDS (DATE FROM)])\r\n",
    b'A282 SEARCH RETURN (MIN COUNT) FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"\r\n',
    b"A003 APPEND saved (\\Seen) {5+}\r\nhello\r\n",
    b'a LOGIN {4}\r\nfred "pw"\r\n',
    b"A03 SELECT INBOX (QRESYNC (67890007 90060115194045000 41:211 (1:5 41:45)))\r\n",
    b'A04 LIST (SUBSCRIBED) "" ("%" "x") RETURN (STATUS (MESSAGES))\r\n',
    b"a UID STORE 1:* (UNCHANGEDSINCE 3) +FLAGS.SILENT (\\Seen)\r\n",
    b"A283 SORT (REVERSE DATE) UTF-8 OR SEEN UID 1:3\r\n",
    b"a SETACL INBOX fred +lr\r\n",
]


def drain(reader: CommandReader, data: bytes) -> list[Event]:
    reader.feed(data)
    out: list[Event] = []
    while (event := reader.next()) is not None:
        out.append(event)
    return out


@given(st.binary(max_size=300))
@settings(max_examples=400, deadline=None)
def test_random_bytes_only_ever_yield_events(data: bytes) -> None:
    reader = CommandReader(max_line=200, max_literal=100)
    for event in drain(reader, data):
        assert isinstance(event, Command | NeedContinuation | ProtocolError)


@given(mutated(st.sampled_from(VALID)), st.lists(st.integers(0, 400), max_size=6))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_commands_yield_the_same_events_however_chunked(
    data: bytes, cuts: list[int]
) -> None:
    stream = data + b"\r\nzz NOOP\r\n"
    whole = drain(CommandReader(max_line=200, max_literal=100), stream)
    for event in whole:
        assert isinstance(event, Command | NeedContinuation | ProtocolError)
    reader = CommandReader(max_line=200, max_literal=100)
    chunked: list[Event] = []
    previous = 0
    for cut in [*sorted({min(c, len(stream)) for c in cuts}), len(stream)]:
        chunked += drain(reader, stream[previous:cut])
        previous = cut
    assert chunked == whole


# --- commands parsed once -------------------------------------------------------------


def test_a_repeated_command_is_parsed_once_and_answers_with_its_own_tag() -> None:
    line = b"UID FETCH 9951:* (FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (From Subject)])"
    first = one(b"a1 " + line + b"\r\n")
    protocol._PARSED.clear()
    fresh = one(b"a1 " + line + b"\r\n")
    again = one(b"zz.9 " + line + b"\r\n")
    assert (first, fresh) == (fresh, dataclasses.replace(again, tag="a1"))
    assert again.tag == "zz.9" and (line, False) in protocol._PARSED
    # A tag the grammar refuses is refused, whatever was parsed before.
    assert error(b"bad*tag " + line + b"\r\n").status == "BAD"
    assert error(b"{3}x " + line + b"\r\n").status == "BAD"
    # UTF-8 mode parses some lines differently: kept apart.
    utf8 = b'a SELECT "Bo\xc3\xaete"\r\n'
    assert error(utf8).status == "BAD"
    assert one(utf8, utf8=True).args == one(utf8, utf8=True).args
    assert error(utf8).status == "BAD"


def test_credentials_are_never_kept_with_parsed_commands() -> None:
    protocol._PARSED.clear()
    one(b'a1 LOGIN claire.martin@demo.mssd.test "s3cr3t-Pa55"\r\n')
    one(b"a2 AUTHENTICATE PLAIN AGNsYWlyZQBzM2NyM3Q=\r\n")
    assert not protocol._PARSED
    one(b"a3 NOOP\r\n")
    assert list(protocol._PARSED) == [(b"NOOP", False)]
