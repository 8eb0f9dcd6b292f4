"""Sans-I/O IMAP command reader: bytes from the client in, typed commands out.

This module owns the framing of command lines and literals (RFC 9051 §4.3, RFC 7888) and
`CommandReader`, the front of the IMAP parsing stack. It never touches a socket, the event
loop, the store or the session state: the asyncio layer feeds it bytes, gets `Command`,
`NeedContinuation` or `ProtocolError` events out, and decides what to answer. That keeps
it exhaustively testable and fuzzable in-process.

The stack below it, every module as pure:

- `mssd.imap.grammar`: the client-command grammar (RFC 3501 §9, RFC 9051 §9 and the
  extensions mssd implements), one parsing method per command;
- `mssd.imap.grammar_fetch_search`: FETCH items and SEARCH, SORT and THREAD criteria;
- `mssd.imap.scanner`: character classes and token primitives;
- `mssd.imap.names`: mailbox names, modified UTF-7 or UTF-8;
- `mssd.imap.commands`: the values they produce (command arguments and events).

Invariants a newcomer would otherwise break:

- Parsing is linear in the input: no backtracking regular expressions, bounded digit
  runs, bounded nesting of search keys. Any input yields an event, never an exception.
- After a `ProtocolError` the reader is usable again: it resynchronises at the next
  CRLF that is not inside a literal (non-synchronizing literals are skipped byte-exact).
- 8-bit text is accepted only inside literals, or in quoted strings once the session
  enabled UTF8=ACCEPT / IMAP4rev2 (RFC 6855 §3, RFC 9051 §4.3) — set `CommandReader.utf8`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses

from mssd.imap.commands import (
    Command,
    IdleDone,
    NeedContinuation,
    ProtocolError,
    SaslResponse,
)
from mssd.imap.grammar import Parser
from mssd.imap.scanner import ATOM_RE, TAG_RE, ParseError

_LITERAL_MINUS_MAX = 4096  # RFC 7888 §5


# --------------------------------------------------------------------------------------
# Framing: lines and literals


def _literal_marker(line: bytes) -> tuple[int, bool, bool] | None:
    """(size, non-synchronizing, literal8) when `line` ends with {n}, {n+}, ~{n} or ~{n+}."""
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{", max(0, len(line) - 32))
    if start < 0:
        return None
    inner = line[start + 1 : -1]
    nonsync = inner.endswith(b"+")  # RFC 7888 §3
    if nonsync:
        inner = inner[:-1]
    if not inner or not inner.isdigit():
        return None
    size = int(inner) if len(inner) <= 20 else 10**20
    return size, nonsync, line[start - 1 : start] == b"~"


def _head(line: bytes) -> tuple[str | None, str | None]:
    """Tag and command name (UID prefix skipped) of a command's first line, when valid."""
    m = TAG_RE.match(line)
    if m is None or line[m.end() : m.end() + 1] != b" ":
        return None, None
    tag = m.group(0).decode("ascii")
    n = ATOM_RE.match(line, m.end() + 1)
    if n is None:
        return tag, None
    name = n.group(0).decode("ascii").upper()
    if name == "UID" and line[n.end() : n.end() + 1] == b" ":
        u = ATOM_RE.match(line, n.end() + 1)
        return tag, None if u is None else u.group(0).decode("ascii").upper()
    return tag, name


