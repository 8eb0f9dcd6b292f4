"""IMAP4rev2 (RFC 9051) against a running mssd over TLS, on SQLite and PostgreSQL.

A session that sends ENABLE IMAP4rev2 gets rev2 answers (no RECENT, no [UNSEEN],
the mailbox's LIST on SELECT, [CLOSED], ESEARCH for every SEARCH, UTF-8 mailbox
names, STATUS DELETED and SIZE); a session that does not keeps the IMAP4rev1
answers. Each test works in a fresh account, so the exact responses are known.
The extensions RFC 9051 took in (SEARCHRES, LIST-EXTENDED, QRESYNC's [CLOSED]),
LSUB, searches with MODSEQ and partial BINARY are also compared with a real
Dovecot, which does not offer IMAP4rev2 itself (Debian's 2.3 advertises IMAP4rev1
only).
"""

from __future__ import annotations

import re
import socket

import pytest
from conftest import PASSWORD, MssdProcess
from test_imap_clients import RawImap, new_account
from test_imap_dovecot import DOVECOT_PASSWORD, _parse, start_dovecot
from test_imap_dovecot import RawImap as WireClient

from mssd.imap.names import encode_mailbox_name

FLAGS = b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
PERMANENT = (
    b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted\r\n"
)


def message(subject: str, body: str = "Compte rendu.") -> bytes:
    return f"From: labo@x.test\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


@pytest.fixture
def login(mssd: MssdProcess) -> str:
    """A fresh account, so that a test knows every folder and message it sees."""
    return new_account(mssd, "rev2")


class Client(RawImap):
    """A logged-in session, in IMAP4rev2 if ``rev2``; closed on leaving ``with``."""

    def __init__(self, server: MssdProcess, login: str, *, rev2: bool = False) -> None:
        super().__init__(server)
        self.command(f'LOGIN {login} "{PASSWORD}"')
        if rev2:
            assert self.command("ENABLE IMAP4rev2") == [b"* ENABLED IMAP4rev2\r\n"]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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


def test_capability_lists_both_revisions_and_enable_switches_to_rev2(
    mssd: MssdProcess, login: str
) -> None:
    with Client(mssd, login) as client:
        assert client.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 IMAP4rev2 ")
        (caps,) = client.command("CAPABILITY")
        assert b" STATUS=SIZE " in caps and b" LITERAL+ " in caps
        assert client.answer("ENABLE IMAP4rev2") == (
            [b"* ENABLED IMAP4rev2\r\n"],
            b"OK ENABLE completed\r\n",
        )
        # RFC 5161 §3.1: ENABLED lists only what this command newly enabled.
        assert client.answer("ENABLE imap4rev2 CONDSTORE") == (
            [b"* ENABLED CONDSTORE\r\n"],
            b"OK ENABLE completed\r\n",
        )


def test_rev2_select_has_no_recent_nor_unseen_and_lists_the_mailbox(
    mssd: MssdProcess, login: str
) -> None:
    with Client(mssd, login) as rev1, Client(mssd, login, rev2=True) as rev2:
        rev2.append("INBOX", message("lu"), "\\Seen")
        rev2.append("INBOX", message("pas lu"))
        untagged, done = rev2.answer("SELECT INBOX")
        valid = uidvalidity(untagged)
        assert untagged == [
            FLAGS,
            b"* 2 EXISTS\r\n",
            PERMANENT,
            b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % valid,
            b"* OK [UIDNEXT 3] Predicted next UID\r\n",
            b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n',
        ]
        assert done == b"OK [READ-WRITE] SELECT completed\r\n"
        untagged, done = rev2.answer("EXAMINE Sent")
        assert untagged[-1] == b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"\r\n'
        assert done == b"OK [READ-ONLY] EXAMINE completed\r\n"
        # Without ENABLE, the same mailbox answers as in RFC 3501.
        untagged, done = rev1.answer("SELECT INBOX")
        assert untagged == [
            FLAGS,
            b"* 2 EXISTS\r\n",
            b"* 0 RECENT\r\n",
            PERMANENT,
            b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % valid,
            b"* OK [UIDNEXT 3] Predicted next UID\r\n",
            b"* OK [UNSEEN 2] First unseen\r\n",
        ]
        assert done == b"OK [READ-WRITE] SELECT completed\r\n"


