"""SORT and THREAD (RFC 5256, RFC 5957), ACL (RFC 4314) and QUOTA (RFC 9208)
against imaplib over TLS, on SQLite and PostgreSQL; threads are built from
mail delivered over real SMTP."""

from __future__ import annotations

import datetime as dt
import imaplib
import secrets
import uuid

import pytest
from conftest import DOMAIN, ORG, PASSWORD, PER, PER2, TEST_AUTH, MssdProcess, run
from test_smtp_submission import _audit

from mssd.auth.passwords import hash_password
from mssd.imap.sort import Headers, base_subject, decode_text, format_threads, thread_references
from mssd.store import admin
from mssd.store.engine import create_engine

SHARED_ORG = f'"Partag&AOk-s/{ORG}/INBOX"'
imaplib.Commands.setdefault("LISTRIGHTS", ("AUTH", "SELECTED"))


def imap(mssd: MssdProcess, login: str = PER2) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", mssd.imap, timeout=30)
    client.starttls(ssl_context=mssd.pki.client_context())
    client.login(login, PASSWORD)
    return client


def untagged(client: imaplib.IMAP4, name: str) -> list[bytes]:
    return [x for x in client.untagged_responses.pop(name, []) if isinstance(x, bytes)]


def command(client: imaplib.IMAP4, name: str, *args: str) -> tuple[str, list[bytes]]:
    typ, data = client._simple_command(name, *args)  # type: ignore[attr-defined]
    return str(typ), [x for x in data if isinstance(x, bytes)]


async def _new_account(url: str, address: str, quota: int | None) -> None:
    engine = create_engine(url)
    try:
        idnat = "81" + "".join(secrets.choice("0123456789") for _ in range(10))
        await admin.create_mailbox(
            engine,
            address=address,
            bal_type="PER",
            owner_idnat=idnat,
            idnat_ps=idnat,
            password_hash=hash_password(PASSWORD, TEST_AUTH),
            quota_bytes=quota,
            actor="test",
        )
    finally:
        await engine.dispose()


async def _set_password(url: str, login: str) -> None:
    engine = create_engine(url)
    try:
        await admin.set_password(engine, login, hash_password(PASSWORD, TEST_AUTH), actor="test")
    finally:
        await engine.dispose()


def org_owner(mssd: MssdProcess) -> imaplib.IMAP4:
    """The ORG mailbox's own functional account, which holds every right."""
    run(_set_password(mssd.url, ORG))
    return imap(mssd, login=ORG)


# -- SORT ----------------------------------------------------------------------------

_SORTABLE = [
    # from, to, cc, subject, Date header, internal date, body padding
    ("Zoé <zoe@x.test>", "bob@x.test", "carl@x.test", "Re: banane", "03 Jan 2024", "10", 0),
    ("Yves <alice@x.test>", "yann@x.test", "anne@x.test", "abricot", "01 Jan 2024", "12", 20000),
    ("marc@x.test", "max@x.test", None, "[liste] Fwd: cerise", None, "11", 40000),
    ("bernard@x.test", "zed@x.test", "bea@x.test", "abricot", "05 Jan 2024", "09", 10000),
]


def sortable_folder(client: imaplib.IMAP4) -> str:
    """A new folder holding _SORTABLE as sequence numbers 1-4 and UIDs 2-5."""
    folder = f"Tri-{uuid.uuid4().hex[:8]}"
    assert client.create(folder)[0] == "OK"
    client.append(folder, "(\\Deleted)", None, b"Subject: jetable\r\n\r\nx\r\n")
    for sender, to, cc, subject, date, day, pad in _SORTABLE:
        header = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        if cc:
            header += f"Cc: {cc}\r\n"
        if date:
            header += f"Date: Mon, {date} 10:00:00 +0100\r\n"
        content = header.encode() + b"\r\n" + b"x" * pad + b"\r\n"
        typ, _ = client.append(folder, None, f'"{day}-Jan-2024 10:00:00 +0000"', content)
        assert typ == "OK"
    client.select(folder)
    client.expunge()
    return folder


def sort(client: imaplib.IMAP4, criteria: str, *search: str) -> list[int]:
    typ, data = client.sort(criteria, "UTF-8", *(search or ("ALL",)))
    assert typ == "OK", data
    return [int(n) for n in (data[0] or b"").split()]