class CommandReader:
    """Feed bytes from the client; get complete commands out. Never does I/O.

    `max_line` bounds each line and the total non-literal text of one command;
    `max_literal` bounds the sum of the literals of one command. With `literal_plus`
    the server advertises LITERAL+ (RFC 7888 §3); without it, LITERAL- (RFC 7888 §5:
    non-synchronizing literals of at most 4096 octets). Set `utf8` once the client
    enabled UTF8=ACCEPT or IMAP4rev2. Lines end with CRLF; a bare LF is tolerated.
    """

    def __init__(
        self,
        *,
        max_line: int = 65536,
        max_literal: int = 64 * 1024 * 1024,
        literal_plus: bool = True,
    ) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self.literal_plus = literal_plus
        self.utf8 = False
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed bytes in _buf
        self._scan = 0  # where the search for the next LF resumes
        self._overlong: bytes | None = None  # head of a line being discarded as too long
        self._overlong_tail = b""
        self._reset()

    def _reset(self) -> None:
        self._lines: list[bytes] = []
        self._literals: list[tuple[bytes, bool]] = []
        self._text_size = 0
        self._literal_size = 0
        self._in_literal = False
        self._literal_binary = False
        self._remaining = 0
        self._chunks: list[bytes] = []
        # Once set, the rest of the command is skipped; `_reported` says whether the
        # error already went out.
        self._error: ProtocolError | None = None
        self._reported = False
        self._tag: str | None = None
        self._name: str | None = None

    def feed(self, data: bytes) -> None:
        """Append bytes received from the client."""
        if self._pos:
            del self._buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def abort_literal(self) -> None:
        """The server refused the synchronizing literal: the client will not send it, nor
        the rest of the command (RFC 9051 §7.5)."""
        self._reset()

    def next(self) -> Command | NeedContinuation | ProtocolError | None:
        """The next event, or None when more bytes are needed."""
        while True:
            if self._in_literal:
                if not self._read_literal():
                    return None
                continue
            taken = self._take_line()
            if taken is None:
                return None
            event = self._on_line(*taken)
            if event is not None:
                return event

    def next_line(self) -> bytes | ProtocolError | None:
        """Raw mode: the next line without its CRLF (for IDLE and AUTHENTICATE)."""
        taken = self._take_line()
        if taken is None:
            return None
        line, too_long = taken
        if too_long:
            return ProtocolError(None, "line too long")
        return line

    def next_idle_done(self) -> IdleDone | ProtocolError | None:
        """During IDLE: IdleDone for "DONE" (RFC 2177 §3), ProtocolError for anything else."""
        line = self.next_line()
        if isinstance(line, bytes):
            return IdleDone() if line.upper() == b"DONE" else ProtocolError(None, "expected DONE")
        return line

    def next_sasl_response(self) -> SaslResponse | ProtocolError | None:
        """During AUTHENTICATE: a base64 line, or "*" to cancel (RFC 9051 §6.2.2)."""
        line = self.next_line()
        if not isinstance(line, bytes):
            return line
        if line == b"*":
            return SaslResponse(b"", cancelled=True)
        try:
            return SaslResponse(base64.b64decode(line, validate=True))
        except binascii.Error:
            return ProtocolError(None, "invalid base64 in SASL response")

    # -- internals -------------------------------------------------------------------

    def _read_literal(self) -> bool:
        take = min(self._remaining, len(self._buf) - self._pos)
        if take and self._error is None:
            self._chunks.append(bytes(self._buf[self._pos : self._pos + take]))
        self._pos += take
        self._scan = self._pos
        self._remaining -= take
        if self._remaining:
            return False
        self._in_literal = False
        if self._error is None:
            self._literals.append((b"".join(self._chunks), self._literal_binary))
            self._chunks = []
        return True

    def _take_line(self) -> tuple[bytes, bool] | None:
        end = self._buf.find(b"\n", max(self._scan, self._pos))
        if end < 0:
            pending = len(self._buf) - self._pos
            if pending > self.max_line + 1:
                # Keep only what resynchronisation needs: the head (for the tag) and the
                # tail (for a literal announcement); drop the rest now.
                chunk = bytes(self._buf[self._pos :])
                if self._overlong is None:
                    self._overlong = chunk[:1024]
                self._overlong_tail = (self._overlong_tail + chunk)[-32:]
                self._pos = len(self._buf)
            self._scan = len(self._buf)
            return None
        line = bytes(self._buf[self._pos : end])
        self._pos = self._scan = end + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._overlong is not None:
            # NUL cannot be part of a tag: a tag cut short is no tag at all.
            line = self._overlong + b"\x00" + (self._overlong_tail + line)[-32:]
            self._overlong = None
            self._overlong_tail = b""
            return line, True
        return line, len(line) > self.max_line

    def _on_line(
        self, line: bytes, too_long: bool
    ) -> Command | NeedContinuation | ProtocolError | None:
        first = not self._lines and self._error is None
        if first and not line and not too_long:
            return ProtocolError(None, "empty command line")
        if first:
            self._tag, self._name = _head(line)
        tag, name = self._tag, self._name
        self._text_size += len(line)
        if self._error is None and (too_long or self._text_size > self.max_line):
            self._error = ProtocolError(tag, "command line too long")
        marker = _literal_marker(line)
        if self._error is None:
            self._lines.append(line)
            if marker is not None and (tag is None or name is None):
                self._error = ProtocolError(tag, "malformed command")
        if marker is None:
            return self._finish()
        size, nonsync, binary = marker
        if self._error is None:
            too_big = self._literal_size + size > self.max_literal or (
                nonsync and not self.literal_plus and size > _LITERAL_MINUS_MAX
            )
            if too_big:
                self._error = ProtocolError(tag, "literal too big", "TOOBIG")
        if self._error is not None:
            if not nonsync:
                # The client waits for a continuation that will not come: the command
                # ends here.
                return self._finish()
            self._start_literal(size, binary)
            if self._reported:
                return None
            self._reported = True  # answer now; the literal is skipped as it arrives
            return self._error
        self._literal_size += size
        self._start_literal(size, binary)
        if nonsync:
            return None
        assert tag is not None and name is not None
        return NeedContinuation(tag, name, size, binary)

    def _start_literal(self, size: int, binary: bool) -> None:
        self._in_literal = True
        self._remaining = size
        self._literal_binary = binary
        self._chunks = []

    def _finish(self) -> Command | ProtocolError | None:
        error, reported = self._error, self._reported
        lines, literals = self._lines, self._literals
        self._reset()
        if error is not None:
            return None if reported else error
        if len(lines) == 1 and not literals:
            return _parse_line(lines[0], self.utf8)
        parser = Parser(lines, literals, self.utf8)
        try:
            return parser.command()
        except ParseError as exc:
            return ProtocolError(parser.tag, exc.message, exc.code, exc.status)


