"""mssd's IMAP server against the clients people run: mbsync syncing both ways
with a Maildir, a replay of Thunderbird's startup over raw TLS, aioimaplib in
IDLE, two mssd processes on one PostgreSQL, and sequence numbers under
concurrent expunges. Real sockets, both backends, mail delivered over SMTP."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aioimaplib
import pytest
from conftest import (
    DOMAIN,
    PASSWORD,
    PER,
    PER2,
    TEST_AUTH,
    MssdProcess,
    PkiBundle,
    create_postgres_database,
    drop_postgres_database,
    require_program,
    run,
    seed,
    start_mssd,
)
from imapclient import IMAPClient
from test_smtp_submission import message

from mssd.auth.passwords import hash_password
from mssd.store import admin
from mssd.store.engine import create_engine

IDLE_BOUND = 5.0
"""Seconds a change may take to reach an IDLE client; DESIGN.md promises one."""


def deliver(server: MssdProcess, subject: str, to: str = PER2) -> None:
    with server.smtp() as client:
        client.sendmail(PER, [to], message(subject))


def imap(server: MssdProcess, login: str = PER2) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL(
        "127.0.0.1", server.imaps, ssl_context=server.pki.client_context(), timeout=30
    )
    client.login(login, PASSWORD)
    return client


def new_account(server: MssdProcess, name: str) -> str:
    """A fresh PER mailbox, so that a test owns every folder it sees."""
    address = f"{name}-{secrets.token_hex(4)}@{DOMAIN}"

    async def create() -> None:
        engine = create_engine(server.url)
        try:
            await admin.create_mailbox(
                engine,
                address=address,
                bal_type="PER",
                owner_idnat=f"8{secrets.randbelow(10**11):011d}",
                idnat_ps=None,
                password_hash=hash_password(PASSWORD, TEST_AUTH),
                actor="test",
            )
        finally:
            await engine.dispose()

    run(create())
    return address


class RawImap:
    """A line-level IMAP client over TLS: what Thunderbird sends, byte for byte,
    and every response line (literals inlined) to assert on."""

    def __init__(self, server: MssdProcess) -> None:
        context = server.pki.client_context()
        raw = socket.create_connection(("127.0.0.1", server.imaps), timeout=30)
        self.tls = context.wrap_socket(raw, server_hostname="localhost")
        self.reader = self.tls.makefile("rb")
        self.count = 0
        self.greeting = self.response()

    def close(self) -> None:
        self.reader.close()
        self.tls.close()

    def response(self) -> bytes:
        """One response, with its literals inlined."""
        line = self.reader.readline()
        assert line.endswith(b"\r\n"), line
        out = line
        while (match := re.search(rb"\{(\d+)\}\r\n$", line)) is not None:
            out += self.reader.read(int(match.group(1)))
            line = self.reader.readline()
            out += line
        return out

    def send(self, text: str) -> str:
        self.count += 1
        tag = f"tb{self.count}"
        self.tls.sendall(f"{tag} {text}\r\n".encode())
        return tag

    def until(self, tag: str) -> tuple[list[bytes], bytes]:
        untagged: list[bytes] = []
        while True:
            line = self.response()
            if line.startswith(tag.encode() + b" "):
                return untagged, line
            assert line.startswith(b"* "), line
            untagged.append(line)

    def command(self, text: str, status: str = "OK") -> list[bytes]:
        tag = self.send(text)
        untagged, done = self.until(tag)
        assert done.startswith(f"{tag} {status} ".encode()), (text, done)
        return untagged


def code(lines: list[bytes], name: str) -> int:
    """The number in a response code such as ``* OK [HIGHESTMODSEQ 12]``."""
    for line in lines:
        match = re.match(rb"\* OK \[" + name.encode() + rb" (\d+)\]", line)
        if match:
            return int(match.group(1))
    raise AssertionError(f"no [{name}] in {lines!r}")


def exists(lines: list[bytes]) -> int:
    return next(int(m.group(1)) for x in lines if (m := re.match(rb"\* (\d+) EXISTS", x)))


# -- Thunderbird ------------------------------------------------------------------

_TB_HEADERS = (
    "From To Cc Subject Date Message-ID Priority X-Priority References Newsgroups "
    "In-Reply-To Content-Type Reply-To"
)


def test_thunderbird_startup_replay(mssd: MssdProcess) -> None:
    deliver(mssd, "avant Thunderbird")
    tb = RawImap(mssd)
    try:
        assert tb.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
        (caps,) = tb.command("CAPABILITY")
        for needed in (b"IDLE", b"CONDSTORE", b"SPECIAL-USE", b"LIST-EXTENDED", b"AUTH=PLAIN"):
            assert b" " + needed + b" " in caps or caps.endswith(b" " + needed + b"\r\n"), caps
        (ident,) = tb.command('ID ("name" "Thunderbird" "version" "128.0")')
        assert re.fullmatch(rb'\* ID \("name" "mssd" .*\)\r\n', ident), ident

        token = base64.b64encode(f"\0{PER2}\0{PASSWORD}".encode()).decode()
        tag = tb.send(f"AUTHENTICATE PLAIN {token}")
        _, done = tb.until(tag)
        # Thunderbird reads the new capabilities from the tagged OK.
        assert re.match(rb"tb\d+ OK \[CAPABILITY IMAP4rev1 .*CONDSTORE.*\]", done), done

        special = tb.command('LIST (SPECIAL-USE) "" "*"')
        uses = {
            m.group(2): m.group(1)
            for x in special
            if (m := re.fullmatch(rb'\* LIST \(([^)]*)\) "/" "?([^"]*)"?\r\n', x))
        }
        assert set(uses) == {b"Sent", b"Drafts", b"Trash", b"Junk", b"Archive"}, special
        for name, use in uses.items():
            assert b"\\" + name in use.split(), (name, use)

        listing = tb.command('LIST "" "*" RETURN (SPECIAL-USE SUBSCRIBED)')
        attributes = {
            m.group(2): m.group(1).split()
            for x in listing
            if (m := re.fullmatch(rb'\* LIST \(([^)]*)\) "/" "?([^"]*)"?\r\n', x))
        }
        assert len(attributes) == len(listing), listing
        assert b"\\Sent" in attributes[b"Sent"] and b"\\Subscribed" in attributes[b"INBOX"]
        assert b"\\Trash" in attributes[b"Trash"]

        (enabled,) = tb.command("ENABLE CONDSTORE")
        assert enabled == b"* ENABLED CONDSTORE\r\n"

        selected = tb.command('SELECT "INBOX" (CONDSTORE)')
        highest = code(selected, "HIGHESTMODSEQ")
        uidnext = code(selected, "UIDNEXT")
        assert code(selected, "UIDVALIDITY") > 0 and exists(selected) >= 1
        assert any(x.startswith(b"* FLAGS (") for x in selected)
        assert any(x.startswith(b"* OK [PERMANENTFLAGS (") for x in selected)

        # Thunderbird resynchronises flags from the HIGHESTMODSEQ it cached.
        other = imap(mssd)
        try:
            other.select("INBOX")
            other.uid("STORE", str(uidnext - 1), "+FLAGS", "(\\Flagged)")
        finally:
            other.logout()
        changed = tb.command(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {highest})")
        assert len(changed) == 1, changed
        match = re.fullmatch(rb"\* \d+ FETCH \((.*)\)\r\n", changed[0])
        assert match is not None, changed
        items = match.group(1)
        assert f"UID {uidnext - 1}".encode() in items and b"\\Flagged" in items
        modseq = re.search(rb"MODSEQ \((\d+)\)", items)
        assert modseq is not None and int(modseq.group(1)) > highest, items
        assert tb.command(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {int(modseq.group(1))})") == []

        count = exists(selected)
        tag = tb.send("IDLE")
        assert tb.response().startswith(b"+ ")
        started = time.monotonic()
        deliver(mssd, "pendant IDLE de Thunderbird")
        heard = tb.response()
        latency = time.monotonic() - started
        print(f"Thunderbird IDLE heard {heard!r} after {latency * 1000:.0f} ms")
        assert heard == b"* %d EXISTS\r\n" % (count + 1), heard
        assert latency < IDLE_BOUND
        tb.tls.sendall(b"DONE\r\n")
        _, done = tb.until(tag)
        assert done.startswith(f"{tag} OK ".encode()), done

        fetched = tb.command(
            f"UID FETCH {uidnext}:* (UID RFC822.SIZE FLAGS "
            f"BODY.PEEK[HEADER.FIELDS ({_TB_HEADERS})])"
        )
        assert len(fetched) == 1, fetched
        header = fetched[0]
        assert re.match(rb"\* %d FETCH \(" % (count + 1), header), header
        assert f"UID {uidnext}".encode() in header and b"RFC822.SIZE " in header
        assert b"FLAGS ()" in header
        literal = re.search(rb"BODY\[HEADER\.FIELDS \([^)]*\)\] \{(\d+)\}\r\n", header)
        assert literal is not None, header
        body = header[literal.end() : literal.end() + int(literal.group(1))]
        assert b"Subject: pendant IDLE de Thunderbird\r\n" in body and body.endswith(b"\r\n\r\n")
        assert b"Received:" not in body
        tb.command("LOGOUT")
    finally:
        tb.close()


# -- sequence numbers and concurrent expunges ------------------------------------


def fill_folder(client: imaplib.IMAP4, folder: str, subjects: list[str]) -> list[int]:
    assert client.create(folder)[0] == "OK"
    uids = []
    for subject in subjects:
        typ, data = client.append(folder, None, None, message(subject))
        assert typ == "OK", data
        match = re.search(rb"APPENDUID \d+ (\d+)", data[0])
        assert match is not None
        uids.append(int(match.group(1)))
    return uids


def test_expunges_wait_for_a_uid_command_or_noop_and_keep_sequence_numbers_consistent(
    mssd: MssdProcess,
) -> None:
    folder = f"Expunge-{secrets.token_hex(3)}"
    writer = imap(mssd)
    watcher = RawImap(mssd)
    try:
        uids = fill_folder(writer, folder, [f"m{i}" for i in range(1, 9)])
        watcher.command(f'LOGIN "{PER2}" "{PASSWORD}"')
        assert exists(watcher.command(f'SELECT "{folder}"')) == 8
        view = list(uids)  # what the watcher knows: sequence number i is view[i-1]

        writer.select(folder)
        doomed = [uids[1], uids[3], uids[4], uids[7]]
        writer.uid("STORE", ",".join(map(str, doomed)), "+FLAGS.SILENT", "(\\Deleted)")
        assert writer.expunge()[0] == "OK"
        typ, _ = writer.append(folder, None, None, message("m9"))
        assert typ == "OK"

        # RFC 9051 §7.5.1: no EXPUNGE during FETCH, STORE or SEARCH.
        for text in ("FETCH 1:* (UID FLAGS)", "STORE 3 +FLAGS (\\Flagged)", "SEARCH ALL"):
            lines = watcher.command(text)
            assert not any(b"EXPUNGE" in x for x in lines), (text, lines)
            for line in lines:
                match = re.match(rb"\* (\d+) FETCH \(.*UID (\d+)", line)
                if match:  # every sequence number is still the watcher's
                    assert view[int(match.group(1)) - 1] == int(match.group(2)), line
                if line.startswith(b"* SEARCH"):
                    found = [int(n) for n in line.split()[2:]]
                    assert found and max(found) <= len(view) + 1, line

        # The same section allows them during a UID command: UID FETCH tells
        # them after its FETCH lines, each number valid at the moment it is sent.
        lines = watcher.command("UID FETCH 1:* (FLAGS)")
        assert any(b"EXPUNGE" in x for x in lines), lines
        told = [x for x in lines if b"EXPUNGE" in x or b"EXISTS" in x]
        assert lines.index(told[0]) > max(i for i, x in enumerate(lines) if b" FETCH " in x)
        lines += watcher.command("NOOP")
        for line in lines:
            if (match := re.fullmatch(rb"\* (\d+) EXPUNGE\r\n", line)) is not None:
                seq = int(match.group(1))
                assert 1 <= seq <= len(view), (line, view)
                del view[seq - 1]
            elif (match := re.fullmatch(rb"\* (\d+) EXISTS\r\n", line)) is not None:
                grown = int(match.group(1))
                assert grown >= len(view)
                view += [0] * (grown - len(view))  # UIDs learnt below
        assert sorted(set(uids) - set(view)) == sorted(doomed), lines
        assert len(view) == 5, view

        fetched = watcher.command("FETCH 1:* (UID)")
        pairs = [tuple(map(int, re.findall(rb"\d+", x)[:2])) for x in fetched]
        assert [seq for seq, _ in pairs] == list(range(1, len(view) + 1))
        assert [uid for _, uid in pairs][:4] == view[:4]
        _, data = writer.uid("SEARCH", "ALL")
        assert [uid for _, uid in pairs] == [int(u) for u in data[0].split()]
        watcher.command("LOGOUT")
    finally:
        watcher.close()
        writer.logout()


# -- IDLE with aioimaplib ------------------------------------------------------------


async def idle_until(
    client: aioimaplib.IMAP4_SSL, pattern: bytes, action: object, within: float = IDLE_BOUND
) -> tuple[float, list[bytes]]:
    """Start IDLE, run ``action`` in a thread, and wait for a pushed line
    matching ``pattern``: (seconds it took, lines heard)."""
    idle = await client.idle_start(timeout=60)
    await asyncio.wait_for(client.protocol.wait_for_idle_response(), 10)  # "+ idling"
    started = time.monotonic()
    await asyncio.to_thread(action)  # type: ignore[arg-type]
    heard: list[bytes] = []
    deadline = started + within
    try:
        while not any(re.search(pattern, x) for x in heard):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {pattern!r} within {within} s: {heard!r}")
            pushed = await client.wait_server_push(timeout=remaining)
            lines = pushed if isinstance(pushed, list) else [pushed]
            heard += [x if isinstance(x, bytes) else str(x).encode() for x in lines]
        elapsed = time.monotonic() - started
    finally:
        client.idle_done()
        await asyncio.wait_for(idle, 10)
    return elapsed, heard


def test_aioimaplib_idle_hears_delivery_expunge_and_flags(mssd: MssdProcess) -> None:
    latencies: dict[str, float] = {}

    async def scenario() -> None:
        client = aioimaplib.IMAP4_SSL(
            "127.0.0.1", mssd.imaps, ssl_context=mssd.pki.client_context(), timeout=30
        )
        await client.wait_hello_from_server()
        assert (await client.login(PER2, PASSWORD)).result == "OK"
        assert (await client.select("INBOX")).result == "OK"

        subject = f"aioimaplib {secrets.token_hex(3)}"
        elapsed, _ = await idle_until(client, rb"^\d+ EXISTS", lambda: deliver(mssd, subject))
        latencies["EXISTS"] = elapsed

        other = await asyncio.to_thread(imap, mssd)
        try:
            await asyncio.to_thread(other.select, "INBOX")
            _, data = await asyncio.to_thread(other.uid, "SEARCH", "SUBJECT", f'"{subject}"')
            (uid,) = data[0].split()

            def flag() -> None:
                other.uid("STORE", uid, "+FLAGS.SILENT", "(\\Flagged)")

            elapsed, _ = await idle_until(client, rb"FETCH \(.*FLAGS \(.*\\Flagged", flag)
            latencies["FETCH FLAGS"] = elapsed

            def expunge() -> None:
                other.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")
                other.expunge()

            elapsed, _ = await idle_until(client, rb"^\d+ EXPUNGE", expunge)
            latencies["EXPUNGE"] = elapsed
        finally:
            await asyncio.to_thread(other.logout)
        await client.logout()

    run(scenario())
    print(
        "aioimaplib IDLE latencies: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in latencies.items())
    )
    assert set(latencies) == {"EXISTS", "FETCH FLAGS", "EXPUNGE"}
    assert max(latencies.values()) < IDLE_BOUND


# -- two processes on one PostgreSQL -------------------------------------------------


@pytest.fixture
def two_processes(test_pki: PkiBundle, tmp_path: Path) -> Iterator[tuple[MssdProcess, MssdProcess]]:
    url, name = create_postgres_database()
    try:
        run(seed(url, test_pki))
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first = start_mssd(url, test_pki, tmp_path / "a")
        try:
            second = start_mssd(url, test_pki, tmp_path / "b")
            try:
                yield first, second
            finally:
                second.stop()
        finally:
            first.stop()
    finally:
        drop_postgres_database(name)


def test_idle_on_one_process_hears_a_delivery_to_another(
    two_processes: tuple[MssdProcess, MssdProcess],
) -> None:
    first, second = two_processes
    client = IMAPClient(
        "127.0.0.1", port=second.imaps, ssl=True, ssl_context=second.pki.client_context()
    )
    try:
        client.login(PER2, PASSWORD)
        client.select_folder("INBOX")
        timings: dict[str, float] = {}
        for label, action, wanted in (
            ("EXISTS", lambda: deliver(first, "via le processus A"), b"EXISTS"),
            ("FETCH FLAGS", lambda: flag_all(first), b"FETCH"),
        ):
            client.idle()
            started = time.monotonic()
            action()
            responses: list[tuple[object, ...]] = []
            while not any(r[1] == wanted for r in responses):
                remaining = started + IDLE_BOUND - time.monotonic()
                assert remaining > 0, (label, responses)
                responses += client.idle_check(timeout=remaining)
            timings[label] = time.monotonic() - started
            client.idle_done()
        print(
            "IDLE on process B, change on process A: "
            + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items())
        )
    finally:
        client.logout()


def flag_all(server: MssdProcess) -> None:
    other = imap(server)
    try:
        other.select("INBOX")
        other.store("1:*", "+FLAGS.SILENT", "(\\Flagged)")
    finally:
        other.logout()


# -- mbsync ---------------------------------------------------------------------------

_MAILDIR_FLAGS = {
    "D": "\\Draft",
    "F": "\\Flagged",
    "R": "\\Answered",
    "S": "\\Seen",
    "T": "\\Deleted",
}
_SYSTEM_FLAGS = frozenset(_MAILDIR_FLAGS.values())
State = dict[str, dict[str, frozenset[str]]]
"""folder -> Message-ID -> system flags."""


def mbsync_message(number: int) -> bytes:
    return (
        f"From: <{PER}>\r\nTo: <{PER2}>\r\nSubject: synchro {number}\r\n"
        f"Date: Mon, 02 Jun 2025 10:00:00 +0200\r\n"
        f"Message-ID: <{number}@mbsync.mssd.test>\r\n\r\nCorps {number}.\r\n"
    ).encode()


def maildir_state(root: Path) -> State:
    state: State = {}
    for folder in sorted(p.parent for p in root.rglob("cur")):
        name = folder.relative_to(root).as_posix()
        messages: dict[str, frozenset[str]] = {}
        for path in [*(folder / "cur").iterdir(), *(folder / "new").iterdir()]:
            match = re.search(rb"^Message-ID: <([^>]+)>", path.read_bytes(), re.M | re.I)
            assert match is not None, path
            flags = path.name.partition(":2,")[2]
            messages[match.group(1).decode()] = frozenset(_MAILDIR_FLAGS[f] for f in flags)
        state[name] = messages
    return state


def server_state(client: imaplib.IMAP4) -> State:
    state: State = {}
    _, lines = client.list()
    for line in lines:
        assert isinstance(line, bytes)
        name = line.rpartition(b' "/" ')[2].strip(b'"').decode()
        typ, _ = client.select(f'"{name}"', readonly=True)
        assert typ == "OK", name
        messages: dict[str, frozenset[str]] = {}
        _, data = client.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        for item in data:
            if not isinstance(item, tuple):
                continue
            flags = re.search(rb"FLAGS \(([^)]*)\)", item[0])
            mid = re.search(rb"<([^>]+)>", item[1])
            assert flags is not None and mid is not None, item
            present = {f.decode() for f in flags.group(1).split()}
            messages[mid.group(1).decode()] = frozenset(present & _SYSTEM_FLAGS)
        state[name] = messages
    return state


def server_fingerprint(client: imaplib.IMAP4) -> list[bytes]:
    """Everything a sync could change on the server: UIDs, flags, mod-sequences."""
    out: list[bytes] = []
    _, lines = client.list()
    for line in lines:
        assert isinstance(line, bytes)
        name = line.rpartition(b' "/" ')[2].strip(b'"').decode()
        _, status = client.status(f'"{name}"', "(MESSAGES UIDNEXT HIGHESTMODSEQ)")
        out.append(status[0])
    return out


def run_mbsync(program: str, config: Path) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [program, "-c", str(config), "-a"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return time.monotonic() - started


def move_file(path: Path, folder: Path) -> None:
    """A Maildir move as mail clients do it; mbsync's man page asks for the
    ``,U=`` UID to be dropped so the far side gets a new message."""
    name = re.sub(r",U=\d+", "", path.name)
    path.rename(folder / "cur" / name)


def set_maildir_flags(path: Path, add: str) -> None:
    base, _, flags = path.name.partition(":2,")
    path.rename(path.with_name(base + ":2," + "".join(sorted(set(flags) | set(add)))))


def test_mbsync_syncs_a_thousand_messages_both_ways(mssd: MssdProcess, tmp_path: Path) -> None:
    program = require_program("mbsync")
    address = new_account(mssd, "mbsync")
    inbox_count, folder_count = 1000, 20
    timings: dict[str, float] = {}

    started = time.monotonic()
    filler = RawImap(mssd)
    try:
        filler.command(f'LOGIN "{address}" "{PASSWORD}"')
        filler.command("CREATE Patients")
        # One session, one APPEND per message, pipelined with LITERAL+ (RFC 7888)
        # as a migration tool would; imaplib waits for "+" at every literal.
        tags = []
        for number in range(inbox_count + folder_count):
            folder = "INBOX" if number < inbox_count else "Patients"
            data = mbsync_message(number)
            filler.count += 1
            tags.append(f"tb{filler.count}")
            filler.tls.sendall(
                f"{tags[-1]} APPEND {folder} {{{len(data)}+}}\r\n".encode() + data + b"\r\n"
            )
        for tag in tags:
            _, done = filler.until(tag)
            assert done.startswith(f"{tag} OK [APPENDUID ".encode()), done
        filler.command("LOGOUT")
    finally:
        filler.close()
    timings["1,020 APPENDs"] = time.monotonic() - started

    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(
        f"""IMAPAccount mssd