def test_sort_orders_by_each_criterion_and_reverse(mssd: MssdProcess) -> None:
    client = imap(mssd)
    try:
        sortable_folder(client)
        assert sort(client, "(ARRIVAL)") == [4, 1, 3, 2]
        # Message 3 has no Date header: its internal date stands in (RFC 5256 §3).
        assert sort(client, "(DATE)") == [2, 1, 4, 3]
        assert sort(client, "(FROM)") == [2, 4, 3, 1]
        assert sort(client, "(DISPLAYFROM)") == [4, 3, 2, 1]
        assert sort(client, "(TO)") == [1, 3, 2, 4]
        assert sort(client, "(CC)") == [3, 2, 4, 1]
        assert sort(client, "(SIZE)") == [1, 4, 2, 3]
        assert sort(client, "(REVERSE SIZE)") == [3, 2, 4, 1]
        # Base subjects: "Re: banane" -> banane, "[liste] Fwd: cerise" -> cerise.
        assert sort(client, "(SUBJECT)") == [2, 4, 1, 3]
        assert sort(client, "(SUBJECT ARRIVAL)") == [4, 2, 1, 3]
        assert sort(client, "(REVERSE SUBJECT)") == [3, 1, 2, 4]
        assert sort(client, "(SUBJECT)", "FROM", "alice") == [2]
    finally:
        client.logout()


def test_uid_sort_answers_uids_and_bad_charset_is_refused(mssd: MssdProcess) -> None:
    client = imap(mssd)
    try:
        sortable_folder(client)
        typ, data = client.uid("SORT", "(SUBJECT)", "UTF-8", "ALL")
        assert typ == "OK"
        assert [int(n) for n in data[0].split()] == [3, 5, 2, 4]
        typ, data = client.sort("(SUBJECT)", "KOI8-R", "ALL")
        assert typ == "NO" and b"BADCHARSET" in data[0]
        with pytest.raises(imaplib.IMAP4.error, match="BAD"):
            client.sort("(NOSUCHKEY)", "UTF-8", "ALL")
    finally:
        client.logout()


@pytest.mark.parametrize(
    ("subject", "base", "reply"),
    [
        ("Re: hello", "hello", True),
        ("RE: [list] Re: Fwd: hello (fwd)", "hello", True),
        ("[fwd: Re: test]", "test", True),
        ("[a] [b] Re[2]: x", "x", True),
        ("[blob]", "[blob]", False),
        ("Fw:   spaced\t out  ", "spaced out", True),
        ("=?utf-8?q?R=C3=A9sultats?=", "Résultats", False),
    ],
)
def test_base_subject_strips_reply_and_forward_markers(
    subject: str, base: str, reply: bool
) -> None:
    assert base_subject(decode_text(subject.encode())) == (base, reply)


def test_references_puts_same_subject_roots_under_a_dummy() -> None:
    def message(seq: int, subject: str) -> Headers:
        moment = dt.datetime(2024, 1, seq, tzinfo=dt.UTC)
        return Headers(seq, seq, 1, moment, {"subject": subject, "message-id": f"<{seq}@x>"})

    roots = thread_references([message(1, "bilan"), message(2, "bilan"), message(3, "autre")])
    assert format_threads(roots, uid=False) == "* THREAD ((1)(2))(3)"


# -- THREAD --------------------------------------------------------------------------


def deliver_chain(mssd: MssdProcess, token: str) -> dict[str, str]:
    """A consultation thread delivered by SMTP to PER2; returns name -> Message-ID."""
    ids = {name: f"<{name}.{token}@{DOMAIN}>" for name in "abcdef"}
    plan = [
        ("a", f"{token} consultation", None),
        ("b", f"Re: {token} consultation", [ids["a"]]),
        ("c", f"Re: Re: {token} consultation", [ids["a"], ids["b"]]),
        ("d", f"RE: {token} consultation", [ids["a"]]),
        ("e", f"{token} autre sujet", None),
        # Its parent never arrived: it joins the thread by its subject.
        ("f", f"Re: {token} consultation", [f"<perdu.{token}@{DOMAIN}>"]),
    ]
    with mssd.smtp() as smtp:
        for day, (name, subject, references) in enumerate(plan, start=1):
            header = (
                f"From: <{PER}>\r\nTo: <{PER2}>\r\nSubject: {subject}\r\n"
                f"Message-ID: {ids[name]}\r\nDate: Tue, {day:02d} Apr 2024 09:00:00 +0200\r\n"
            )
            if references:
                header += f"In-Reply-To: {references[-1]}\r\n"
                header += f"References: {' '.join(references)}\r\n"
            smtp.sendmail(PER, [PER2], header.encode() + b"\r\nBonjour.\r\n")
    return ids