def test_reselect_says_closed_in_rev2_and_with_qresync(mssd: MssdProcess, login: str) -> None:
    with (
        Client(mssd, login) as rev1,
        Client(mssd, login, rev2=True) as rev2,
        Client(mssd, login) as qresync,
    ):
        rev2.command("SELECT INBOX")
        untagged = rev2.command("SELECT Drafts")
        assert untagged[0] == b"* OK [CLOSED] Previous mailbox closed\r\n"
        assert untagged[-1] == b'* LIST (\\HasNoChildren \\Drafts) "/" "Drafts"\r\n'
        # RFC 9051 §6.3.2: a failed SELECT still closes the mailbox, and says so.
        untagged, done = rev2.answer('SELECT "Absent"')
        assert untagged == [b"* OK [CLOSED] Previous mailbox closed\r\n"]
        assert done == b"NO [NONEXISTENT] No mailbox Absent\r\n"
        assert rev2.answer("FETCH 1 (UID)") == ([], b"BAD FETCH not allowed now\r\n")
        # RFC 7162 §3.2.11: the same boundary once QRESYNC is enabled.
        qresync.command("ENABLE QRESYNC")
        qresync.command("SELECT INBOX")
        assert qresync.command("SELECT Drafts")[0] == b"* OK [CLOSED] Previous mailbox closed\r\n"
        rev1.command("SELECT INBOX")
        assert not [x for x in rev1.command("SELECT Drafts") if b"CLOSED" in x]


def test_rev2_search_answers_esearch_with_tag_and_uid(mssd: MssdProcess, login: str) -> None:
    with Client(mssd, login) as rev1, Client(mssd, login, rev2=True) as rev2:
        for n, flags in enumerate(("\\Flagged", "", "\\Flagged \\Seen", "\\Deleted")):
            rev2.append("INBOX", message(f"analyse {n}"), flags)
        rev2.command("SELECT INBOX")
        tag = rev2.send("SEARCH FLAGGED")
        assert rev2.until(tag) == (
            [b'* ESEARCH (TAG "%s") ALL 1,3\r\n' % tag.encode()],
            f"{tag} OK SEARCH completed\r\n".encode(),
        )
        tag = rev2.send("UID SEARCH UNSEEN")
        assert rev2.until(tag)[0] == [b'* ESEARCH (TAG "%s") UID ALL 1:2,4\r\n' % tag.encode()]
        # No match: the correlator alone (RFC 9051 §7.3.4, ALL needs a non-empty set).
        tag = rev2.send("SEARCH SUBJECT absent")
        assert rev2.until(tag)[0] == [b'* ESEARCH (TAG "%s")\r\n' % tag.encode()]
        tag = rev2.send("UID SEARCH RETURN (MIN MAX COUNT) UNDELETED")
        assert rev2.until(tag)[0] == [
            b'* ESEARCH (TAG "%s") UID MIN 1 MAX 3 COUNT 3\r\n' % tag.encode()
        ]
        # The session that did not enable rev2 still gets RFC 3501's SEARCH.
        rev1.command("SELECT INBOX")
        assert rev1.answer("SEARCH FLAGGED") == (
            [b"* SEARCH 1 3\r\n"],
            b"OK SEARCH completed\r\n",
        )
        assert rev1.command("UID SEARCH SUBJECT absent") == [b"* SEARCH\r\n"]


