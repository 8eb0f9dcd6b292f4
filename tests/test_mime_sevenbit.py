"""Conversion to 7 bits for peers without 8BITMIME (RFC 6152 §3): every message of the
corpus comes out 7-bit with the same decoded content, or is refused with the reason;
arbitrary bytes never raise anything else."""

from __future__ import annotations

import email
import email.policy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_mime_structure import ALL_MESSAGES, MALFORMED

from mssd.mime.sevenbit import CannotConvert, to_seven_bit


def _leaves(raw: bytes) -> list[tuple[str, Any]]:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    return [
        (part.get_content_type(), part.get_payload(decode=True))
        for part in parsed.walk()
        if not part.is_multipart() and part.get_content_maintype() != "message"
    ]


@pytest.mark.parametrize("path", ALL_MESSAGES, ids=lambda p: p.stem)
def test_corpus_messages_come_out_7_bit_with_the_same_content(path: Any) -> None:
    raw = path.read_bytes()
    try:
        converted = to_seven_bit(raw)
    except CannotConvert as refusal:
        assert not raw.isascii()
        assert str(refusal) == "8-bit octets in a header field"
        return
    assert converted.isascii()
    if raw.isascii():
        assert converted == raw
    elif path.stem not in MALFORMED:
        assert _leaves(converted) == _leaves(raw)


def test_only_the_8_bit_parts_change() -> None:
    raw = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain\r\n\r\nascii\r\n--b\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"\r\nd\xe9j\xe0\r\n--b--\r\n"
    )
    assert to_seven_bit(raw) == (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain\r\n\r\nascii\r\n--b\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"\r\nd=E9j=E0\r\n--b--\r\n"
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_come_out_7_bit_or_are_refused(raw: bytes) -> None:
    try:
        assert to_seven_bit(raw).isascii()
    except CannotConvert:
        pass