# --------------------------------------------------------------------------------------
# Commands clients repeat, parsed once

_REPEATED = frozenset(
    {"CAPABILITY", "CHECK", "EXAMINE", "EXPUNGE", "FETCH", "LIST", "LSUB", "NOOP", "SEARCH",
     "SELECT", "SORT", "STATUS", "STORE", "THREAD"}
)  # fmt: skip
"""Commands worth remembering parsed (a mail client polls with the same few); never
LOGIN or AUTHENTICATE, whose lines hold credentials."""
_PARSED: dict[tuple[bytes, bool], Command] = {}
_PARSED_MAX = 1024
_PARSED_LINE = 512
"""At most this many parsed lines, of at most this many octets, per process."""


def _parse_line(line: bytes, utf8: bool) -> Command | ProtocolError:
    """A one-line command, from the lines already parsed when a client sent the
    same text after another tag (commands are frozen values; only the tag
    differs), else parsed. The tag is checked as the parser checks it."""
    tag = TAG_RE.match(line)
    key: tuple[bytes, bool] | None = None
    if tag is not None and line[tag.end() : tag.end() + 1] == b" " and len(line) <= _PARSED_LINE:
        key = (line[tag.end() + 1 :], utf8)
        known = _PARSED.get(key)
        if known is not None:
            return dataclasses.replace(known, tag=tag.group(0).decode("ascii"))
    parser = Parser([line], [], utf8)
    try:
        command = parser.command()
    except ParseError as exc:
        return ProtocolError(parser.tag, exc.message, exc.code, exc.status)
    if key is not None and command.name in _REPEATED:
        if len(_PARSED) >= _PARSED_MAX:
            del _PARSED[next(iter(_PARSED))]  # the oldest
        _PARSED[key] = command
    return command