def test_rev2_refuses_recent_new_old_and_status_recent(mssd: MssdProcess, login: str) -> None:
    with Client(mssd, login) as rev1, Client(mssd, login, rev2=True) as rev2:
        rev2.append("INBOX", message("récent ?"))
        rev2.command("SELECT INBOX")
        refusal = b"BAD RECENT, NEW and OLD are not search keys in IMAP4rev2 (RFC 9051)\r\n"
        for key in ("RECENT", "NEW", "NOT OLD", "OR SEEN RECENT"):
            assert rev2.answer(f"SEARCH {key}") == ([], refusal)
            assert rev2.answer(f"UID SEARCH {key}") == ([], refusal)
        status_refusal = (
            [],
            b"BAD RECENT is not a STATUS item in IMAP4rev2 (RFC 9051 section 6.3.11)\r\n",
        )
        assert rev2.answer("STATUS INBOX (MESSAGES RECENT)") == status_refusal
        assert rev2.answer('LIST "" INBOX RETURN (STATUS (RECENT))') == status_refusal
        # The session stays usable.
        tag = rev2.send("SEARCH ALL")
        assert rev2.until(tag)[0] == [b'* ESEARCH (TAG "%s") ALL 1\r\n' % tag.encode()]
        # In IMAP4rev1 mssd keeps no \Recent: RECENT and NEW match nothing, OLD all.
        rev1.command("SELECT INBOX")
        assert rev1.command("SEARCH RECENT") == [b"* SEARCH\r\n"]
        assert rev1.command("SEARCH NEW") == [b"* SEARCH\r\n"]
        assert rev1.command("SEARCH OLD") == [b"* SEARCH 1\r\n"]
        assert rev1.command("STATUS INBOX (RECENT)") == [b'* STATUS "INBOX" (RECENT 0)\r\n']


def test_search_save_with_only_min_or_max_keeps_only_those(mssd: MssdProcess, login: str) -> None:
    """RFC 9051 §6.4.4 (SEARCHRES): SAVE with MIN and/or MAX alone saves those
    messages; with any other option, every message found."""
    with Client(mssd, login, rev2=True) as client:
        for n in range(4):
            client.append("INBOX", message(f"bilan {n}"))
        client.command("SELECT INBOX")
        for options, saved in (
            ("SAVE MIN", [1]),
            ("SAVE MAX", [4]),
            ("SAVE MIN MAX", [1, 4]),
            ("SAVE MIN COUNT", [1, 2, 3, 4]),
            ("SAVE", [1, 2, 3, 4]),
        ):
            client.command(f"SEARCH RETURN ({options}) ALL")
            fetched = client.command("FETCH $ (UID)")
            assert fetched == [b"* %d FETCH (UID %d)\r\n" % (n, n) for n in saved], options


def test_rev2_folder_names_are_utf8_created_listed_and_renamed(
    mssd: MssdProcess, login: str
) -> None:
    with Client(mssd, login) as rev1, Client(mssd, login, rev2=True) as rev2:
        assert rev2.answer('CREATE "Résultats/Biologie"') == ([], b"OK CREATE completed\r\n")
        # RFC 9051 §5.1: "&" is a character like another, not a modified UTF-7 shift.
        rev2.command('CREATE "R&D"')
        rev2.append('"Résultats/Biologie"', message("NFS"))
        assert rev2.command('LIST "" "R*"') == [
            b'* LIST (\\HasNoChildren) "/" "R&D"\r\n',
            '* LIST (\\HasChildren) "/" "Résultats"\r\n'.encode(),
            '* LIST (\\HasNoChildren) "/" "Résultats/Biologie"\r\n'.encode(),
        ]
        rev2.command('RENAME "Résultats" "Comptes rendus été"')
        assert rev2.command('LIST "" "Comptes*"') == [
            '* LIST (\\HasChildren) "/" "Comptes rendus été"\r\n'.encode(),
            '* LIST (\\HasNoChildren) "/" "Comptes rendus été/Biologie"\r\n'.encode(),
        ]
        assert rev2.command('STATUS "Comptes rendus été/Biologie" (MESSAGES)') == [
            '* STATUS "Comptes rendus été/Biologie" (MESSAGES 1)\r\n'.encode()
        ]
        # The rev1 session sees the same folders in modified UTF-7 (RFC 3501 §5.1.3).
        assert rev1.command('LIST "" ("Comptes*" "R*")') == [
            b'* LIST (\\HasChildren) "/" "Comptes rendus &AOk-t&AOk-"\r\n',
            b'* LIST (\\HasNoChildren) "/" "Comptes rendus &AOk-t&AOk-/Biologie"\r\n',
            b'* LIST (\\HasNoChildren) "/" "R&-D"\r\n',
        ]
        rev1.command('SELECT "Comptes rendus &AOk-t&AOk-/Biologie"')


