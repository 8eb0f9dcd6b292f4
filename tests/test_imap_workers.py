"""Several IMAP processes (``imap.workers``) on one PostgreSQL or one SQLite
file: connections are spread over the processes, a change made through one
(or a delivery by ``mssd serve``) reaches an IDLE session in another within a
second, UIDs and sequence numbers stay right when they all write one folder,
authentication failures count in every process, a worker that dies is started
again and hears changes again, and no worker outlives ``mssd serve``.

Which process the kernel hands a connection to is not chosen: the tests open
connections until each process holds the ones they need (:func:`sessions_in`)."""

from __future__ import annotations

import imaplib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import (
    PASSWORD,
    PER,
    PER2,
    MssdProcess,
    PkiBundle,
    run,
    seed,
    start_mssd,
    store_url_for,
)
from test_smtp_submission import message

from mssd.config import ConfigError, load

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from store_url_for(request.param, tmp_path)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_for(predicate: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def owner_of(client: socket.socket, pids: list[int]) -> int | None:
    """The process holding the server end of a loopback connection."""
    local = client.getsockname()[1]
    inodes: set[str] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].rpartition(":")[2], 16)
        if remote_port == local:
            inodes.add(fields[9])
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    return None


def connect(server: MssdProcess) -> imaplib.IMAP4_SSL:
    context = ssl.create_default_context(cafile=str(server.pki.dev.ca_bundle))
    return imaplib.IMAP4_SSL("127.0.0.1", server.imaps, ssl_context=context, timeout=30)


def login(server: MssdProcess, user: str = PER) -> imaplib.IMAP4_SSL:
    client = connect(server)
    client.login(user, PASSWORD)
    return client


def sessions_in(
    server: MssdProcess, pids: list[int], user: str | None = PER
) -> dict[int, imaplib.IMAP4_SSL]:
    """A session (logged in as ``user``) served by each of ``pids``: the kernel
    picks the process, so connect until each has one."""
    assert server.process is not None
    everyone = [server.process.pid, *children(server.process.pid)]
    found: dict[int, imaplib.IMAP4_SSL] = {}
    for _ in range(200):
        client = connect(server)
        owner = owner_of(client.sock, everyone)
        if owner in pids and owner not in found:
            if user is not None:
                client.login(user, PASSWORD)
            found[owner] = client
            if len(found) == len(pids):
                return found
        else:
            client.shutdown()
    raise AssertionError(f"no connection reached processes {set(pids) - set(found)}")


def deliver(server: MssdProcess, subject: str, to: str = PER) -> None:
    """A message delivered by ``mssd serve`` itself (SMTP submission)."""
    with server.smtp() as client:
        assert client.sendmail(PER, [to], message(subject)) == {}


class Idler:
    """A selected session in IDLE (RFC 2177), read line by line straight from
    its socket (imaplib's reader cannot be read again after a timeout)."""

    def __init__(self, client: imaplib.IMAP4_SSL) -> None:
        self.client = client
        self.heard: list[bytes] = []
        self._buffer = b""

    def _line(self, within: float) -> bytes | None:
        deadline = time.monotonic() + within
        while b"\r\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.client.sock.settimeout(left)
            try:
                data = self.client.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionError("the server closed the connection")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line + b"\r\n"

    def start(self) -> None:
        tag = self.client._new_tag().decode()  # type: ignore[attr-defined]
        self.client.send(f"{tag} IDLE\r\n".encode())
        line = self._line(30)
        assert line is not None and line.startswith(b"+ "), line

    def hears(self, predicate: Callable[[bytes], bool], within: float = 1.0) -> bool:
        """Whether a line matching ``predicate`` arrives within ``within``
        seconds (of this call: the change was committed before it)."""
        deadline = time.monotonic() + within
        while (line := self._line(deadline - time.monotonic())) is not None:
            self.heard.append(line)
            if predicate(line):
                return True
        return False

    def done(self) -> list[bytes]:
        """DONE; the lines that came before the tagged OK."""
        self.client.send(b"DONE\r\n")
        lines = []
        while not (line := self._line(30) or b"(nothing)").endswith(b"OK IDLE terminated\r\n"):
            assert line != b"(nothing)", "no answer to DONE"
            lines.append(line)
        assert self._buffer == b""
        self.client.sock.settimeout(30)
        return lines


@contextmanager
def idling(client: imaplib.IMAP4_SSL) -> Iterator[Idler]:
    idler = Idler(client)
    idler.start()
    yield idler
    idler.done()


