"""Differential test: mssd and a real Dovecot answer the same FETCH and SEARCH
commands about the same corpus (``tests/corpus/*.eml``) with the same bytes.

Dovecot is started by the test on a loopback port with a throwaway configuration
(static passdb and userdb, maildir in a temporary directory, no TLS). Every
corpus message is APPENDed to both servers, then ENVELOPE, BODYSTRUCTURE, BODY,
every BODY[section] and BINARY[section] of every part, and a set of SEARCH
queries are compared as raw response bytes. A difference is a failure unless it
is listed in :data:`KNOWN_DIFFERENCES` with the RFC clause that makes mssd's
answer right; an entry that no longer differs is a failure too, so the table
stays true.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PASSWORD, PER, MssdProcess, require_program
from dovecot_server import Dovecot, static_passdb
from dovecot_server import start_dovecot as start_dovecot_server

CORPUS = Path(__file__).parent / "corpus"
MESSAGES = sorted(CORPUS.glob("*.eml"))
FOLDER = "Differentiel"
DOVECOT_PASSWORD = "differentiel"
KEYWORD = "$Differentiel"
# Messages that get KEYWORD by STORE before the searches (by corpus name).
KEYWORD_MESSAGES = ("digest", "plain_ascii", "xdm_zip")

# (message name or "SEARCH", item) -> why mssd's answer is the right one.
_CLOSE_DELIMITER_CRLF = (
    "RFC 2046 §5.1.1: the CRLF before a boundary delimiter belongs to the delimiter "
    "(delimiter := CRLF dash-boundary). After the embedded message's close delimiter "
    "comes CRLF --outer: that CRLF is the outer delimiter's, so the message/rfc822 "
    "part ends at the inner close delimiter. Dovecot counts it in the part (2 octets, "
    "1 line more)."
)
_BINARY_OF_MESSAGE = (
    "RFC 3516 §4.2 / RFC 9051 §6.4.5: BINARY removes the part's own "
    "Content-Transfer-Encoding; a 7bit message/rfc822 part is returned as stored. "
    "Dovecot also re-encodes the embedded message's base64 parts to binary (and "
    "counts the CRLF above, RFC 2046 §5.1.1)."
)
_NO_DATE = (
    "RFC 9051 §6.4.4: SENTBEFORE matches messages whose Date: header is earlier; "
    "bare_lf and missing_date_msgid have no Date: and match no SENT* key. Dovecot "
    "takes a missing Date as 1970 and matches them."
)
_LENIENT_BASE64 = (
    "RFC 2045 §6.8: characters outside the base64 alphabet are ignored by decoders; "
    "mssd decodes what is there. Dovecot refuses with NO [PARSE]."
)
KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {
    ("forwarded_rfc822", "BODYSTRUCTURE"): _CLOSE_DELIMITER_CRLF,
    ("forwarded_rfc822", "BODY"): _CLOSE_DELIMITER_CRLF,
    ("forwarded_rfc822", "BODY.PEEK[2]"): _CLOSE_DELIMITER_CRLF,
    ("forwarded_rfc822", "BODY.PEEK[2.TEXT]"): _CLOSE_DELIMITER_CRLF,
    ("forwarded_rfc822", "BINARY.PEEK[2]"): _BINARY_OF_MESSAGE,
    ("forwarded_rfc822", "BINARY.SIZE[2]"): _BINARY_OF_MESSAGE,
    ("nested_rfc822_two_levels", "BODYSTRUCTURE"): _CLOSE_DELIMITER_CRLF,
    ("nested_rfc822_two_levels", "BODY"): _CLOSE_DELIMITER_CRLF,
    ("nested_rfc822_two_levels", "BODY.PEEK[2]"): _CLOSE_DELIMITER_CRLF,
    ("nested_rfc822_two_levels", "BODY.PEEK[2.TEXT]"): _CLOSE_DELIMITER_CRLF,
    ("nested_rfc822_two_levels", "BINARY.PEEK[2]"): _CLOSE_DELIMITER_CRLF,
    ("nested_rfc822_two_levels", "BINARY.SIZE[2]"): _CLOSE_DELIMITER_CRLF,
    ("garbage_content_type", "BODYSTRUCTURE"): (
        "RFC 2045 §5.2: a syntactically invalid Content-Type defaults to text/plain; "
        'charset=us-ascii. Dovecot reports "" "" with no parameters and no line count.'
    ),
    ("garbage_content_type", "BODY"): "RFC 2045 §5.2, as for BODYSTRUCTURE.",
    ("folded_headers", "ENVELOPE"): (
        "RFC 5322 §2.2.3: unfolding removes the CRLF only, so 'Un sujet CRLF  replie' is "
        "'Un sujet  replie' (two spaces), and the value after 'Message-ID:' is trimmed "
        "like every envelope string. Dovecot folds CRLF WSP* to one space, sends the "
        "subject as a literal and keeps the leading space of the Message-ID."
    ),
    ("header_only", "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]"): (
        "RFC 9051 §6.4.5: the blank line is included in all header fetches 'except in "
        "the case of a message which has no body and no blank line'. Dovecot follows "
        "this for HEADER and HEADER.FIELDS.NOT but adds it for HEADER.FIELDS."
    ),
    ("bad_base64", "BINARY.PEEK[1]"): _LENIENT_BASE64,
    ("bad_base64", "BINARY.SIZE[1]"): _LENIENT_BASE64,
    ("SEARCH", "SENTBEFORE 17-Nov-2026"): _NO_DATE,
}

SEARCHES: tuple[tuple[str, bytes | None], ...] = (
    # (criteria before the literal, literal in UTF-8 or None)
    ("FROM dupont", None),
    ("FROM hopital-test.mssante.fr", None),
    ("TO martin", None),
    ("CC cardiologie", None),
    ("SUBJECT compte", None),
    ("CHARSET UTF-8 SUBJECT", "Hélène".encode()),
    ("CHARSET UTF-8 FROM", "Hélène".encode()),
    ("CHARSET UTF-8 SUBJECT", "n° 42".encode()),
    ("CHARSET UTF-8 SUBJECT", "résultats".encode()),
    ("CHARSET UTF-8 BODY", "paracétamol".encode()),
    ("CHARSET UTF-8 BODY", "Hémoglobine".encode()),
    ("BODY ClinicalDocument", None),
    ("TEXT MARTIN", None),
    ("HEADER Message-ID hopital-test", None),
    ('HEADER X-Mailer ""', None),
    ("LARGER 2000", None),
    ("SMALLER 500", None),
    ("SENTSINCE 17-Nov-2026", None),
    ("SENTBEFORE 17-Nov-2026", None),
    ("SENTSINCE 1-Jan-2000", None),
    ('BODY "Hello world"', None),
    ("BODY PDF-1.4", None),
    ("CHARSET UTF-8 TEXT", "Hélène".encode()),
    ("CHARSET UTF-8 TEXT", "Créatininémie".encode()),
    ("NOT FROM dupont", None),
    ("OR SUBJECT compte SUBJECT ordonnance", None),
    (f"KEYWORD {KEYWORD}", None),
    (f"NOT KEYWORD {KEYWORD} SMALLER 1000", None),
)


# -- a raw IMAP client: responses as the bytes on the wire ------------------------------


class RawImap:
    """Sends one command at a time and returns every response line (literals
    included) up to the tagged one, byte for byte."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.counter = 0
        greeting = self.reader.readline()
        assert greeting.startswith(b"* OK"), greeting

    def command(self, text: bytes, *literals: bytes) -> tuple[list[bytes], bytes]:
        """``text`` with each ``{}`` replaced by a LITERAL+ literal (RFC 7888)."""
        self.counter += 1
        tag = b"d%d" % self.counter
        pieces = text.split(b"{}")
        assert len(pieces) == len(literals) + 1
        out = bytearray(tag + b" " + pieces[0])
        for literal, piece in zip(literals, pieces[1:], strict=True):
            out += b"{%d+}\r\n" % len(literal) + literal + piece
        self.sock.sendall(bytes(out) + b"\r\n")
        untagged: list[bytes] = []
        while True:
            response = self.read_response()
            if response.startswith(tag + b" "):
                return untagged, response
            untagged.append(response)

    def read_response(self) -> bytes:
        response = bytearray()
        while True:
            line = self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            response += line
            stripped = line.rstrip(b"\r\n")
            if stripped.endswith(b"}") and b"{" in stripped:
                size = stripped[stripped.rindex(b"{") + 1 : -1].rstrip(b"+")
                if size.isdigit():
                    response += self.reader.read(int(size))
                    continue
            return bytes(response)

    def ok(self, text: bytes, *literals: bytes) -> list[bytes]:
        untagged, tagged = self.command(text, *literals)
        assert tagged.split(b" ")[1] == b"OK", (text, tagged)
        return untagged

    def close(self) -> None:
        try:
            self.command(b"LOGOUT")
        except OSError:
            pass
        self.reader.close()
        self.sock.close()


