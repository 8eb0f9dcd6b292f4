"""Mailbox quotas as clients meet them, on SQLite and PostgreSQL: IMAP APPEND, COPY and
MOVE refused with [OVERQUOTA] (RFC 9208), SMTP recipients refused with 552 5.2.2
(RFC 3463) at RCPT or reported to the sender when the mailbox fills up before DATA."""

from __future__ import annotations

import imaplib
import smtplib
import threading
import uuid

from conftest import DOMAIN, PASSWORD, PER, PER2, STRUCTURE, MssdProcess, inbox, run
from test_imap_extensions import _new_account, imap

from mssd.store import admin
from mssd.store.engine import create_engine

KIB = 1024


def sized(size: int, subject: str) -> bytes:
    """A message of exactly ``size`` octets."""
    head = f"From: <{PER}>\r\nSubject: {subject}\r\n\r\n".encode()
    return head + b"x" * (size - len(head))


def fresh(mssd: MssdProcess, quota: int | None, name: str = "quota") -> str:
    address = f"{name}-{uuid.uuid4().hex[:8]}@{DOMAIN}"
    run(_new_account(mssd.url, address, quota))
    return address


def fill(mssd: MssdProcess, address: str, *sizes: int) -> None:
    client = imap(mssd, address)
    try:
        for n, size in enumerate(sizes):
            assert client.append("INBOX", None, None, sized(size, f"remplissage {n}"))[0] == "OK"
    finally:
        client.logout()


def getquota(client: imaplib.IMAP4, root: str) -> bytes:
    typ, data = client.getquota(f'"{root}"')
    assert typ == "OK", data
    return data[0]  # type: ignore[return-value]


def uids(client: imaplib.IMAP4, mailbox: str) -> list[int]:
    typ, _ = client.select(mailbox)
    assert typ == "OK"
    typ, data = client.uid("SEARCH", "ALL")
    assert typ == "OK"
    return [int(n) for n in (data[0] or b"").split()]


def tagged(client: imaplib.IMAP4, command: bytes) -> bytes:
    """Send a raw command (literals already in it) and return its tagged response."""
    tag = client._new_tag()  # type: ignore[attr-defined]
    client.send(tag + b" " + command + b"\r\n")
    while True:
        line = client.readline()
        if line.startswith(tag + b" "):
            return line[len(tag) + 1 :].rstrip(b"\r\n")


# -- IMAP ------------------------------------------------------------------------------


def test_append_over_quota_gets_overquota_and_stores_nothing(mssd: MssdProcess) -> None:
    address = fresh(mssd, 10 * KIB)
    client = imap(mssd, address)
    try:
        assert client.append("INBOX", None, None, sized(6 * KIB, "premier"))[0] == "OK"
        typ, data = client.append("INBOX", None, None, sized(5 * KIB, "de trop"))
        assert (typ, data) == (
            "NO",
            [
                f"[OVERQUOTA] {address}: mailbox full (6 KiB used of its 10 KiB quota, "
                "5 KiB more do not fit)".encode()
            ],
        )
        assert uids(client, "INBOX") == [1]
        assert getquota(client, address) == f'"{address}" (STORAGE 6 10)'.encode()
    finally:
        client.logout()


def test_multiappend_whose_second_message_overflows_stores_none(mssd: MssdProcess) -> None:
    address = fresh(mssd, 10 * KIB)
    client = imap(mssd, address)
    try:
        first, second = sized(4 * KIB, "lot 1"), sized(7 * KIB, "lot 2")
        reply = tagged(
            client,
            b"APPEND INBOX (\\Seen) {%d+}\r\n%s {%d+}\r\n%s"
            % (len(first), first, len(second), second),
        )
        assert reply == (
            f"NO [OVERQUOTA] {address}: mailbox full (0 KiB used of its 10 KiB quota, "
            "11 KiB more do not fit)".encode()
        )
        assert uids(client, "INBOX") == []
        assert getquota(client, address) == f'"{address}" (STORAGE 0 10)'.encode()
        # Both fit once the second is smaller: they get the next UIDs.
        second = sized(6 * KIB, "lot 2")
        reply = tagged(
            client,
            b"APPEND INBOX {%d+}\r\n%s {%d+}\r\n%s" % (len(first), first, len(second), second),
        )
        assert reply.startswith(b"OK [APPENDUID ") and reply.endswith(b" 1:2] APPEND completed")
    finally:
        client.logout()


