"""The MIME tree: offsets, defaults, tolerance of malformed mail, agreement with
Python's ``email`` package on well-formed messages, and a bounded fuzz run."""

from __future__ import annotations

import email
import email.policy
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mssd.mime.structure import Part, header_value, parse, section_bytes

CORPUS = Path(__file__).parent / "corpus"
ALL_MESSAGES = sorted(CORPUS.glob("*.eml"))
# Messages that are malformed on purpose: Python's email package and we may
# legitimately disagree on how to read them.
MALFORMED = {
    "bad_base64",
    "boundary_not_found",
    "empty_multipart_part",
    "garbage_content_type",
    "header_only",
    "missing_final_boundary",
    "multipart_no_boundary_param",
    "eight_bit_headers_latin1",
    "unknown_cte",
    # Well-formed (RFC 2045 §5.1 allows comments), but Python's email package
    # reads "text (texte) / plain (brut)" as the type itself.
    "content_type_comments",
}


def corpus(name: str) -> bytes:
    return (CORPUS / f"{name}.eml").read_bytes()


def walk(part: Part) -> Iterator[Part]:
    yield part
    for child in part.children:
        yield from walk(child)
    if part.message is not None:
        yield from walk(part.message)


def leaves(part: Part) -> list[str]:
    return [f"{p.maintype}/{p.subtype}" for p in walk(part) if not p.children and p.message is None]


def test_corpus_has_at_least_thirty_messages() -> None:
    assert len(ALL_MESSAGES) >= 30


def test_single_part_body_starts_after_the_empty_line() -> None:
    raw = corpus("plain_ascii")
    root = parse(raw)
    assert (root.start, root.end) == (0, len(raw))
    assert raw[root.body_start - 4 : root.body_start] == b"\r\n\r\n"
    assert raw[root.body_start :].startswith(b"Cher confrere,")
    assert (root.maintype, root.subtype, root.params) == (
        "text",
        "plain",
        (("charset", "us-ascii"),),
    )


def test_missing_content_type_defaults_to_text_plain_us_ascii() -> None:
    root = parse(corpus("no_content_type_mime"))
    assert (root.maintype, root.subtype) == ("text", "plain")
    assert root.params == (("charset", "us-ascii"),)


def test_garbage_content_type_falls_back_to_the_default() -> None:
    root = parse(corpus("garbage_content_type"))
    assert (root.maintype, root.subtype) == ("text", "plain")


def test_content_type_comments_are_ignored() -> None:
    root = parse(corpus("content_type_comments"))
    assert (root.maintype, root.subtype, root.params) == ("text", "plain", (("charset", "utf-8"),))


def test_digest_parts_default_to_message_rfc822() -> None:
    root = parse(corpus("digest"))
    kinds = [(c.maintype, c.subtype) for c in root.children]
    assert kinds == [("message", "rfc822"), ("message", "rfc822"), ("text", "plain")]
    first = root.children[0].message
    assert first is not None
    assert header_value(first, "subject") == b"Alerte 1"


def test_line_break_before_a_delimiter_belongs_to_the_delimiter() -> None:
    raw = corpus("alternative")
    plain, html = parse(raw).children
    assert raw[plain.body_start : plain.end] == b"Rendez-vous le 20 novembre a 10h."
    assert raw[html.start : html.body_start].startswith(b"Content-Type: text/html")
    assert raw[html.end : html.end + 20] == b"\r\n--alt-boundary-1--"


def test_nested_multiparts_and_inline_image() -> None:
    root = parse(corpus("nested_related"))
    assert leaves(root) == ["text/plain", "text/html", "image/png", "text/plain"]
    related = root.children[0].children[1]
    assert (related.subtype, dict(related.params)["type"]) == ("related", "text/html")


def test_embedded_message_is_parsed_as_a_message() -> None:
    raw = corpus("forwarded_rfc822")
    attached = parse(raw).children[1]
    assert attached.message is not None
    assert header_value(attached.message, "Subject") == b"Resultats transmis"
    assert [f"{c.maintype}/{c.subtype}" for c in attached.message.children] == [
        "text/plain",
        "application/pdf",
    ]


def test_two_levels_of_embedded_messages() -> None:
    root = parse(corpus("nested_rfc822_two_levels"))
    level1 = root.children[1].message
    assert level1 is not None
    level2 = level1.children[1].message
    assert level2 is not None
    assert header_value(level2, "Message-ID") == b"<niveau2@chu-test.mssante.fr>"


def test_rfc2231_continuations_are_joined_and_decoded() -> None:
    pdf = parse(corpus("rfc2231_filename")).children[1]
    assert dict(pdf.params)["name"] == "Lettre de sortie Hélène.pdf"


def test_boundary_inside_quoted_parameter_keeps_its_semicolon() -> None:
    root = parse(corpus("boundary_with_semicolon"))
    assert dict(root.params)["boundary"] == "=_a;b=c_"
    assert len(root.children) == 1


def test_missing_final_boundary_runs_the_last_part_to_the_end() -> None:
    raw = corpus("missing_final_boundary")
    root = parse(raw)
    assert len(root.children) == 2
    assert root.children[1].end == len(raw)


def test_delimiter_in_the_middle_of_a_preamble_line_is_not_a_delimiter() -> None:
    root = parse(corpus("boundary_in_preamble"))
    assert len(root.children) == 1


def test_multipart_without_boundary_has_no_children() -> None:
    assert parse(corpus("multipart_no_boundary_param")).children == ()
    assert parse(corpus("boundary_not_found")).children == ()


