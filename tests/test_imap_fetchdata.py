"""FETCH data items: ENVELOPE, BODY/BODYSTRUCTURE, BODY[section], BINARY, checked
against the RFC 3501 §7.4.2 examples and the test corpus."""

from __future__ import annotations

import base64
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mssd.imap.fetchdata import (
    Atom,
    ImapValue,
    Literal8,
    SectionSpec,
    binary,
    binary_size,
    bodystructure,
    envelope,
    partial,
    rfc822_size,
    section,
)
from mssd.mime.structure import Part, parse

CORPUS = Path(__file__).parent / "corpus"
ALL_MESSAGES = sorted(CORPUS.glob("*.eml"))


def corpus(name: str) -> bytes:
    return (CORPUS / f"{name}.eml").read_bytes()


def render(value: ImapValue) -> str:
    """A test-only rendering close to the wire form, to compare with RFC examples."""
    if value is None:
        return "NIL"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bytes):
        return f"{{{len(value)}}}{value!r}"
    if isinstance(value, Atom):
        return value.value
    if isinstance(value, Literal8):
        return f"~{{{len(value.data)}}}"
    return "(" + " ".join(render(item) for item in value) + ")"


def normalise(text: str) -> str:
    """RFC examples write ")(" between list members; we always write ") ("."""
    return re.sub(r"\)\s*\(", ") (", " ".join(text.split()))


# --- ENVELOPE --------------------------------------------------------------------------------

RFC3501_MESSAGE = (
    b"Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\r\n"
    b"From: Terry Gray <gray@cac.washington.edu>\r\n"
    b"Subject: IMAP4rev1 WG mtg summary and minutes\r\n"
    b"To: imap@cac.washington.edu\r\n"
    b"cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>\r\n"
    b"Message-Id: <B27397-0100000@cac.washington.edu>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n'
    b"\r\n"
    b"--b\r\n"
    b'Content-Type: TEXT/PLAIN; CHARSET="US-ASCII"\r\n'
    b"Content-Transfer-Encoding: 7BIT\r\n"
    b"\r\n" + b"x" * 48 + b"\r\n" + (b"y" * 48 + b"\r\n") * 22 + b"ab"
    b"\r\n--b\r\n"
    b'Content-Type: TEXT/PLAIN; CHARSET="US-ASCII"; NAME="cc.diff"\r\n'
    b"Content-ID: <960723163407.20117h@cac.washington.edu>\r\n"
    b"Content-Description: Compiler diff\r\n"
    b"Content-Transfer-Encoding: BASE64\r\n"
    b"\r\n" + (b"QUJD" * 15 + b"\r\n") * 73 + b"QUJD" * 7 + b"\r\n--b--\r\n"
)


def test_envelope_matches_the_rfc3501_example() -> None:
    root = parse(RFC3501_MESSAGE)
    expected = """("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)"
      "IMAP4rev1 WG mtg summary and minutes"
      (("Terry Gray" NIL "gray" "cac.washington.edu"))
      (("Terry Gray" NIL "gray" "cac.washington.edu"))
      (("Terry Gray" NIL "gray" "cac.washington.edu"))
      ((NIL NIL "imap" "cac.washington.edu"))
      ((NIL NIL "minutes" "CNRI.Reston.VA.US")
      ("John Klensin" NIL "KLENSIN" "MIT.EDU")) NIL NIL
      "<B27397-0100000@cac.washington.edu>")"""
    assert render(envelope(RFC3501_MESSAGE, root)) == normalise(expected)


def test_body_matches_the_rfc3501_example_with_case_as_written() -> None:
    root = parse(RFC3501_MESSAGE)
    expected = """(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152
      23)("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff")
      "<960723163407.20117h@cac.washington.edu>" "Compiler diff"
      "BASE64" 4554 73) "mixed")"""
    # The RFC example writes "MIXED"; our message says "multipart/mixed" and we keep its case.
    assert render(bodystructure(RFC3501_MESSAGE, root, extensible=False)) == normalise(expected)