def test_copy_and_move_over_quota_are_refused_with_the_source_untouched(
    mssd: MssdProcess,
) -> None:
    owner = fresh(mssd, None, "equipe")
    team = f"secretariat-{uuid.uuid4().hex[:8]}@{DOMAIN}"

    async def shared_team() -> None:
        engine = create_engine(mssd.url)
        try:
            await admin.create_mailbox(
                engine,
                address=team,
                bal_type="ORG",
                owner_idnat=STRUCTURE,
                quota_bytes=10 * KIB,
                actor="test",
            )
            await admin.grant(engine, team, owner, rights="lrswipte", may_send=False, actor="test")
        finally:
            await engine.dispose()

    run(shared_team())
    shared = f'"Partag&AOk-s/{team}/INBOX"'
    fill(mssd, owner, 4 * KIB, 4 * KIB, 4 * KIB)
    client = imap(mssd, owner)
    try:
        client.select("INBOX")
        client.store("1", "+FLAGS", "(\\Flagged)")
        for command in ("COPY", "MOVE"):
            typ, data = client.uid(command, "1:3", shared)
            assert (typ, data) == (
                "NO",
                [
                    f"[OVERQUOTA] {team}: mailbox full (0 KiB used of its 10 KiB quota, "
                    "12 KiB more do not fit)".encode()
                ],
            )
            typ, data = client.uid("FETCH", "1:*", "(FLAGS)")
            assert typ == "OK" and len(data) == 3 and b"\\Flagged" in data[0]  # type: ignore[operator]
            assert uids(client, shared) == []
            client.select("INBOX")
        typ, data = client.uid("MOVE", "1:2", shared)
        assert typ == "OK"
        assert uids(client, "INBOX") == [3]
        assert uids(client, shared) == [1, 2]
        assert getquota(client, team) == f'"{team}" (STORAGE 8 10)'.encode()
    finally:
        client.logout()


def test_expunge_frees_space_and_getquota_follows(mssd: MssdProcess) -> None:
    address = fresh(mssd, 10 * KIB)
    client = imap(mssd, address)
    try:
        client.append("INBOX", None, None, sized(6 * KIB, "ancien"))
        client.append("INBOX", None, None, sized(4 * KIB, "récent"))
        assert getquota(client, address) == f'"{address}" (STORAGE 10 10)'.encode()
        typ, data = client.append("INBOX", None, None, sized(100, "encore"))
        assert (typ, data) == (
            "NO",
            [f"[OVERQUOTA] {address}: mailbox full (10 KiB used of its 10 KiB quota)".encode()],
        )
        client.select("INBOX")
        client.store("1", "+FLAGS", "(\\Deleted)")
        client.expunge()
        assert getquota(client, address) == f'"{address}" (STORAGE 4 10)'.encode()
        typ, data = client.append("INBOX", None, None, sized(6 * KIB, "encore"))
        assert typ == "OK", data
        assert getquota(client, address) == f'"{address}" (STORAGE 10 10)'.encode()
        assert uids(client, "INBOX") == [2, 3]
    finally:
        client.logout()