# -- Dovecot with a throwaway configuration ------------------------------------------


def start_dovecot(extra_config: str = "") -> Dovecot:
    """Dovecot on a free loopback port, without TLS, every user name logging in with
    DOVECOT_PASSWORD; ``extra_config`` is appended to the settings."""
    return start_dovecot_server(
        require_program("dovecot"), static_passdb(DOVECOT_PASSWORD), extra_config=extra_config
    )


# -- the comparison --------------------------------------------------------------------


def _parse(data: bytes, pos: int = 0) -> tuple[object, int]:
    """One IMAP value (RFC 9051 §4): list, quoted string, literal, NIL, atom or number."""
    while data[pos : pos + 1] == b" ":
        pos += 1
    c = data[pos : pos + 1]
    if c == b"(":
        items: list[object] = []
        pos += 1
        while True:
            while data[pos : pos + 1] == b" ":
                pos += 1
            if data[pos : pos + 1] == b")":
                return items, pos + 1
            item, pos = _parse(data, pos)
            items.append(item)
    if c == b'"':
        out = bytearray()
        pos += 1
        while data[pos : pos + 1] != b'"':
            if data[pos : pos + 1] == b"\\":
                pos += 1
            out += data[pos : pos + 1]
            pos += 1
        return bytes(out), pos + 1
    if c in (b"{", b"~"):
        close = data.index(b"}", pos)
        size = int(data[data.index(b"{", pos) + 1 : close].rstrip(b"+"))
        start = close + 3
        return data[start : start + size], start + size
    end = pos
    while end < len(data) and data[end : end + 1] not in b" ()\r\n":
        end += 1
    atom = data[pos:end]
    return (None if atom.upper() == b"NIL" else atom), end