def test_sender_and_reply_to_take_their_own_values_when_present() -> None:
    raw = corpus("reply_with_sender")
    assert envelope(raw, parse(raw)) == [
        "Mon, 16 Nov 2026 11:00:00 +0100",
        "Re: Compte rendu de consultation",
        [["Dr Jeanne DUPONT", None, "jeanne.dupont", "hopital-test.mssante.fr"]],
        [["Secretariat DUPONT", None, "secretariat", "hopital-test.mssante.fr"]],
        [[None, None, "secretariat", "hopital-test.mssante.fr"]],
        [["Dr Paul MARTIN", None, "paul.martin", "cabinet-test.mssante.fr"]],
        None,
        [[None, None, "archive", "hopital-test.mssante.fr"]],
        "<cr-0001@hopital-test.mssante.fr>",
        "<re-cr-0001@hopital-test.mssante.fr>",
    ]


def test_groups_are_written_with_start_and_end_markers() -> None:
    raw = corpus("group_undisclosed")
    env = envelope(raw, parse(raw))
    assert env[5] == [[None, None, "undisclosed-recipients", None], [None, None, None, None]]
    assert env[6] == [
        [None, None, "Equipe soins", None],
        ["Infirmier A", None, "ide.a", "ehpad-test.mssante.fr"],
        [None, None, "ide.b", "ehpad-test.mssante.fr"],
        [None, None, None, None],
        ["Dr Paul MARTIN", None, "paul.martin", "cabinet-test.mssante.fr"],
    ]


def test_absent_fields_are_nil() -> None:
    raw = corpus("missing_date_msgid")
    env = envelope(raw, parse(raw))
    assert env[0] is None and env[9] is None and env[8] is None
    assert env[2] == env[3] == env[4] == [[None, None, "paul.martin", "cabinet-test.mssante.fr"]]


def test_encoded_words_are_not_decoded() -> None:
    raw = corpus("rfc2047_q_b")
    env = envelope(raw, parse(raw))
    assert env[1] == "=?UTF-8?B?T3Jkb25uYW5jZSBkZSBzb3J0aWU=?= =?UTF-8?Q?_n=C2=B0_42?="
    assert env[5] == [
        ["=?ISO-8859-1?B?Sm9zZXBoIEzpb24=?=", None, "joseph.leon", "pharmacie-test.mssante.fr"]
    ]
    assert env[6] == [
        ["Secretariat, Cardiologie", None, "secretariat.cardio", "chu-test.mssante.fr"]
    ]


def test_utf8_headers_pass_through_as_text() -> None:
    raw = corpus("rfc6532_utf8_headers")
    env = envelope(raw, parse(raw))
    assert env[1] == "Résultat d'échographie"
    assert env[2] == [["Dr Hélène LÉGER", None, "hélène.léger", "chu-test.mssante.fr"]]


def test_non_utf8_header_bytes_become_a_literal() -> None:
    raw = corpus("eight_bit_headers_latin1")
    assert envelope(raw, parse(raw))[1] == b"R\xe9sultat urgent"


def test_folded_fields_are_unfolded() -> None:
    raw = corpus("folded_headers")
    env = envelope(raw, parse(raw))
    assert env[0] == "Fri, 20 Nov 2026 10:00:00 +0100"
    assert env[2] == [["Dr Jeanne DUPONT", None, "jeanne.dupont", "hopital-test.mssante.fr"]]
    assert env[9] == "<replie-12@hopital-test.mssante.fr>"


def test_comment_gives_the_name_and_route_is_kept() -> None:
    raw = (
        b"From: jdupont@hopital-test.mssante.fr (Jeanne DUPONT)\r\n"
        b"To: <@relais.mssante.fr:pmartin@cabinet-test.mssante.fr>, nodomain\r\n\r\n"
    )
    env = envelope(raw, parse(raw))
    assert env[2] == [["Jeanne DUPONT", None, "jdupont", "hopital-test.mssante.fr"]]
    assert env[5] == [
        [None, "@relais.mssante.fr", "pmartin", "cabinet-test.mssante.fr"],
        [None, None, "nodomain", "MISSING_DOMAIN"],
    ]


# --- BODYSTRUCTURE ---------------------------------------------------------------------------


def test_bodystructure_of_a_plain_message() -> None:
    raw = corpus("plain_ascii")
    assert bodystructure(raw, parse(raw), extensible=True) == [
        "text",
        "plain",
        ["charset", "us-ascii"],
        None,
        None,
        "7bit",
        127,
        5,
        None,
        None,
        None,
        None,
    ]