def test_two_concurrent_appends_that_together_exceed_the_quota_one_succeeds(
    mssd: MssdProcess,
) -> None:
    address = fresh(mssd, 10 * KIB)
    clients = [imap(mssd, address), imap(mssd, address)]
    start = threading.Barrier(2)
    outcomes: list[tuple[str, bytes]] = []

    def append(client: imaplib.IMAP4, folder: str) -> None:
        start.wait()
        typ, data = client.append(folder, None, None, sized(6 * KIB, folder))
        outcomes.append((typ, data[0]))  # type: ignore[arg-type]

    try:
        threads = [
            threading.Thread(target=append, args=(client, folder))
            for client, folder in zip(clients, ("INBOX", "Archive"), strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(typ for typ, _ in outcomes) == ["NO", "OK"]
        refusal = next(text for typ, text in outcomes if typ == "NO")
        assert refusal == (
            f"[OVERQUOTA] {address}: mailbox full (6 KiB used of its 10 KiB quota, "
            "6 KiB more do not fit)".encode()
        )
        assert len(uids(clients[0], "INBOX") + uids(clients[0], "Archive")) == 1
        assert getquota(clients[0], address) == f'"{address}" (STORAGE 6 10)'.encode()
    finally:
        for client in clients:
            client.logout()


# -- SMTP ------------------------------------------------------------------------------


def test_rcpt_to_a_full_mailbox_is_refused_while_the_other_recipient_gets_it(
    mssd: MssdProcess,
) -> None:
    full = fresh(mssd, 10 * KIB)
    fill(mssd, full, 10 * KIB)
    with mssd.smtp() as client:
        assert client.mail(PER)[0] == 250
        assert client.rcpt(full) == (
            552,
            f"5.2.2 <{full}>: mailbox full (10 KiB used of its 10 KiB quota)".encode(),
        )
        assert client.rcpt(PER2)[0] == 250
        code, _ = client.data(sized(2 * KIB, f"pour {full}"))
        assert code == 250
    assert f"Subject: pour {full}".encode() in inbox(mssd, PER2)[-1][1]
    assert [b"remplissage 0" in content for _, content in inbox(mssd, full)] == [True]


def test_declared_size_that_does_not_fit_is_refused_at_rcpt(mssd: MssdProcess) -> None:
    address = fresh(mssd, 10 * KIB)
    fill(mssd, address, 2 * KIB)
    with mssd.smtp() as client:
        client.ehlo()
        assert client.mail(PER, ["SIZE=20000"])[0] == 250
        assert client.rcpt(address) == (
            552,
            f"5.2.2 <{address}>: mailbox full (2 KiB used of its 10 KiB quota, "
            "20 KiB more do not fit)".encode(),
        )
        client.rset()
        assert client.mail(PER, ["SIZE=8000"])[0] == 250
        assert client.rcpt(address)[0] == 250


def send_without_size(
    client: smtplib.SMTP, sender: str, to: list[str], content: bytes, notify: str = "FAILURE"
) -> None:
    """MAIL without SIZE (smtplib's sendmail declares it): every recipient passes RCPT."""
    assert client.mail(sender)[0] == 250
    for address in to:
        assert client.rcpt(address, [f"NOTIFY={notify}"])[0] == 250
    code, reply = client.data(content)
    assert code == 250, reply


def test_mailbox_that_fills_before_data_is_reported_to_the_sender(mssd: MssdProcess) -> None:
    small = fresh(mssd, 10 * KIB)
    fill(mssd, small, 2 * KIB)
    subject = f"trop gros pour {small}"
    with mssd.smtp() as client:
        # Both recipients pass RCPT; the store finds there is no room for one. (With
        # the trace fields added, the message weighs 12 KiB.)
        content = sized(11 * KIB, subject)
        send_without_size(client, PER, [small, PER2], content, notify="SUCCESS,FAILURE")
    assert f"Subject: {subject}".encode() in inbox(mssd, PER2)[-1][1]
    assert len(inbox(mssd, small)) == 1
    reports = [c for _, c in inbox(mssd, PER) if f"Subject: {subject}".encode() in c]
    assert_reports_on_a_full_mailbox(reports, small)


def assert_reports_on_a_full_mailbox(reports: list[bytes], small: str) -> None:
    """Two reports, one per action, in this order: the failure for ``small`` (full
    since RCPT, the message weighing 12 KiB), the success asked for PER2."""
    assert len(reports) == 2
    report, success = reports
    assert b"Content-Type: multipart/report" in report
    assert f"\r\nFinal-Recipient: rfc822; {PER2}\r\nAction: delivered\r\n".encode() in success
    assert f"Final-Recipient: rfc822; {small}".encode() not in success
    for field in (
        f"Final-Recipient: rfc822; {small}",
        "Action: failed",
        "Status: 5.2.2",
        f"Diagnostic-Code: smtp; 552 5.2.2 <{small}>: mailbox full (2 KiB used of its 10 KiB "
        "quota, 12 KiB more do not fit)",
    ):
        assert f"\r\n{field}\r\n".encode() in report, field
    assert f"Final-Recipient: rfc822; {PER2}".encode() not in report


def test_message_nobody_has_room_for_is_refused_at_data_and_not_stored(
    mssd: MssdProcess,
) -> None:
    small = fresh(mssd, 10 * KIB)
    fill(mssd, small, 2 * KIB)
    reports_before = len(inbox(mssd, PER))
    with mssd.smtp() as client:
        assert client.mail(PER)[0] == 250
        assert client.rcpt(small)[0] == 250
        assert client.data(sized(11 * KIB, "pour personne")) == (
            552,
            f"5.2.2 <{small}>: mailbox full (2 KiB used of its 10 KiB quota, "
            "12 KiB more do not fit)".encode(),
        )
    assert len(inbox(mssd, small)) == 1
    assert len(inbox(mssd, PER)) == reports_before


def test_report_to_a_full_sender_is_delivered_anyway(mssd: MssdProcess) -> None:
    sender = fresh(mssd, 10 * KIB, "expediteur")
    fill(mssd, sender, 10 * KIB)
    small = fresh(mssd, 10 * KIB)
    fill(mssd, small, 8 * KIB)
    subject = f"de {sender}"
    with mssd.smtp(login=sender, password=PASSWORD) as client:
        send_without_size(client, sender, [small, PER2], sized(4 * KIB, subject))
    messages = inbox(mssd, sender)
    assert len(messages) == 2 and b"\r\nStatus: 5.2.2\r\n" in messages[-1][1]
    client = imap(mssd, sender)
    try:
        used = (10 * KIB + len(messages[-1][1]) + KIB - 1) // KIB
        assert getquota(client, sender) == f'"{sender}" (STORAGE {used} 10)'.encode()
        # Over its quota: nothing more comes in until the sender makes room.
        typ, _ = client.append("INBOX", None, None, sized(100, "encore"))
        assert typ == "NO"
    finally:
        client.logout()