def test_utf8_accept_session_creates_a_folder_with_a_quoted_utf8_name(
    mssd: MssdProcess, login: str
) -> None:
    """RFC 6855 §3: after ENABLE UTF8=ACCEPT, quoted strings may hold UTF-8."""
    with Client(mssd, login) as client:
        client.command("ENABLE UTF8=ACCEPT")
        assert client.answer('CREATE "Ordonnances reçues"') == ([], b"OK CREATE completed\r\n")
        assert client.command('LIST "" "Ordonnances*"') == [
            '* LIST (\\HasNoChildren) "/" "Ordonnances reçues"\r\n'.encode()
        ]


def test_new_names_with_characters_rfc9051_forbids_are_refused(
    mssd: MssdProcess, login: str
) -> None:
    with Client(mssd, login) as rev1, Client(mssd, login, rev2=True) as rev2:
        rev2.command('CREATE "Dossier"')
        refusal = b"NO [CANNOT] Mailbox names cannot contain U+%04X (RFC 9051 section 5.1)\r\n"
        assert rev2.answer('CREATE "Ligne\u2028suivante"') == ([], refusal % 0x2028)
        assert rev2.answer('RENAME "Dossier" "Contr\u0085le"') == ([], refusal % 0x85)
        # A rev1 client can spell them in modified UTF-7; the names are shared.
        name = encode_mailbox_name("Para\u2029graphe", False)
        assert rev1.answer(f'CREATE "{name}"') == ([], refusal % 0x2029)
        # Nothing was renamed, and both sessions go on.
        assert rev2.command('LIST "" "Dossier"') == [b'* LIST (\\HasNoChildren) "/" "Dossier"\r\n']
        assert rev1.command('LIST "" "Para*"') == []


def test_rev2_status_reports_deleted_and_size(mssd: MssdProcess, login: str) -> None:
    with Client(mssd, login, rev2=True) as client:
        client.command('CREATE "Échanges"')
        kept, deleted = message("garder", "x" * 100), message("jeter")
        client.append('"Échanges"', kept, "\\Seen")
        client.append('"Échanges"', deleted, "\\Deleted")
        total = len(kept) + len(deleted)
        assert client.answer('STATUS "Échanges" (MESSAGES UNSEEN DELETED SIZE)') == (
            [f'* STATUS "Échanges" (MESSAGES 2 UNSEEN 1 DELETED 1 SIZE {total})\r\n'.encode()],
            b"OK STATUS completed\r\n",
        )
        # RFC 5819 with the rev2 items: the STATUS follows the mailbox's LIST.
        assert client.command('LIST "" "Éch%" RETURN (STATUS (DELETED SIZE))') == [
            '* LIST (\\HasNoChildren) "/" "Échanges"\r\n'.encode(),
            f'* STATUS "Échanges" (DELETED 1 SIZE {total})\r\n'.encode(),
        ]


def test_rev2_refusals_carry_the_response_codes_of_rfc9051(mssd: MssdProcess, login: str) -> None:
    """RFC 9051 §7.1: ALREADYEXISTS, NONEXISTENT, HASCHILDREN, CANNOT, TRYCREATE."""
    with Client(mssd, login, rev2=True) as client:
        client.command('CREATE "Données/Été"')
        for command, refusal in (
            ('CREATE "Données"', "NO [ALREADYEXISTS] Données already exists"),
            ('RENAME "Sent" "Données"', "NO [ALREADYEXISTS] Données already exists"),
            ('RENAME "Absent" "Autre"', "NO [NONEXISTENT] no folder Absent"),
            ('SELECT "Absent"', "NO [NONEXISTENT] No mailbox Absent"),
            ('DELETE "Données"', "NO [HASCHILDREN] Données has subfolders: delete them first"),
            ("DELETE INBOX", "NO [CANNOT] INBOX cannot be deleted"),
            ('APPEND "Absent" {5+}\r\nbilan', "NO [TRYCREATE] No mailbox Absent"),
        ):
            assert client.answer(command) == ([], f"{refusal}\r\n".encode()), command