def test_bodystructure_with_pdf_attachment() -> None:
    raw = corpus("mixed_pdf")
    expected = """(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 40 0 NIL NIL NIL NIL)
      ("application" "pdf" ("name" "CRO_DUPONT.pdf") NIL "Compte rendu operatoire" "base64"
       282 NIL ("attachment" ("filename" "CRO_DUPONT.pdf")) NIL NIL)
      "mixed" ("boundary" "mixed-b") NIL NIL NIL)"""
    assert render(bodystructure(raw, parse(raw), extensible=True)) == normalise(expected)


def test_body_has_no_extension_data() -> None:
    raw = corpus("mixed_pdf")
    expected = """(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 40 0)
      ("application" "pdf" ("name" "CRO_DUPONT.pdf") NIL "Compte rendu operatoire" "base64" 282)
      "mixed")"""
    assert render(bodystructure(raw, parse(raw), extensible=False)) == normalise(expected)


def test_embedded_message_has_envelope_structure_and_lines() -> None:
    raw = corpus("forwarded_rfc822")
    structure = bodystructure(raw, parse(raw), extensible=False)
    attached = structure[1]
    assert isinstance(attached, list)
    assert attached[:7] == ["message", "rfc822", None, None, None, "7bit", 606]
    inner_envelope, inner_body, lines = attached[7:]
    assert isinstance(inner_envelope, list) and inner_envelope[1] == "Resultats transmis"
    assert render(inner_body) == normalise(
        """(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 26 0)
        ("application" "pdf" NIL NIL NIL "base64" 82) "mixed")"""
    )
    assert lines == 19  # LF in the 606 stored octets; the delimiter's CRLF is not counted


def test_text_part_without_charset_gets_the_us_ascii_default() -> None:
    raw = corpus("missing_final_boundary")
    structure = bodystructure(raw, parse(raw), extensible=False)
    assert structure[0] == ["text", "plain", ["charset", "us-ascii"], None, None, "7bit", 16, 0]


def test_digest_default_parts_are_message_rfc822_without_parameters() -> None:
    raw = corpus("digest")
    first = bodystructure(raw, parse(raw), extensible=False)[0]
    assert isinstance(first, list) and first[:7] == [
        "message",
        "rfc822",
        None,
        None,
        None,
        "7bit",
        83,
    ]


def test_rfc2231_parameters_are_merged_but_left_encoded() -> None:
    raw = corpus("rfc2231_filename")
    pdf = bodystructure(raw, parse(raw), extensible=True)[1]
    assert isinstance(pdf, list)
    assert pdf[2] == ["name*", "utf-8''Lettre%20de%20sortie%20H%C3%A9l%C3%A8ne.pdf"]
    assert pdf[8] == [
        "attachment",
        ["filename*", "utf-8''Lettre%20de%20sortie%20H%C3%A9l%C3%A8ne.pdf"],
    ]


def test_language_and_location_extension_fields() -> None:
    raw = corpus("cda_xml")
    xml = bodystructure(raw, parse(raw), extensible=True)[1]
    assert isinstance(xml, list)
    assert xml[:2] == ["text", "xml"]
    assert xml[-3:] == [
        ["attachment", ["filename", "CR_consultation.xml"]],
        ["fr"],
        "CR_consultation.xml",
    ]


def test_multipart_without_parts_reports_one_empty_text_part() -> None:
    raw = corpus("boundary_not_found")
    assert bodystructure(raw, parse(raw), extensible=False) == [
        ["text", "plain", ["charset", "us-ascii"], None, None, "7bit", 0, 0],
        "mixed",
    ]


def test_unknown_encoding_is_reported_as_written() -> None:
    raw = corpus("unknown_cte")
    assert bodystructure(raw, parse(raw), extensible=False)[5] == "x-uuencode"


# --- BODY[section] ---------------------------------------------------------------------------


def spec(text: str) -> SectionSpec:
    """Parse a section string the way the protocol parser will (test helper)."""
    parts: list[int] = []
    rest = text
    while rest and rest[0].isdigit():
        number, _, rest = rest.partition(".")
        parts.append(int(number))
    fields: tuple[str, ...] = ()
    if " (" in rest:
        rest, _, names = rest.partition(" (")
        fields = tuple(names.rstrip(")").split())
    return SectionSpec(tuple(parts), rest or None, fields)


def test_whole_message_header_and_text() -> None:
    raw = corpus("plain_ascii")
    root = parse(raw)
    header, text = section(raw, root, spec("HEADER")), section(raw, root, spec("TEXT"))
    assert section(raw, root, spec("")) == raw
    assert header is not None and text is not None
    assert header + text == raw and header.endswith(b"\r\n\r\n")