def thread_numbers(client: imaplib.IMAP4, token: str) -> dict[str, tuple[int, int]]:
    """name -> (sequence number, UID), from the Message-ID of each message."""
    _, data = client.search(None, "SUBJECT", token)
    seqs = data[0].decode()
    _, data = client.fetch(seqs.replace(" ", ","), "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    found: dict[str, tuple[int, int]] = {}
    for item in data:
        if isinstance(item, tuple):
            meta, header = item
            seq = int(meta.split()[0])
            uid = int(meta.split(b"UID ")[1].split()[0])
            name = header.decode().split("<")[1][0]
            found[name] = (seq, uid)
    return found


def test_thread_references_nests_a_reply_chain_delivered_by_smtp(mssd: MssdProcess) -> None:
    token = f"fil{uuid.uuid4().hex[:8]}"
    deliver_chain(mssd, token)
    client = imap(mssd)
    try:
        client.select("INBOX")
        n = {name: seq for name, (seq, _) in thread_numbers(client, token).items()}
        typ, data = client.thread("REFERENCES", "UTF-8", "SUBJECT", token)
        assert typ == "OK"
        expected = f"({n['a']} ({n['b']} {n['c']})({n['d']})({n['f']}))({n['e']})"
        assert data[0].decode() == expected
        u = {name: uid for name, (_, uid) in thread_numbers(client, token).items()}
        typ, data = client.uid("THREAD", "REFERENCES", "UTF-8", "SUBJECT", token)
        assert data[0].decode() == f"({u['a']} ({u['b']} {u['c']})({u['d']})({u['f']}))({u['e']})"
    finally:
        client.logout()


def test_thread_orderedsubject_groups_by_base_subject(mssd: MssdProcess) -> None:
    token = f"sujet{uuid.uuid4().hex[:8]}"
    deliver_chain(mssd, token)
    client = imap(mssd)
    try:
        client.select("INBOX")
        n = {name: seq for name, (seq, _) in thread_numbers(client, token).items()}
        typ, data = client.thread("ORDEREDSUBJECT", "UTF-8", "SUBJECT", token)
        assert typ == "OK"
        children = "".join(f"({n[x]})" for x in "bcdf")
        assert data[0].decode() == f"({n['a']} {children})({n['e']})"
    finally:
        client.logout()


# -- ACL -----------------------------------------------------------------------------


def test_capabilities_advertise_the_extensions(mssd: MssdProcess) -> None:
    client = imap(mssd)
    try:
        _, data = client.capability()
        caps = data[0].split()
        for cap in (b"SORT", b"THREAD=REFERENCES", b"THREAD=ORDEREDSUBJECT", b"ACL"):
            assert cap in caps
        for cap in (b"RIGHTS=texk", b"QUOTA", b"QUOTA=RES-STORAGE"):
            assert cap in caps
    finally:
        client.logout()


def test_myrights_for_owner_and_delegates(mssd: MssdProcess) -> None:
    reader, writer = imap(mssd, PER2), imap(mssd, PER)
    try:
        typ, data = reader.myrights("INBOX")
        assert typ == "OK" and data[0] == b'"INBOX" lrswipkxteacd'
        typ, data = reader.myrights(SHARED_ORG)
        assert data[0] == SHARED_ORG.encode() + b" lr"
        typ, data = writer.myrights(SHARED_ORG)
        assert data[0] == SHARED_ORG.encode() + b" lrswipted"
        typ, data = reader.myrights('"Partag&AOk-s/nobody@x.test/INBOX"')
        assert typ == "NO"
    finally:
        reader.logout()
        writer.logout()


def test_getacl_needs_the_a_right_and_the_owner_has_it(mssd: MssdProcess) -> None:
    delegate, owner = imap(mssd, PER), org_owner(mssd)
    try:
        typ, data = delegate.getacl(SHARED_ORG)
        assert typ == "NO" and b"NOPERM" in data[0]
        typ, data = command(delegate, "LISTRIGHTS", SHARED_ORG, PER2)
        assert typ == "NO"
        typ, data = owner.getacl("INBOX")
        assert typ == "OK"
        assert data[0].startswith(f'"INBOX" "{ORG}" lrswipkxteacd'.encode())
        assert f'"{PER}" lrswipted'.encode() in data[0]
        assert f'"{PER2}" lr'.encode() in data[0]
        typ, _ = command(owner, "LISTRIGHTS", "INBOX", PER2)
        assert typ == "OK"
        assert untagged(owner, "LISTRIGHTS") == [
            f'"INBOX" "{PER2}" "" l r s w i p k x t e a c d'.encode()
        ]
    finally:
        delegate.logout()
        owner.logout()


def test_setacl_by_an_account_with_a_lets_the_delegate_store_seen(mssd: MssdProcess) -> None:
    delegate, owner, other = imap(mssd, PER2), org_owner(mssd), imap(mssd, PER)
    try:
        with mssd.smtp() as smtp:
            smtp.sendmail(PER, [ORG], f"From: <{PER}>\r\nSubject: acl\r\n\r\nx\r\n".encode())
        # A delegate without "a" cannot change the ACL.
        typ, data = other.setacl(SHARED_ORG, PER2, "lrs")
        assert typ == "NO" and b"NOPERM" in data[0]
        typ, data = owner.setacl("INBOX", PER2, "+s")
        assert typ == "OK", data
        typ, data = delegate.myrights(SHARED_ORG)
        assert data[0].endswith(b" lrs")
        typ, _ = delegate.select(SHARED_ORG)
        assert typ == "OK"
        typ, data = delegate.store("1", "+FLAGS", "(\\Seen)")
        assert typ == "OK" and b"\\Seen" in data[0]
        delegate.close()
        # Unknown rights are BAD (RFC 4314 §3.1); the owner's own rights never change.
        with pytest.raises(imaplib.IMAP4.error, match="BAD"):
            owner.setacl("INBOX", PER2, "lrz")
        assert owner.setacl("INBOX", ORG, "lr")[0] == "NO"
        assert owner.deleteacl("INBOX", PER2)[0] == "OK"
        assert delegate.myrights(SHARED_ORG)[0] == "NO"
        assert owner.setacl("INBOX", PER2, "lr")[0] == "OK"
        events = run(_audit(mssd.url, "acl."))
        actions = [(e.action, e.actor, e.details["account"]) for e in events]  # type: ignore[attr-defined]
        assert ("acl.set", ORG, PER2) in actions and ("acl.delete", ORG, PER2) in actions
    finally:
        delegate.logout()
        owner.logout()
        other.logout()


# -- QUOTA ---------------------------------------------------------------------------


def test_quotaroot_and_quota_follow_appended_messages(mssd: MssdProcess) -> None:
    address = f"quota-{uuid.uuid4().hex[:8]}@{DOMAIN}"
    run(_new_account(mssd.url, address, 10 * 1024 * 1024))
    client, unlimited = imap(mssd, address), imap(mssd, PER2)
    try:
        typ, data = client.getquotaroot("INBOX")
        assert typ == "OK"
        assert data[0] == [f'"INBOX" "{address}"'.encode()]
        assert data[1] == [f'"{address}" (STORAGE 0 10240)'.encode()]
        content = b"Subject: volumineux\r\n\r\n" + b"y" * 3000 + b"\r\n"
        client.append("INBOX", None, None, content)
        client.append("Archive", None, None, content)
        typ, data = client.getquota(f'"{address}"')
        assert typ == "OK"
        used = (2 * len(content) + 1023) // 1024
        assert data[0] == f'"{address}" (STORAGE {used} 10240)'.encode()
        # No limit: the root exists but lists no resource.
        typ, data = unlimited.getquotaroot("INBOX")
        assert data[1] == [f'"{PER2}" ()'.encode()]
        typ, data = unlimited.getquota(f'"{address}"')
        assert typ == "NO"
    finally:
        client.logout()
        unlimited.logout()