def part_numbers(structure: object, prefix: str = "") -> Iterator[tuple[str, bool]]:
    """(part number, is message/rfc822) of every part in a BODYSTRUCTURE, RFC 9051 §6.4.5."""
    assert isinstance(structure, list)
    if structure and isinstance(structure[0], list):
        children = [x for x in structure if isinstance(x, list)]
        for index, child in enumerate(children, start=1):
            yield from _leaf_or_nested(child, f"{prefix}{index}")
        return
    yield from _leaf_or_nested(structure, prefix + "1")


def _leaf_or_nested(structure: list[object], number: str) -> Iterator[tuple[str, bool]]:
    if structure and isinstance(structure[0], list):  # multipart
        children = [x for x in structure if isinstance(x, list)]
        for index, child in enumerate(children, start=1):
            yield from _leaf_or_nested(child, f"{number}.{index}")
        return
    maintype, subtype = structure[0], structure[1]
    is_message = (
        isinstance(maintype, bytes)
        and isinstance(subtype, bytes)
        and (maintype.lower(), subtype.lower()) == (b"message", b"rfc822")
    )
    yield number, is_message
    if is_message and isinstance(structure[8], list):
        yield from part_numbers(structure[8], number + ".")


def fetch_items(structure: object) -> list[str]:
    items = [
        "ENVELOPE",
        "BODYSTRUCTURE",
        "BODY",
        "RFC822.SIZE",
        "BODY.PEEK[]",
        "BODY.PEEK[HEADER]",
        "BODY.PEEK[TEXT]",
        "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]",
        "BODY.PEEK[HEADER.FIELDS.NOT (FROM SUBJECT)]",
    ]
    for number, is_message in part_numbers(structure):
        items += [f"BODY.PEEK[{number}]", f"BODY.PEEK[{number}.MIME]"]
        if is_message:
            items += [f"BODY.PEEK[{number}.HEADER]", f"BODY.PEEK[{number}.TEXT]"]
        items += [f"BINARY.PEEK[{number}]", f"BINARY.SIZE[{number}]"]
    return items