Host localhost
Port {mssd.imaps}
User {address}
Pass "{PASSWORD}"
SSLType IMAPS
CertificateFile {mssd.pki.dev.ca_bundle}
AuthMechs LOGIN
PipelineDepth 50

IMAPStore far
Account mssd

MaildirStore near
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel sync
Far :far:
Near :near:
Patterns *
Create Both
Expunge Both
SyncState *
"""
    )
    timings["first sync"] = run_mbsync(program, config)
    expected = maildir_state(maildir)
    assert len(expected["INBOX"]) == inbox_count and len(expected["Patients"]) == folder_count
    client = imap(mssd, login=address)
    try:
        assert server_state(client) == expected
    finally:
        client.logout()

    def mid(number: int) -> str:
        return f"{number}@mbsync.mssd.test"

    # Changes on the near (Maildir) side.
    files = {
        re.search(rb"<(\d+)@", p.read_bytes()).group(1).decode(): p  # type: ignore[union-attr]
        for p in [*maildir.glob("*/cur/*"), *maildir.glob("*/new/*")]
    }
    near_inbox, near_patients = expected["INBOX"], expected["Patients"]
    for number in range(0, 10):
        set_maildir_flags(files[str(number)], "S")
        near_inbox[mid(number)] |= {"\\Seen"}
    for number in range(10, 15):
        set_maildir_flags(files[str(number)], "F")
        near_inbox[mid(number)] |= {"\\Flagged"}
    for number in range(15, 20):
        files[str(number)].unlink()
        del near_inbox[mid(number)]
    for number in range(20, 25):
        move_file(files[str(number)], maildir / "Patients")
        near_patients[mid(number)] = near_inbox.pop(mid(number))
    for number in (1000, 1001):
        move_file(files[str(number)], maildir / "INBOX")
        near_inbox[mid(number)] = near_patients.pop(mid(number))
    (maildir / "INBOX" / "new" / "1.new.near").write_bytes(mbsync_message(5000))
    near_inbox[mid(5000)] = frozenset()

    # Changes on the far (mssd) side, over IMAP.
    client = imap(mssd, login=address)
    try:
        client.select("INBOX")

        _, headers = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        uid_of: dict[str, str] = {}
        for item in headers:
            if isinstance(item, tuple):
                found_number = re.search(rb"<(\d+)@", item[1])
                found_uid = re.search(rb"UID (\d+)", item[0])
                assert found_number is not None and found_uid is not None, item
                uid_of[found_number.group(1).decode()] = found_uid.group(1).decode()

        def uids(numbers: range | tuple[int, ...]) -> str:
            return ",".join(uid_of[str(number)] for number in numbers)

        client.uid("STORE", uids(range(30, 40)), "+FLAGS.SILENT", "(\\Seen)")
        client.uid("STORE", uids((0, 1, *range(40, 45))), "+FLAGS.SILENT", "(\\Flagged)")
        for number in range(30, 40):
            near_inbox[mid(number)] |= {"\\Seen"}
        for number in (0, 1, *range(40, 45)):
            near_inbox[mid(number)] |= {"\\Flagged"}
        client.uid("STORE", uids(range(45, 50)), "+FLAGS.SILENT", "(\\Deleted)")
        assert client.expunge()[0] == "OK"
        for number in range(45, 50):
            del near_inbox[mid(number)]
        assert client.uid("MOVE", uids(range(50, 55)), "Patients")[0] == "OK"
        for number in range(50, 55):
            near_patients[mid(number)] = near_inbox.pop(mid(number))
        client.append("INBOX", "(\\Seen)", None, mbsync_message(6000))
        near_inbox[mid(6000)] = frozenset({"\\Seen"})
    finally:
        client.logout()

    timings["second sync"] = run_mbsync(program, config)
    near = maildir_state(maildir)
    client = imap(mssd, login=address)
    try:
        far = server_state(client)
        before = server_fingerprint(client)
    finally:
        client.logout()
    for folder in expected:
        assert near[folder] == expected[folder], folder
        assert far[folder] == expected[folder], folder
    assert near == far

    # A third run has nothing left to do: no file renamed, no server change.
    files_before = sorted(p.relative_to(maildir) for p in maildir.rglob("*") if p.is_file())
    timings["third sync"] = run_mbsync(program, config)
    files_after = sorted(p.relative_to(maildir) for p in maildir.rglob("*") if p.is_file())
    client = imap(mssd, login=address)
    try:
        assert server_fingerprint(client) == before
    finally:
        client.logout()
    assert [f for f in files_after if ".mbsyncstate" not in f.name] == [
        f for f in files_before if ".mbsyncstate" not in f.name
    ]
    print("mbsync timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
