"""The IMAP server against real clients (imaplib, imapclient, raw sockets), on
SQLite and PostgreSQL, with mail delivered over real SMTP."""

from __future__ import annotations

import base64
import imaplib
import re
import socket
import time
from collections.abc import Iterator

import pytest
from conftest import ORG, PASSWORD, PER, PER2, MssdProcess, inbox, run
from imapclient import IMAPClient
from test_smtp_submission import _audit, message

SHARED_ORG = f"Partag&AOk-s/{ORG}/INBOX"


def deliver(mssd: MssdProcess, subject: str, to: str = PER2, body: bytes = b"") -> None:
    with mssd.smtp() as client:
        client.sendmail(PER, [to], message(subject, extra=body))


def imap(mssd: MssdProcess, login: str | None = PER2) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", mssd.imap, timeout=30)
    client.starttls(ssl_context=mssd.pki.client_context())
    if login is not None:
        client.login(login, PASSWORD)
    return client


def imapclient_session(mssd: MssdProcess) -> IMAPClient:
    return IMAPClient("127.0.0.1", port=mssd.imaps, ssl=True, ssl_context=mssd.pki.client_context())


@pytest.fixture
def session(mssd: MssdProcess) -> Iterator[imaplib.IMAP4]:
    client = imap(mssd)
    try:
        yield client
    finally:
        try:
            client.logout()
        except (imaplib.IMAP4.error, OSError):
            pass


def test_login_is_disabled_before_tls(mssd: MssdProcess) -> None:
    client = imaplib.IMAP4("127.0.0.1", mssd.imap, timeout=30)
    try:
        assert "LOGINDISABLED" in client.capabilities and "STARTTLS" in client.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            client.login(PER2, PASSWORD)
    finally:
        client.shutdown()


def test_starttls_then_login_and_capabilities(mssd: MssdProcess) -> None:
    client = imap(mssd, login=None)
    assert "LOGINDISABLED" not in client.capabilities
    assert "AUTH=PLAIN" in client.capabilities
    typ, data = client.login(PER2, PASSWORD)
    assert typ == "OK" and b"CAPABILITY IMAP4rev1" in data[0]
    # RFC 3502 §3: APPEND of several messages is advertised (APPEND takes them all or none).
    assert b" MULTIAPPEND " in data[0]
    client.logout()


def test_implicit_tls_and_authenticate_plain_with_initial_response(mssd: MssdProcess) -> None:
    client = imaplib.IMAP4_SSL(
        "127.0.0.1", mssd.imaps, ssl_context=mssd.pki.client_context(), timeout=30
    )
    assert "STARTTLS" not in client.capabilities
    token = base64.b64encode(f"\0{PER2}\0{PASSWORD}".encode()).decode()
    tag = client._new_tag().decode()  # type: ignore[attr-defined]
    client.send(f"{tag} AUTHENTICATE PLAIN {token}\r\n".encode())
    reply = client.readline()
    while not reply.startswith(tag.encode()):
        reply = client.readline()
    assert reply.startswith(f"{tag} OK".encode()), reply
    client.shutdown()


def test_wrong_password_is_refused(mssd: MssdProcess) -> None:
    client = imap(mssd, login=None)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login(PER2, "not the password")
    client.shutdown()


def test_client_certificate_external(mssd: MssdProcess) -> None:
    context = mssd.pki.client_context(mssd.pki.personal)
    client = imaplib.IMAP4_SSL("127.0.0.1", mssd.imaps, ssl_context=context, timeout=30)
    assert "AUTH=EXTERNAL" in client.capabilities
    typ, _ = client.authenticate("EXTERNAL", lambda _: b"")
    assert typ == "OK"
    typ, _ = client.select("INBOX", readonly=True)
    assert typ == "OK"
    client.logout()


def test_list_shows_special_use_and_the_shared_org_mailbox(session: imaplib.IMAP4) -> None:
    typ, lines = session.list()
    assert typ == "OK"
    listing = b"\n".join(x for x in lines if isinstance(x, bytes))
    for folder, use in (
        (b'"Sent"', b"\\Sent"),
        (b'"Drafts"', b"\\Drafts"),
        (b'"Trash"', b"\\Trash"),
        (b'"Junk"', b"\\Junk"),
        (b'"Archive"', b"\\Archive"),
    ):
        line = next(x for x in lines if isinstance(x, bytes) and x.endswith(folder))
        assert use in line
    assert f'"{SHARED_ORG}"'.encode() in listing
    typ, data = session.namespace()
    assert data[0] == b'(("" "/")) NIL (("Partag&AOk-s/" "/"))'


