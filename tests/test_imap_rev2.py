"""IMAP4rev2 (RFC 9051) against a running mssd over TLS, on SQLite and PostgreSQL.

A session that sends ENABLE IMAP4rev2 gets rev2 answers (no RECENT, no [UNSEEN],
the mailbox's LIST on SELECT, [CLOSED], ESEARCH for every SEARCH, UTF-8 mailbox
names, STATUS DELETED and SIZE); a session that does not keeps the IMAP4rev1
answers. Each test works in a fresh account, so the exact responses are known.
The extensions RFC 9051 took in (SEARCHRES, LIST-EXTENDED, QRESYNC's [CLOSED])
are also compared with a real Dovecot, which does not offer IMAP4rev2 itself
(Debian's 2.3 advertises IMAP4rev1 only).
"""

from __future__ import annotations

import re

from conftest import PASSWORD, MssdProcess
from test_imap_clients import RawImap, new_account

FLAGS = b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
PERMANENT = (
    b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted\r\n"
)


def message(subject: str, body: str = "Compte rendu.") -> bytes:
    return f"From: labo@x.test\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


class Client(RawImap):
    """A fresh account's session, in IMAP4rev2 once ``enable`` is called."""

    def __init__(self, server: MssdProcess, login: str) -> None:
        super().__init__(server)
        self.command(f'LOGIN {login} "{PASSWORD}"')

    def enable_rev2(self) -> None:
        assert self.command("ENABLE IMAP4rev2") == [b"* ENABLED IMAP4rev2\r\n"]

    def append(self, folder: str, data: bytes, flags: str = "") -> None:
        """APPEND with a LITERAL+ literal (RFC 7888); ``folder`` is sent as is."""
        tag = self.send(f"APPEND {folder} ({flags}) {{{len(data)}+}}\r\n{data.decode()}")
        _, done = self.until(tag)
        assert done.startswith(f"{tag} OK ".encode()), done

    def answer(self, text: str) -> tuple[list[bytes], bytes]:
        """Untagged responses and the tagged one, without the tag."""
        tag = self.send(text)
        untagged, done = self.until(tag)
        return untagged, done[len(tag) + 1 :]


def uidvalidity(lines: list[bytes]) -> int:
    return next(int(m.group(1)) for x in lines if (m := re.match(rb"\* OK \[UIDVALIDITY (\d+)", x)))


def test_utf8_accept_session_creates_a_folder_with_a_quoted_utf8_name(mssd: MssdProcess) -> None:
    """RFC 6855 §3: after ENABLE UTF8=ACCEPT, quoted strings may hold UTF-8."""
    client = Client(mssd, new_account(mssd, "utf8-accept"))
    try:
        client.command("ENABLE UTF8=ACCEPT")
        assert client.answer('CREATE "Ordonnances reçues"') == ([], b"OK CREATE completed\r\n")
        assert client.command('LIST "" "Ordonnances*"') == [
            '* LIST (\\HasNoChildren) "/" "Ordonnances reçues"\r\n'.encode()
        ]
    finally:
        client.close()
