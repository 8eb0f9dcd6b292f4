"""The IMAP response encoder: values, status lines, FETCH and ESEARCH responses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mssd.imap.commands import Command, LoginArgs, NeedContinuation
from mssd.imap.encode import (
    appenduid,
    compress_uids,
    continuation,
    copyuid,
    encode,
    esearch,
    fetch_response,
    flag_list,
    quote,
    tagged,
    untagged,
    untagged_status,
)
from mssd.imap.fetchdata import Atom, ImapValue, Literal8
from mssd.imap.protocol import CommandReader


def test_scalars() -> None:
    assert encode(None, utf8=False) == b"NIL"
    assert encode(4294967295, utf8=False) == b"4294967295"
    assert encode(Atom("\\Seen"), utf8=False) == b"\\Seen"
    assert encode("", utf8=False) == b'""'


def test_strings_are_quoted_with_escapes() -> None:
    assert encode('say "hi" \\o/', utf8=False) == b'"say \\"hi\\" \\\\o/"'
    assert quote("afternoon meeting") == '"afternoon meeting"'


def test_strings_with_crlf_or_8bit_become_literals_unless_utf8() -> None:
    assert encode("a\r\nb", utf8=False) == b"{4}\r\na\r\nb"
    assert encode("Boîte", utf8=False) == b"{6}\r\nBo\xc3\xaete"
    assert encode("Boîte", utf8=True) == '"Boîte"'.encode()
    assert encode("x" * 2000, utf8=False).startswith(b"{2000}\r\n")
    with pytest.raises(ValueError):
        quote("a\nb")


def test_bytes_are_literals_and_literal8_is_tilde() -> None:
    assert encode(b"hello", utf8=False) == b"{5}\r\nhello"
    assert encode(Literal8(b"\x00\x01"), utf8=False) == b"~{2}\r\n\x00\x01"


def test_nested_lists() -> None:
    value: ImapValue = [Atom("\\Seen"), ["a", None, 3, []]]
    assert encode(value, utf8=False) == b'(\\Seen ("a" NIL 3 ()))'


def test_values_outside_the_model_are_refused() -> None:
    with pytest.raises(TypeError):
        encode(True, utf8=False)
    with pytest.raises(ValueError):
        encode(-1, utf8=False)


def test_tagged_with_response_code() -> None:
    assert tagged("a1", "OK", "READ-WRITE", "SELECT completed") == (
        b"a1 OK [READ-WRITE] SELECT completed\r\n"
    )
    assert tagged("A003", "OK", appenduid(38505, [3955]), "APPEND completed") == (
        b"A003 OK [APPENDUID 38505 3955] APPEND completed\r\n"
    )
    assert tagged("a", "NO", None, "") == b"a NO -\r\n"


def test_response_text_cannot_inject_lines() -> None:
    line = tagged("a", "NO", None, "no such mailbox: x\r\n* OK evil")
    assert line == b"a NO no such mailbox: x  * OK evil\r\n"
    assert untagged_status("BYE", None, "caf\u00e9\n") == b"* BYE caf?\r\n"
    assert untagged_status("OK", None, "caf\u00e9", utf8=True) == "* OK café\r\n".encode()


def test_untagged_data_and_status() -> None:
    assert untagged(23, Atom("EXISTS")) == b"* 23 EXISTS\r\n"
    assert untagged(Atom("FLAGS"), flag_list(["\\Answered", "\\Seen", "$Forwarded"])) == (
        b"* FLAGS (\\Answered \\Seen $Forwarded)\r\n"
    )
    assert untagged_status("OK", "UIDVALIDITY 3857529045", "UIDs valid") == (
        b"* OK [UIDVALIDITY 3857529045] UIDs valid\r\n"
    )
    with pytest.raises(ValueError):
        tagged("a", "BYE", None, "x")


def test_continuations() -> None:
    assert continuation() == b"+ OK\r\n"
    assert continuation("Ready for additional command text") == (
        b"+ Ready for additional command text\r\n"
    )
    assert continuation(b"") == b"+ \r\n"
    assert continuation(b"challenge") == b"+ Y2hhbGxlbmdl\r\n"


def test_fetch_response_with_literal_body() -> None:
    body = b"Subject: x\r\n\r\n"
    line = fetch_response(
        12, [("FLAGS", flag_list(["\\Seen"])), ("UID", 4), ("BODY[HEADER]", body)]
    )
    assert line == b"* 12 FETCH (FLAGS (\\Seen) UID 4 BODY[HEADER] {14}\r\n" + body + b")\r\n"


def test_compress_uids_makes_ranges_and_keeps_order() -> None:
    assert compress_uids([1, 2, 3, 5]) == "1:3,5"
    assert compress_uids([]) == ""
    assert compress_uids([7, 3, 4]) == "7,3:4"
    assert copyuid(38505, [304, 319, 320], [3956, 3957, 3958]) == (
        "COPYUID 38505 304,319:320 3956:3958"
    )


def test_rfc4731_esearch_examples() -> None:
    assert esearch(tag="A282", uid=False, min=2, count=3) == (
        b'* ESEARCH (TAG "A282") MIN 2 COUNT 3\r\n'
    )
    assert esearch(tag="A283", uid=False, all=[2, 10, 11]) == (
        b'* ESEARCH (TAG "A283") ALL 2,10:11\r\n'
    )
    assert esearch(tag="A284", uid=True, count=0) == b'* ESEARCH (TAG "A284") UID COUNT 0\r\n'


@given(st.text(max_size=50))
@settings(max_examples=200, deadline=None)
def test_encoded_strings_read_back_through_the_command_reader(text: str) -> None:
    # Our own parser must read what our encoder writes: LOGIN takes two astrings.
    wire = encode(text, utf8=False)
    reader = CommandReader()
    reader.feed(b"a LOGIN " + wire + b" p\r\n")
    event = reader.next()
    while isinstance(event, NeedContinuation):
        event = reader.next()
    assert isinstance(event, Command)
    assert event.args == LoginArgs(text, "p")