def test_select_fetch_and_seen(mssd: MssdProcess, session: imaplib.IMAP4) -> None:
    deliver(mssd, "analyse de sang")
    typ, data = session.select("INBOX")
    assert typ == "OK"
    count = int(data[0])
    assert count == len(inbox(mssd, PER2))
    _, data = session.fetch(str(count), "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: analyse de sang" in data[0][1]  # type: ignore[index]
    assert b"\\Seen" not in data[0][0]  # type: ignore[index]
    _, data = session.fetch(str(count), "(BODY[TEXT])")
    assert data[0][1] == b"Corps du message.\r\n"  # type: ignore[index]
    _, data = session.fetch(str(count), "(FLAGS)")
    assert b"\\Seen" in data[0]  # type: ignore[operator]
    _, data = session.fetch(str(count), "(RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE)")
    assert b'"analyse de sang"' in data[0]  # type: ignore[operator]
    assert b'("text" "plain" ("charset" "us-ascii")' in data[0]  # type: ignore[operator]


def test_whole_message_items_are_the_stored_bytes(
    mssd: MssdProcess, session: imaplib.IMAP4
) -> None:
    """BODY[] (with and without <partial>) and RFC822 are answered from the stored
    bytes without parsing them; alone, together, and beside items that need the
    MIME tree, they must be exactly the message."""
    deliver(mssd, "messages entiers")
    session.select("INBOX")
    uid, stored = inbox(mssd, PER2)[-1]
    _, data = session.uid("FETCH", str(uid), "(BODY.PEEK[])")
    assert data[0][1] == stored  # type: ignore[index]
    _, data = session.uid("FETCH", str(uid), "(BODY.PEEK[]<10.20>)")
    assert data[0][0].endswith(b"BODY[]<10> {20}")  # type: ignore[index]
    assert data[0][1] == stored[10:30]  # type: ignore[index]
    _, data = session.uid("FETCH", str(uid), "(BODY.PEEK[]<0.100000> BODY.PEEK[TEXT] UID)")
    assert data[0][1] == stored  # type: ignore[index]
    assert data[1][1] == stored.split(b"\r\n\r\n", 1)[1]  # type: ignore[index]
    _, data = session.uid("FETCH", str(uid), "(FLAGS)")
    assert b"\\Seen" not in data[0]  # type: ignore[operator]
    _, data = session.uid("FETCH", str(uid), "(RFC822)")
    assert data[0][1] == stored  # type: ignore[index]
    _, data = session.uid("FETCH", str(uid), "(FLAGS)")
    assert b"\\Seen" in data[0]  # type: ignore[operator]


def test_store_search_copy_move_expunge(mssd: MssdProcess, session: imaplib.IMAP4) -> None:
    deliver(mssd, "a deplacer")
    deliver(mssd, "a garder")
    session.select("INBOX")
    typ, data = session.uid("SEARCH", "SUBJECT", "deplacer")
    (uid,) = data[0].split()
    typ, data = session.uid("STORE", uid, "+FLAGS", "(\\Flagged $Urgent)")
    assert b"\\Flagged" in data[0] and b"$Urgent" in data[0]
    typ, data = session.search(None, "FLAGGED", "KEYWORD", "$Urgent")
    assert len(data[0].split()) >= 1
    typ, data = session.uid("COPY", uid, "Archive")
    assert typ == "OK"
    # RFC 4315 §3: COPYUID uidvalidity source-uids destination-uids
    assert re.fullmatch(rb"\d+ " + uid + rb" \d+", session.untagged_responses["COPYUID"][-1])
    typ, data = session.uid("MOVE", uid, "Trash")
    assert typ == "OK"
    typ, data = session.uid("SEARCH", "SUBJECT", "deplacer")
    assert data[0] == b""
    session.select("Trash")
    typ, data = session.search(None, "SUBJECT", "deplacer")
    assert data[0] != b""
    seq = data[0].split()[0]
    session.store(seq.decode(), "+FLAGS", "(\\Deleted)")
    typ, data = session.expunge()
    assert typ == "OK" and data == [seq]  # * <seq> EXPUNGE for exactly that message
    typ, data = session.search(None, "SUBJECT", "deplacer")
    assert data[0] == b""


def test_append_gives_appenduid(session: imaplib.IMAP4) -> None:
    typ, data = session.append("Drafts", "(\\Draft)", None, b"Subject: brouillon\r\n\r\ntexte\r\n")
    assert typ == "OK" and b"APPENDUID" in data[0]
    typ, data = session.status("Drafts", "(MESSAGES UIDNEXT UNSEEN)")
    assert typ == "OK" and b"MESSAGES" in data[0]
    typ, data = session.append("Nowhere", None, None, b"Subject: x\r\n\r\nx\r\n")
    assert typ == "NO"


def test_create_rename_delete(session: imaplib.IMAP4) -> None:
    assert session.create("Patients/Dossiers")[0] == "OK"
    assert session.create("Patients/Dossiers")[0] == "NO"
    assert session.rename("Patients/Dossiers", "Patients/Archives")[0] == "OK"
    _, lines = session.list('""', "Patients/*")
    assert any(isinstance(x, bytes) and x.endswith(b'"Patients/Archives"') for x in lines)
    assert session.delete("Patients/Archives")[0] == "OK"
    assert session.delete("INBOX")[0] == "NO"


def test_delegate_with_read_rights_gets_a_read_only_shared_mailbox(
    mssd: MssdProcess, session: imaplib.IMAP4
) -> None:
    deliver(mssd, "pour l'accueil", to=ORG)
    # The server answers SELECT with [READ-ONLY]; imaplib turns that into an error.
    with pytest.raises(imaplib.IMAP4.readonly):
        session.select(f'"{SHARED_ORG}"')
    session.untagged_responses.pop("READ-ONLY")  # let imaplib send what follows
    typ, data = session.store("1", "+FLAGS", "(\\Seen)")
    assert typ == "NO" and b"read-only" in data[0]


def test_shared_seen_flag_is_seen_by_every_delegate(mssd: MssdProcess) -> None:
    deliver(mssd, "vu par tous", to=ORG)
    writer = imap(mssd, login=PER)  # lrswipte on the ORG mailbox
    reader = imap(mssd, login=PER2)
    try:
        writer.select(f'"{SHARED_ORG}"')
        _, data = writer.search(None, "SUBJECT", '"vu par tous"')
        seq = data[0].split()[-1].decode()
        writer.store(seq, "+FLAGS", "(\\Seen)")
        reader.select(f'"{SHARED_ORG}"', readonly=True)
        _, data = reader.search(None, "SEEN", "SUBJECT", '"vu par tous"')
        assert data[0] != b""
    finally:
        writer.logout()
        reader.logout()


def test_content_fetch_and_selection_are_audited(mssd: MssdProcess, session: imaplib.IMAP4) -> None:
    deliver(mssd, "audit de lecture")
    session.select("INBOX")
    _, data = session.search(None, "SUBJECT", '"audit de lecture"')
    session.fetch(data[0].split()[-1].decode(), "(BODY.PEEK[])")
    events = run(_audit(mssd.url, "imap."))
    actions = {(e.action, e.actor) for e in events}  # type: ignore[attr-defined]
    assert ("imap.select", PER2) in actions and ("imap.fetch", PER2) in actions


def test_malformed_commands_get_bad_and_the_session_survives(mssd: MssdProcess) -> None:
    context = mssd.pki.client_context()
    with socket.create_connection(("127.0.0.1", mssd.imaps), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            reader = tls.makefile("rb")
            assert reader.readline().startswith(b"* OK")
            for line in (
                b"a1 FETCH\r\n",
                b"\r\n",
                b"a2 NOSUCHCOMMAND\r\n",
                b"a3 LOGIN\r\n",
                b"a4 SELECT INBOX\r\n",
                b"a5 " + b"X" * 70000 + b"\r\n",
            ):
                tls.sendall(line)
                reply = reader.readline()
                assert b" BAD " in reply or reply.startswith(b"* BAD"), reply
            tls.sendall(f'a6 LOGIN "{PER2}" "{PASSWORD}"\r\n'.encode())
            assert reader.readline().startswith(b"a6 OK")


def test_idle_hears_a_delivery_within_a_second(mssd: MssdProcess) -> None:
    client = IMAPClient(
        "127.0.0.1", port=mssd.imaps, ssl=True, ssl_context=mssd.pki.client_context()
    )
    try:
        client.login(PER2, PASSWORD)
        client.select_folder("INBOX")
        client.idle()
        started = time.monotonic()
        deliver(mssd, "reveil IDLE")
        responses = client.idle_check(timeout=5)
        elapsed = time.monotonic() - started
        client.idle_done()
    finally:
        client.logout()
    assert any(r[1] == b"EXISTS" for r in responses), responses
    assert elapsed < 5


def test_imapclient_basic_flow(mssd: MssdProcess) -> None:
    deliver(mssd, "via imapclient")
    with IMAPClient(
        "127.0.0.1", port=mssd.imaps, ssl=True, ssl_context=mssd.pki.client_context()
    ) as c:
        c.login(PER2, PASSWORD)
        info = c.select_folder("INBOX")
        assert info[b"EXISTS"] >= 1 and b"UIDVALIDITY" in info
        uids = c.search(["SUBJECT", "via imapclient"])
        fetched = c.fetch(uids, ["ENVELOPE", "RFC822.SIZE", "FLAGS"])
        envelope = fetched[uids[0]][b"ENVELOPE"]
        assert envelope.subject == b"via imapclient"
        c.add_flags(uids, [b"\\Answered"])
        assert b"\\Answered" in c.get_flags(uids)[uids[0]]


def test_qresync_reports_vanished_and_changed_messages(mssd: MssdProcess) -> None:
    """RFC 7162 §3.2: a client that knows (UIDVALIDITY, MODSEQ) learns what was
    expunged (VANISHED) and what changed, on SELECT, on UID FETCH and live."""
    first = imap(mssd)
    other = imap(mssd)
    try:
        assert first._simple_command("ENABLE", "QRESYNC")[0] == "OK"  # type: ignore[attr-defined]
        first.select("INBOX")
        uidvalidity = int(first.untagged_responses["UIDVALIDITY"][-1])
        modseq = int(first.untagged_responses["HIGHESTMODSEQ"][-1])
        for subject in ("qresync un", "qresync deux", "qresync trois"):
            deliver(mssd, subject)
        first.noop()  # the first session now knows the three messages
        other.select("INBOX")
        _, data = other.uid("SEARCH", "SUBJECT", "qresync")
        one, two, _three = data[0].split()
        other.uid("STORE", one, "+FLAGS", "(\\Deleted)")
        other.uid("STORE", two, "+FLAGS", "(\\Flagged)")
        other.expunge()
        # Live: with QRESYNC enabled, NOOP announces VANISHED, not EXPUNGE.
        first.noop()
        assert "EXPUNGE" not in first.untagged_responses
        assert first.untagged_responses["VANISHED"][-1] == one
        # A new session resynchronises from the old (UIDVALIDITY, MODSEQ).
        fresh = imap(mssd)
        try:
            fresh._simple_command("ENABLE", "QRESYNC")  # type: ignore[attr-defined]
            typ, _ = fresh._simple_command(  # type: ignore[attr-defined]
                "SELECT", "INBOX", f"(QRESYNC ({uidvalidity} {modseq}))"
            )
            assert typ == "OK"
            fresh.state = "SELECTED"  # imaplib tracks state only through select()
            assert fresh.untagged_responses["VANISHED"][-1] == b"(EARLIER) " + one
            changed = b" ".join(
                x for x in fresh.untagged_responses["FETCH"] if isinstance(x, bytes)
            )
            assert b"UID " + two in changed and b"\\Flagged" in changed and b"MODSEQ" in changed
            fresh.untagged_responses.clear()
            typ, _ = fresh._simple_command(  # type: ignore[attr-defined]
                "UID", "FETCH", "1:*", "(FLAGS)", f"(CHANGEDSINCE {modseq} VANISHED)"
            )
            assert typ == "OK"
            assert fresh.untagged_responses["VANISHED"][-1] == b"(EARLIER) " + one
        finally:
            fresh.logout()
    finally:
        first.logout()
        other.logout()


def test_own_writes_never_hide_another_sessions_changes(mssd: MssdProcess) -> None:
    """A session applies its own STORE, EXPUNGE and APPEND to its view without
    reading the store only when nobody else wrote meanwhile: another session's
    change in between still reaches it, once (RFC 9051 §7)."""
    for n in range(3):
        deliver(mssd, f"entrelace {n}")
    a, b = imap(mssd), imap(mssd)
    try:
        a.select("INBOX")
        b.select("INBOX")
        _, data = a.uid("SEARCH", None, "SUBJECT", '"entrelace"')
        first, second, third = data[0].split()[-3:]
        # Alone: the answer names only the message stored, and nothing is left to tell.
        _, answer = a.uid("STORE", first, "+FLAGS", "(\\Seen)")
        assert len(answer) == 1 and b"UID " + first in answer[0]
        a.untagged_responses.clear()
        a.noop()
        assert "FETCH" not in a.untagged_responses
        # b flags a message, then a stores another: a hears both.
        b.uid("STORE", second, "+FLAGS", "(\\Flagged)")
        _, answer = a.uid("STORE", third, "+FLAGS", "(\\Seen)")
        told = b" ".join(item for item in answer if isinstance(item, bytes))
        assert b"UID " + second in told and b"\\Flagged" in told
        assert b"UID " + third in told
        # b appends while a expunges: a's EXPUNGE also announces b's message.
        _, data = a.select("INBOX")
        count = int(data[0])
        a.uid("STORE", third, "+FLAGS.SILENT", "(\\Deleted)")
        b.append("INBOX", None, None, message("ajout de b"))
        a.untagged_responses.clear()
        a.uid("EXPUNGE", third)
        # The last message (sequence number = count) goes, b's comes after it.
        assert a.untagged_responses.get("EXPUNGE") == [str(count).encode()]
        assert a.untagged_responses.get("EXISTS") == [str(count).encode()]
    finally:
        a.logout()
        b.logout()