def test_list_recursivematch_gives_childinfo_and_subscribed_is_marked(
    mssd: MssdProcess, login: str
) -> None:
    with Client(mssd, login, rev2=True) as client:
        client.command('CREATE "Projets/Été/T1"')
        client.command('CREATE "Projets/Hiver"')
        for name in ("Projets", "Projets/Été", "Projets/Hiver"):
            client.command(f'UNSUBSCRIBE "{name}"')
        # RFC 9051 §6.3.9: "Projets" is not subscribed, but a descendant the
        # pattern leaves out is: CHILDINFO says why it is listed.
        assert client.command('LIST (SUBSCRIBED RECURSIVEMATCH) "" "Projets%"') == [
            b'* LIST (\\HasChildren) "/" "Projets" ("CHILDINFO" ("SUBSCRIBED"))\r\n'
        ]
        # With "*" the subscribed descendant is listed itself: no redundant parents.
        assert client.command('LIST (SUBSCRIBED RECURSIVEMATCH) "" "Projets*"') == [
            '* LIST (\\HasNoChildren \\Subscribed) "/" "Projets/Été/T1"\r\n'.encode()
        ]
        client.command('SUBSCRIBE "Projets"')
        assert client.command('LIST (SUBSCRIBED RECURSIVEMATCH) "" "Projets*"') == [
            b'* LIST (\\HasChildren \\Subscribed) "/" "Projets" ("CHILDINFO" ("SUBSCRIBED"))\r\n',
            '* LIST (\\HasNoChildren \\Subscribed) "/" "Projets/Été/T1"\r\n'.encode(),
        ]
        # RFC 5258 §3: the SUBSCRIBED selection implies the SUBSCRIBED return option.
        assert client.command('LIST (SUBSCRIBED) "" "Projets/*"') == [
            '* LIST (\\HasNoChildren \\Subscribed) "/" "Projets/Été/T1"\r\n'.encode()
        ]
        # LSUB is deprecated in IMAP4rev2 but still answered.
        assert client.answer('LSUB "" "Projets/*"') == (
            ['* LSUB (\\HasNoChildren) "/" "Projets/Été/T1"\r\n'.encode()],
            b"OK LSUB completed\r\n",
        )


# -- compared with Dovecot ----------------------------------------------------------

_DOVECOT_NAMESPACE = """
namespace inbox {
  inbox = yes
  separator = /
}
"""

_SCRIPT = (
    "ENABLE QRESYNC",
    'CREATE "Projets"',
    'CREATE "Projets/2024"',
    'CREATE "Projets/2024/T1"',
    'CREATE "Projets/Vieux"',
    'SUBSCRIBE "Projets"',
    'UNSUBSCRIBE "Projets/2024"',
    'UNSUBSCRIBE "Projets/Vieux"',
    'SUBSCRIBE "Projets/2024/T1"',
    'LIST (SUBSCRIBED RECURSIVEMATCH) "" "Projets%" RETURN (CHILDREN)',
    'LIST (SUBSCRIBED RECURSIVEMATCH) "" "Projets/%" RETURN (CHILDREN)',
    'LIST (SUBSCRIBED RECURSIVEMATCH) "" "Projets*" RETURN (CHILDREN)',
    'LIST (SUBSCRIBED) "" "Projets*" RETURN (CHILDREN)',
    'LIST "" "Projets*" RETURN (SUBSCRIBED CHILDREN)',
    # RFC 3501 §6.3.9: "%" stopping above a subscribed name returns it \Noselect.
    'LSUB "" "Projets%"',
    'LSUB "" "Projets/%"',
    'LSUB "" "Projets*"',
    'LSUB "" "Projets"',
    'UNSUBSCRIBE "Projets"',
    'LIST (SUBSCRIBED RECURSIVEMATCH) "" "Projets%" RETURN (CHILDREN)',
    'LSUB "" "Projets%"',
    'SELECT "Projets/2024"',
    "APPEND Projets/2024 {}",
    "APPEND Projets/2024 (\\Flagged) {}",
    "APPEND Projets/2024 {}",
    "APPEND Projets/2024 (\\Flagged) {}",
    'SELECT "Projets/2024"',
    "SEARCH RETURN (SAVE MIN) FLAGGED",
    "FETCH $ (UID)",
    "SEARCH RETURN (SAVE MAX COUNT) UNFLAGGED",
    "FETCH $ (UID)",
    "SEARCH RETURN (SAVE MIN MAX) ALL",
    "FETCH $ (UID)",
    "UID SEARCH RETURN () FLAGGED",
    "SEARCH RETURN (MIN) SUBJECT absent",
    # RFC 7162 §3.1.6, RFC 4731 §3.2: MODSEQ after a non-empty result only.
    "SEARCH MODSEQ 1",
    "SEARCH FLAGGED MODSEQ 1",
    "SEARCH MODSEQ 999999",
    "UID SEARCH RETURN (MIN MAX) MODSEQ 1",
    "SEARCH RETURN (COUNT) MODSEQ 999999",
    "SEARCH RETURN (ALL) NOT MODSEQ 1",
    # RFC 3516 §4.3: the partial BINARY item names its origin octet.
    "FETCH 2 (BINARY.PEEK[1]<1.3>)",
    'SELECT "Absent"',
)
"""Commands that exercise what RFC 9051 took from SEARCHRES, ESEARCH,
LIST-EXTENDED and QRESYNC, and LSUB, MODSEQ searches and partial BINARY;
each ``{}`` stands for one small message."""