def test_more_than_one_worker_is_refused_on_an_in_memory_sqlite_store(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSD_")}
    env |= {"MSSD_STORE_URL": "sqlite+aiosqlite:///:memory:", "MSSD_IMAP_WORKERS": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "mssd", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "imap.workers: more than one IMAP process needs a store they can share" in result.stderr
    assert "in-memory SQLite database" in result.stderr


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("sqlite+aiosqlite:///var/mssd.db", False),
        ("sqlite+aiosqlite:////srv/mssd/mssd.db?timeout=5", False),
        ("postgresql+asyncpg://mssd@db/mssd", False),
        ("sqlite+aiosqlite://", True),
        ("sqlite+aiosqlite:///:memory:", True),
        ("sqlite+aiosqlite:///file:shared?mode=memory&cache=shared&uri=true", True),
    ],
)
def test_workers_need_a_store_every_process_can_open(url: str, refused: bool) -> None:
    env = {"MSSD_STORE_URL": url, "MSSD_IMAP_WORKERS": "2"}
    if refused:
        with pytest.raises(ConfigError, match="in-memory SQLite"):
            load(None, env=env)
    else:
        assert load(None, env=env).imap.workers == 2


def test_workers_share_the_load_and_hear_each_others_changes(
    store: str, test_pki: PkiBundle, tmp_path: Path
) -> None:
    run(seed(store, test_pki))
    server = start_mssd(store, test_pki, tmp_path, MSSD_IMAP_WORKERS="3")
    clients: list[imaplib.IMAP4_SSL] = []
    try:
        assert server.process is not None
        parent = server.process.pid
        wait_for(lambda: len(children(parent)) == 2)
        pids = [parent, *children(parent)]
        clients = [login(server) for _ in range(30)]
        owners = {owner_of(c.sock, pids) for c in clients}
        assert len(owners - {None}) == 3, f"connections did not reach every process: {owners}"

        # Every session IDLEs on INBOX; a message appended through one of them
        # (whatever its process) is announced to all of them within a second.
        watchers = clients[1:]
        for client in watchers:
            client.select("INBOX")
            tag = client._new_tag().decode()  # type: ignore[attr-defined]
            client.send(f"{tag} IDLE\r\n".encode())
            assert client.readline().startswith(b"+ ")
        writer = clients[0]
        status, _ = writer.append("INBOX", None, None, b"Subject: hello\r\n\r\nbody\r\n")
        assert status == "OK"
        start = time.monotonic()
        late = []
        for client in watchers:
            client.sock.settimeout(max(0.05, 1.0 - (time.monotonic() - start)))
            try:
                line = client.readline()
            except TimeoutError:
                line = b"(nothing within a second)"
            if line != b"* 1 EXISTS\r\n":
                late.append((owner_of(client.sock, pids), line))
        assert not late, f"written through {owner_of(writer.sock, pids)}; not told: {late}"
        for client in watchers:
            client.sock.settimeout(30)
            client.send(b"DONE\r\n")
            assert client.readline().endswith(b"OK IDLE terminated\r\n")

        # A worker that dies is replaced; the service goes on, and the new
        # worker's sessions hear the others' changes, and the others its own.
        victim = children(parent)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in children(parent) and len(children(parent)) == 2)
        (replacement,) = set(children(parent)) - set(pids)
        fresh = sessions_in(server, [parent, replacement])
        for client in fresh.values():
            assert client.select("INBOX") == ("OK", [b"1"])
        with idling(fresh[replacement]) as idler:
            deliver(server, "after the restart")  # by mssd serve
            assert idler.hears(lambda line: line == b"* 2 EXISTS\r\n")
        fresh[parent].select("INBOX")
        with idling(fresh[parent]) as idler:
            fresh[replacement].store("2", "+FLAGS", "(\\Flagged)")
            assert idler.hears(lambda line: b"FETCH" in line and b"\\Flagged" in line)
        for client in fresh.values():
            client.logout()
    finally:
        for client in clients:
            try:
                client.shutdown()
            except OSError:
                pass
        workers = children(server.process.pid) if server.process is not None else []
        assert server.stop() == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"worker {pid} survived"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_a_worker_does_not_outlive_a_killed_parent(
    store: str, test_pki: PkiBundle, tmp_path: Path
) -> None:
    run(seed(store, test_pki))
    server = start_mssd(store, test_pki, tmp_path, MSSD_IMAP_WORKERS="2")
    assert server.process is not None
    parent = server.process.pid
    wait_for(lambda: len(children(parent)) == 1)
    (worker,) = children(parent)
    server.stop(signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{worker}").exists() or _is_zombie(worker), timeout=20)


# -- two IMAP processes of one mssd serve, on each backend ---------------------------------------

ACCOUNT_LIMIT = 3


@pytest.fixture(scope="module", params=BACKENDS)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[MssdProcess]:
    """``mssd serve`` with ``imap.workers = 2``: itself and one child."""
    workdir = tmp_path_factory.mktemp(f"mssd-workers-{request.param}")
    for url in store_url_for(request.param, workdir):
        run(seed(url, test_pki))
        server = start_mssd(
            url,
            test_pki,
            workdir,
            MSSD_IMAP_WORKERS="2",
            MSSD_AUTH_FAILURE_LIMIT_PER_ACCOUNT=str(ACCOUNT_LIMIT),
            MSSD_AUTH_FAILURE_LIMIT_PER_ADDRESS="1000",
        )
        try:
            yield server
        finally:
            assert server.stop() == 0


def two_processes(server: MssdProcess) -> tuple[int, int]:
    """``mssd serve`` (which also delivers SMTP) and its IMAP worker."""
    assert server.process is not None
    parent = server.process.pid
    wait_for(lambda: len(children(parent)) == 1)
    (child,) = children(parent)
    return parent, child


def test_an_idle_session_hears_the_other_process_deliver_flag_and_expunge_within_a_second(
    pair: MssdProcess,
) -> None:
    parent, child = two_processes(pair)
    watchers = sessions_in(pair, [parent, child])
    actors = sessions_in(pair, [parent, child])
    try:
        for client in [*watchers.values(), *actors.values()]:
            assert client.select("INBOX") == ("OK", [b"0"])
        idlers = {pid: Idler(client) for pid, client in watchers.items()}
        for idler in idlers.values():
            idler.start()

        def everyone_hears(what: str, line: Callable[[bytes], bool]) -> None:
            deaf = [pid for pid, idler in idlers.items() if not idler.hears(line)]
            assert not deaf, f"{what}: not heard within a second in {deaf}: {idlers[deaf[0]].heard}"

        # Deliveries are made by mssd serve: the worker's session hears them too.
        deliver(pair, "first")
        everyone_hears("delivery", lambda line: line == b"* 1 EXISTS\r\n")
        deliver(pair, "second")
        everyone_hears("delivery", lambda line: line == b"* 2 EXISTS\r\n")

        # Flags stored through either process reach both.
        for pid, number, flag in ((child, "1", "\\Flagged"), (parent, "2", "\\Answered")):
            assert actors[pid].noop()[0] == "OK"  # (learns of the deliveries first)
            assert actors[pid].store(number, "+FLAGS.SILENT", f"({flag})")[0] == "OK"
            everyone_hears(
                f"flag {flag} stored in {pid}",
                lambda line, n=number, f=flag: (
                    line.startswith(f"* {n} FETCH".encode()) and f.encode() in line
                ),
            )

        # So do expunges: the first message through the worker, then the other
        # (now number 1) through mssd serve.
        for pid in (child, parent):
            actor = actors[pid]
            assert actor.noop()[0] == "OK"  # (learns of the other's expunge first)
            assert actor.store("1", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
            assert actor.expunge()[0] == "OK"
            everyone_hears(f"expunge in {pid}", lambda line: line == b"* 1 EXPUNGE\r\n")
        for idler in idlers.values():
            idler.done()
        for client in watchers.values():
            assert client.noop()[0] == "OK"
            assert client.select("INBOX") == ("OK", [b"0"])
    finally:
        for client in [*watchers.values(), *actors.values()]:
            client.logout()


def test_uids_and_sequence_numbers_stay_right_when_both_processes_append_and_expunge(
    pair: MssdProcess,
) -> None:
    parent, child = two_processes(pair)
    folder = "Concurrent"
    setup = login(pair)
    assert setup.create(folder)[0] == "OK"
    setup.logout()
    writers = [
        *sessions_in(pair, [parent, child]).values(),
        *sessions_in(pair, [parent, child]).values(),
    ]
    watchers = sessions_in(pair, [parent, child])
    appended: list[list[int]] = [[] for _ in writers]
    errors: list[BaseException] = []
    rounds = 15

    def write(client: imaplib.IMAP4_SSL, uids: list[int]) -> None:
        try:
            for n in range(rounds):
                for _ in range(2):
                    status, data = client.append(folder, None, None, message(f"m{n}"))
                    assert status == "OK", data
                    code = re.search(rb"\[APPENDUID \d+ (\d+)\]", data[0])
                    assert code is not None, data
                    uids.append(int(code.group(1)))
                # Its own older message: UID EXPUNGE (RFC 4315 §2.1); every
                # other round, an EXPUNGE of whatever is \Deleted.
                client.uid("STORE", str(uids[-2]), "+FLAGS.SILENT", "(\\Deleted)")
                if n % 2:
                    assert client.expunge()[0] == "OK"
                else:
                    assert client.uid("EXPUNGE", str(uids[-2]))[0] == "OK"
        except BaseException as error:
            errors.append(error)

    try:
        for client in [*writers, *watchers.values()]:
            assert client.select(folder)[0] == "OK"
        counted = {pid: 0 for pid in watchers}
        idlers = {pid: Idler(client) for pid, client in watchers.items()}
        for idler in idlers.values():
            idler.start()
        threads = [
            threading.Thread(target=write, args=(client, uids))
            for client, uids in zip(writers, appended, strict=True)
        ]
        for thread in threads:
            thread.start()

        def follow(pid: int, line: bytes) -> bool:
            """Keep the watcher's count as its client would (RFC 9051 §7.4.1, §7.3.1)."""
            if (m := re.fullmatch(rb"\* (\d+) EXPUNGE\r\n", line)) is not None:
                assert 1 <= int(m.group(1)) <= counted[pid], (pid, line, counted[pid])
                counted[pid] -= 1
            elif (m := re.fullmatch(rb"\* (\d+) EXISTS\r\n", line)) is not None:
                assert int(m.group(1)) >= counted[pid], (pid, line, counted[pid])
                counted[pid] = int(m.group(1))
            return False

        while any(thread.is_alive() for thread in threads):
            for pid, idler in idlers.items():
                idler.hears(lambda line, pid=pid: follow(pid, line), within=0.05)
        for thread in threads:
            thread.join()
        assert not errors, errors
        for pid, idler in idlers.items():
            idler.hears(lambda line, pid=pid: follow(pid, line), within=1.5)
            for line in idler.done():
                follow(pid, line)

        every = [uid for uids in appended for uid in uids]
        assert len(set(every)) == len(every) == len(writers) * rounds * 2, "a UID was given twice"
        for uids in appended:
            assert uids == sorted(uids)
        fresh = login(pair)
        status, data = fresh.select(folder)
        assert status == "OK"
        stored = sorted(int(uid) for uid in fresh.uid("SEARCH", "ALL")[1][0].split())
        assert len(stored) == int(data[0]) == len(writers) * rounds
        assert set(stored) <= set(every)
        fresh.logout()
        for pid, client in watchers.items():
            # Each watcher's numbering is the store's: same count, same UIDs in order.
            assert counted[pid] == len(stored), pid
            status, data = client.fetch(f"1:{len(stored)}", "(UID)")
            assert status == "OK"
            numbered = [re.match(rb"(\d+) \(UID (\d+)\)", item).groups() for item in data]  # type: ignore[union-attr]
            assert [(int(n), int(uid)) for n, uid in numbered] == list(
                enumerate(stored, start=1)
            ), pid
    finally:
        for client in [*writers, *watchers.values()]:
            try:
                client.logout()
            except (OSError, imaplib.IMAP4.error):
                pass


# On PostgreSQL: test_auth_shared_limits.py.
@pytest.mark.parametrize("pair", ["sqlite"], indirect=True)
def test_failed_logins_in_either_process_count_against_the_account_in_both(
    pair: MssdProcess,
) -> None:
    parent, child = two_processes(pair)
    refused = "[UNAVAILABLE] too many failed attempts"
    failed = "[AUTHENTICATIONFAILED]"

    def attempt(pid: int, password: str) -> str:
        client = sessions_in(pair, [pid], user=None)[pid]
        try:
            client.login(PER2, password)
        except client.error as error:
            return str(error)
        finally:
            client.shutdown()
        return "OK"

    # A success in one process forgets the failures counted in the other.
    assert failed in attempt(parent, "guess 1")
    assert failed in attempt(child, "guess 2")
    time.sleep(0.3)
    assert attempt(parent, PASSWORD) == "OK"
    time.sleep(0.3)
    assert failed in attempt(child, "guess 3")
    assert failed in attempt(child, "guess 4")
    assert attempt(child, PASSWORD) == "OK"
    # Three failures spread over both: neither lets the right password in.
    assert failed in attempt(child, "guess 5")
    assert failed in attempt(parent, "guess 6")
    assert failed in attempt(child, "guess 7")
    time.sleep(0.3)
    for pid in (parent, child):
        assert refused in attempt(pid, PASSWORD)