def _outcome(untagged: list[bytes], tagged: bytes) -> bytes:
    """The FETCH or SEARCH responses, then the tagged status and response code
    (the human-readable text after them is free, RFC 9051 §7.1)."""
    kept = [
        r
        for r in untagged
        if (b" FETCH " in r[:24] or r.startswith(b"* SEARCH"))
        # Dovecot sends "* n FETCH (UID n)" before a NO; nothing was asked about UIDs.
        and not (r.endswith(b")\r\n") and b" FETCH (UID " in r[:24] and r.count(b" ") == 4)
    ]
    _, status, rest = [*tagged.split(b" ", 2), b""][:3]
    code = rest[: rest.index(b"]") + 1] if rest.startswith(b"[") else b""
    return b"".join(kept) + status + (b" " + code if code else b"")


def crlf(data: bytes) -> bytes:
    """Bare LF to CRLF: Dovecot converts at APPEND, mssd stores the bytes as given."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def collect(client: RawImap) -> dict[tuple[str, str], bytes]:
    """APPEND the corpus to a fresh folder and record every answer."""
    client.ok(b"CREATE " + FOLDER.encode())
    for path in MESSAGES:
        client.ok(b"APPEND " + FOLDER.encode() + b" {}", crlf(path.read_bytes()))
    client.ok(b"SELECT " + FOLDER.encode())
    answers: dict[tuple[str, str], bytes] = {}
    for seq, path in enumerate(MESSAGES, start=1):
        untagged, _ = client.command(b"FETCH %d (BODYSTRUCTURE)" % seq)
        fetched = next(r for r in untagged if b" FETCH " in r[:24])
        response, _ = _parse(fetched[fetched.index(b"(") :])
        assert isinstance(response, list)
        structure = response[1]
        for item in fetch_items(structure):
            untagged, tagged = client.command(b"FETCH %d (%s)" % (seq, item.encode()))
            answers[(path.stem, item)] = _outcome(untagged, tagged)
    for path in MESSAGES:
        if path.stem in KEYWORD_MESSAGES:
            seq = MESSAGES.index(path) + 1
            client.ok(b"STORE %d +FLAGS.SILENT (%s)" % (seq, KEYWORD.encode()))
    for criteria, literal in SEARCHES:
        text = b"SEARCH " + criteria.encode() + (b" {}" if literal is not None else b"")
        untagged, tagged = client.command(text, *([literal] if literal is not None else []))
        name = criteria + (f" {literal.decode()}" if literal is not None else "")
        answers[("SEARCH", name)] = _outcome(untagged, tagged)
    return answers


@pytest.fixture(scope="module")
def dovecot_answers() -> dict[tuple[str, str], bytes]:
    server = start_dovecot()
    try:
        client = RawImap(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        try:
            client.ok(b'LOGIN "differentiel" {}', DOVECOT_PASSWORD.encode())
            return collect(client)
        finally:
            client.close()
    finally:
        server.stop()


def _mssd_client(mssd: MssdProcess) -> RawImap:
    context = mssd.pki.client_context()
    raw = socket.create_connection(("127.0.0.1", mssd.imaps), timeout=30)
    tls: ssl.SSLSocket = context.wrap_socket(raw, server_hostname="localhost")
    client = RawImap(tls)
    client.ok(b'LOGIN "' + PER.encode() + b'" {}', PASSWORD.encode())
    return client


def _show(data: bytes | None) -> str:
    if data is None:
        return "(not asked)"
    text = repr(data)
    return text if len(text) < 1500 else text[:1500] + "..."


def test_mssd_answers_like_dovecot(
    mssd: MssdProcess, dovecot_answers: dict[tuple[str, str], bytes]
) -> None:
    client = _mssd_client(mssd)
    try:
        ours = collect(client)
    finally:
        client.close()
    problems: list[str] = []
    for key in sorted(set(ours) | set(dovecot_answers)):
        mine, theirs = ours.get(key), dovecot_answers.get(key)
        if mine == theirs:
            if key in KNOWN_DIFFERENCES:
                problems.append(f"{key}: listed in KNOWN_DIFFERENCES but now identical")
            continue
        if key in KNOWN_DIFFERENCES:
            continue
        problems.append(f"{key[0]} {key[1]}\n  mssd:    {_show(mine)}\n  Dovecot: {_show(theirs)}")
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems)