_CHILDREN = frozenset((b"\\haschildren", b"\\hasnochildren"))
"""LSUB attributes Dovecot leaves out; mssd adds them (RFC 5258 §4 lets a server)."""


def _comparable(untagged: list[bytes], tagged: bytes) -> tuple[object, ...]:
    """What both servers must agree on: each response as parsed values (quoting
    and human-readable texts aside), LIST and LSUB responses as a set (their order
    is free), and the tagged status."""
    kept: list[object] = []
    listed: set[object] = set()
    for line in untagged:
        if line.startswith((b"* LIST ", b"* LSUB ")):
            values, _ = _parse(b"(" + line[len(b"* LIST ") :].rstrip(b"\r\n") + b")")
            assert isinstance(values, list)
            flags = frozenset(x.lower() for x in values[0] if isinstance(x, bytes))
            if line.startswith(b"* LSUB "):
                flags -= _CHILDREN
            listed.add((line[2:6], flags, repr(values[1:])))
        elif line.startswith((b"* SEARCH", b"* ESEARCH")):
            # The two servers number modseqs their own way: whether a MODSEQ
            # comes is compared here, its value in test_imap_rfc_gaps.py.
            kept.append(re.sub(rb"MODSEQ \d+", b"MODSEQ n", line))
        elif line.startswith((b"* OK [CLOSED]", b"* ENABLED")) or b" FETCH " in line:
            kept.append(line.split(b"]")[0] if line.startswith(b"* OK [") else line)
    return (tuple(kept), frozenset(listed), tagged.split(b" ")[1])


def _run(client: WireClient) -> list[tuple[object, ...]]:
    answers = []
    for text in _SCRIPT:
        literals = [message("bilan")] * text.count("{}")
        answers.append(_comparable(*client.command(text.encode(), *literals)))
    return answers


def test_incorporated_extensions_answer_like_dovecot(mssd: MssdProcess, login: str) -> None:
    dovecot = start_dovecot(_DOVECOT_NAMESPACE)
    try:
        client = WireClient(socket.create_connection(("127.0.0.1", dovecot.port), 30))
        try:
            client.ok(b'LOGIN "differentiel" {}', DOVECOT_PASSWORD.encode())
            theirs = _run(client)
        finally:
            client.close()
    finally:
        dovecot.stop()
    raw = socket.create_connection(("127.0.0.1", mssd.imaps), timeout=30)
    client = WireClient(mssd.pki.client_context().wrap_socket(raw, server_hostname="localhost"))
    try:
        client.ok(b'LOGIN "' + login.encode() + b'" {}', PASSWORD.encode())
        ours = _run(client)
    finally:
        client.close()
    differences = [
        f"{text}\n  mssd:    {mine}\n  Dovecot: {other}"
        for text, mine, other in zip(_SCRIPT, ours, theirs, strict=True)
        if mine != other
    ]
    assert not differences, "\n".join(differences)