def test_header_fields_keep_folding_order_and_end_with_a_blank_line() -> None:
    raw = corpus("folded_headers")
    root = parse(raw)
    assert section(raw, root, spec("HEADER.FIELDS (message-id SUBJECT)")) == (
        b"Subject: Un sujet\r\n  replie sur deux lignes\r\n"
        b"Message-ID:\r\n <replie-12@hopital-test.mssante.fr>\r\n\r\n"
    )
    assert section(raw, root, spec("HEADER.FIELDS (X-Absent)")) == b"\r\n"
    remaining = section(raw, root, spec("HEADER.FIELDS.NOT (From To Date Message-ID)"))
    assert remaining == (
        b"Subject: Un sujet\r\n  replie sur deux lignes\r\n"
        b'Content-Type: text/plain;\r\n\tcharset="us-ascii"\r\n\r\n'
    )


def test_part_one_of_a_single_part_message_is_its_body() -> None:
    raw = corpus("plain_ascii")
    root = parse(raw)
    assert section(raw, root, spec("1")) == section(raw, root, spec("TEXT"))
    assert section(raw, root, spec("1.MIME")) == section(raw, root, spec("HEADER"))
    assert section(raw, root, spec("2")) == b""


def test_numbered_parts_and_their_mime_headers() -> None:
    raw = corpus("nested_related")
    root = parse(raw)
    assert section(raw, root, spec("1.1")) == b"Voir l'image ci-jointe."
    assert (
        section(raw, root, spec("1.2.1.MIME")) == b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    )
    png = section(raw, root, spec("1.2.2"))
    assert png is not None and base64.b64decode(png).startswith(b"\x89PNG")
    assert section(raw, root, spec("2")) == b"Notes complementaires."


def test_embedded_message_header_text_and_parts() -> None:
    raw = corpus("nested_rfc822_two_levels")
    root = parse(raw)
    header = section(raw, root, spec("2.HEADER"))
    assert header is not None and header.startswith(b"From: Dr Paul MARTIN")
    assert section(raw, root, spec("2.MIME")) == b"Content-Type: message/rfc822\r\n\r\n"
    assert section(raw, root, spec("2.1")) == b"Niveau 1."
    # The CRLF before "--lvl1--" belongs to the delimiter (RFC 2046 §5.1.1).
    assert section(raw, root, spec("2.2.TEXT")) == b"Message le plus profond."
    assert section(raw, root, spec("2.2.1")) == b"Message le plus profond."
    assert section(raw, root, spec("2.2.HEADER.FIELDS (Subject)")) == b"Subject: Niveau 2\r\n\r\n"
    whole = section(raw, root, spec("2"))
    assert whole is not None and whole.startswith(b"From: Dr Paul MARTIN")
    assert whole.endswith(b"--lvl1--")


def test_nonexistent_parts_are_empty_and_malformed_sections_are_refused() -> None:
    raw = corpus("mixed_pdf")
    root = parse(raw)
    assert section(raw, root, spec("3")) == b""
    assert section(raw, root, spec("1.1")) == b""
    assert section(raw, root, spec("1.HEADER")) == b""  # not a message/rfc822 part
    assert section(raw, root, SectionSpec((0,), None, ())) is None
    assert section(raw, root, SectionSpec((), "MIME", ())) is None
    assert section(raw, root, SectionSpec((), "HEADER.FIELDS", ())) is None
    assert section(raw, root, SectionSpec((), "BOGUS", ())) is None


def test_partial_is_applied_after_the_section() -> None:
    assert partial(b"0123456789", 2, 3) == b"234"
    assert partial(b"0123456789", 8, 100) == b"89"
    assert partial(b"0123456789", 20, 5) == b""


# --- BINARY ----------------------------------------------------------------------------------


def test_binary_decodes_base64_and_quoted_printable() -> None:
    raw = corpus("mixed_pdf")
    root = parse(raw)
    pdf = binary(raw, root, (2,))
    assert pdf is not None and pdf.startswith(b"%PDF-1.4") and pdf.endswith(b"%%EOF\n")
    assert binary_size(raw, root, (2,)) == len(pdf)
    qp_raw = corpus("quoted_printable")
    text = binary(qp_raw, parse(qp_raw), (1,))
    assert text is not None and text.startswith(b"Patiente sortie le 16/11 apr\xe8s")
    assert b"pneumopathie" in text