def test_bare_lf_line_endings() -> None:
    raw = corpus("bare_lf")
    first, second = parse(raw).children
    assert raw[first.body_start : first.end] == b"Ligne un.\nLigne deux."
    assert raw[second.body_start : second.end] == b"Autre partie."


def test_header_without_empty_line_has_an_empty_body() -> None:
    raw = corpus("header_only")
    root = parse(raw)
    assert root.body_start == root.end == len(raw)
    assert header_value(root, "Message-ID") == b"<entete-16@x.mssante.fr>"


def test_a_line_that_is_not_a_field_starts_the_body() -> None:
    raw = b"Subject: x\r\nthis is not a header\r\nmore\r\n"
    root = parse(raw)
    assert raw[root.body_start :] == b"this is not a header\r\nmore\r\n"
    assert root.headers == (("Subject", b" x"),)


def test_header_value_unfolds_and_ignores_name_case() -> None:
    root = parse(corpus("folded_headers"))
    assert header_value(root, "SUBJECT") == b"Un sujet  replie sur deux lignes"
    assert header_value(root, "message-id") == b"<replie-12@hopital-test.mssante.fr>"
    assert header_value(root, "X-Absent") is None
    assert dict(root.headers)["Subject"] == b" Un sujet\r\n  replie sur deux lignes"


def test_eight_bit_header_bytes_are_kept_raw() -> None:
    root = parse(corpus("eight_bit_headers_latin1"))
    assert header_value(root, "Subject") == b"R\xe9sultat urgent"


def test_section_bytes_slices_header_and_text() -> None:
    raw = corpus("plain_ascii")
    root = parse(raw)
    assert section_bytes(raw, root, "") == raw
    assert section_bytes(raw, root, "HEADER").endswith(b"\r\n\r\n")
    assert section_bytes(raw, root, "TEXT").startswith(b"Cher confrere,")


def test_depth_limit_leaves_the_rest_undivided() -> None:
    raw = b"Content-Type: message/rfc822\r\n\r\n" * 100 + b"body\r\n"
    root = parse(raw, max_depth=5)
    depth = 0
    node: Part | None = root
    while node is not None:
        depth += 1
        node = node.message
    assert depth == 6


def test_part_limit_stops_adding_parts() -> None:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(100))
    raw = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"
    assert len(parse(raw).children) == 100
    assert len(parse(raw, max_parts=10).children) == 9


@pytest.mark.parametrize("path", ALL_MESSAGES, ids=lambda p: p.stem)
def test_every_corpus_message_parses_with_nested_offsets(path: Path) -> None:
    raw = path.read_bytes()
    root = parse(raw)
    for part in walk(root):
        assert 0 <= part.start <= part.body_start <= part.end <= len(raw)
        for child in part.children:
            assert part.body_start <= child.start and child.end <= part.end
        if part.message is not None:
            assert (part.message.start, part.message.end) == (part.body_start, part.end)


def _email_leaves(message: email.message.Message) -> list[str]:
    return [part.get_content_type() for part in message.walk() if not part.is_multipart()]


@pytest.mark.parametrize(
    "path", [p for p in ALL_MESSAGES if p.stem not in MALFORMED], ids=lambda p: p.stem
)
def test_python_email_package_agrees_on_leaves(path: Path) -> None:
    raw = path.read_bytes()
    reference = email.message_from_bytes(raw, policy=email.policy.default)
    assert leaves(parse(raw)) == _email_leaves(reference)


# --- robustness --------------------------------------------------------------------------------

SEEDS = [corpus(name) for name in ("nested_related", "forwarded_rfc822", "digest", "bare_lf")]
TOKENS = [
    b"\r\n",
    b"\n",
    b"--",
    b"--outer",
    b"--inner--",
    b":",
    b";",
    b'"',
    b"(",
    b"\r\n\r\n",
    b"Content-Type: multipart/mixed; boundary=x\r\n",
    b"--x\r\n",
    b"\x00",
    b"\xff",
    b" ",
]


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 12)):
        op = rng.random()
        pos = rng.randint(0, len(buf))
        if op < 0.4:
            buf[pos:pos] = rng.choice(TOKENS)
        elif op < 0.7 and buf:
            del buf[pos : pos + rng.randint(1, 40)]
        elif buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
    return bytes(buf)


def test_seeded_mutations_never_raise() -> None:
    rng = random.Random(20261121)
    deadline = time.monotonic() + 3
    count = 0
    while time.monotonic() < deadline:
        raw = mutate(rng.choice(SEEDS), rng)
        for part in walk(parse(raw)):
            assert 0 <= part.start <= part.body_start <= part.end <= len(raw)
        count += 1
    assert count > 50


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    parse(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'Content-Type: multipart/mixed; boundary="a"\r\n\r\n' + b"--a" * 300_000,
        b'Content-Type: multipart/mixed; boundary="a"\r\n\r\n' + b"--a\r\n" * 200_000,
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n" * 64 + b"x" * 1_000_000,
        b"X: " + b"(" * 500_000 + b"\r\n\r\n",
        b"Content-Type: text/plain; " + b'a="' * 300_000 + b"\r\n\r\n",
        b"\r\n " * 300_000,
    ],
    ids=["dashes", "many-parts", "deep", "comments", "quotes", "continuations"],
)
def test_pathological_input_is_parsed_in_bounded_time(raw: bytes) -> None:
    # A quadratic algorithm would take minutes on these; linear takes well under a second.
    started = time.monotonic()
    parse(raw)
    assert time.monotonic() - started < 10