def test_binary_of_an_unknown_encoding_is_refused() -> None:
    raw = corpus("unknown_cte")
    assert binary(raw, parse(raw), (1,)) is None
    assert binary_size(raw, parse(raw), (1,)) is None


def test_bad_base64_decodes_what_it_can() -> None:
    raw = corpus("bad_base64")
    data = binary(raw, parse(raw), (1,))
    assert data is not None and data.startswith(b"Hello world")


def test_binary_of_a_missing_part_is_empty_and_rfc822_size_is_the_stored_size() -> None:
    raw = corpus("xdm_zip")
    root = parse(raw)
    assert binary(raw, root, (9,)) == b""
    zipped = binary(raw, root, (2,))
    assert zipped is not None and zipped.startswith(b"PK\x03\x04")
    assert rfc822_size(raw) == len(raw)


# --- every part of every corpus message ------------------------------------------------------


def part_paths(part: Part, prefix: tuple[int, ...] = ()) -> Iterator[tuple[int, ...]]:
    if part.children:
        for index, child in enumerate(part.children, 1):
            yield (*prefix, index)
            yield from _below(child, (*prefix, index))
    else:
        yield (*prefix, 1)
        if part.message is not None and prefix == ():
            yield from part_paths(part.message, (1,))


def _below(part: Part, path: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    if part.children:
        for index, child in enumerate(part.children, 1):
            yield (*path, index)
            yield from _below(child, (*path, index))
    elif part.message is not None:
        yield from part_paths(part.message, path)


@pytest.mark.parametrize("path", ALL_MESSAGES, ids=lambda p: p.stem)
def test_every_section_of_every_part_can_be_fetched(path: Path) -> None:
    raw = path.read_bytes()
    root = parse(raw)
    assert bodystructure(raw, root, extensible=True)
    assert bodystructure(raw, root, extensible=False)
    assert len(envelope(raw, root)) == 10
    for text in ("HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT", None):
        assert section(raw, root, SectionSpec((), text, ("Subject",))) is not None
    for numbers in part_paths(root):
        for text in (None, "MIME", "HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            data = section(raw, root, SectionSpec(numbers, text, ("From",)))
            assert data is not None
            if text in (None, "MIME"):
                assert data in raw, (numbers, text)
        binary(raw, root, numbers)


# --- robustness ------------------------------------------------------------------------------

SEEDS = [
    corpus(n)
    for n in ("nested_rfc822_two_levels", "digest", "group_undisclosed", "rfc2231_filename")
]
TOKENS = [
    b"\r\n",
    b"--",
    b":",
    b";",
    b",",
    b"<",
    b">",
    b'"',
    b"(",
    b")",
    b"@",
    b"\\",
    b"Content-Type: message/rfc822\r\n\r\n",
    b"=?utf-8?q?x?=",
    b"\xc3",
    b"\x00",
    b"*0*=",
]


def exercise(raw: bytes) -> None:
    root = parse(raw)
    bodystructure(raw, root, extensible=True)
    envelope(raw, root)
    for numbers in [(), (1,), (2,), (1, 1), (2, 1), (2, 2, 1)]:
        for text in (None, "MIME", "HEADER", "TEXT", "HEADER.FIELDS.NOT"):
            section(raw, root, SectionSpec(numbers, text, ("To",)))
        binary(raw, root, numbers)


def test_seeded_mutations_never_raise() -> None:
    rng = random.Random(9051)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        buf = bytearray(rng.choice(SEEDS))
        for _ in range(rng.randint(1, 10)):
            pos = rng.randint(0, len(buf))
            if rng.random() < 0.5:
                buf[pos:pos] = rng.choice(TOKENS)
            else:
                del buf[pos : pos + rng.randint(1, 30)]
        exercise(bytes(buf))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1500))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    exercise(raw)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='ab<>@,:;"()\\ .\r\n=', max_size=300))
def test_arbitrary_address_fields_never_raise(value: str) -> None:
    raw = b"From: " + value.encode() + b"\r\nTo: " + value.encode() + b"\r\n\r\n"
    envelope(raw, parse(raw))


def test_pathological_address_field_is_linear() -> None:
    raw = b"To: " + b"a@b, " * 30_000 + b'"' * 100_000 + b"\r\n\r\n"
    started = time.monotonic()
    envelope(raw, parse(raw))
    assert time.monotonic() - started < 10
