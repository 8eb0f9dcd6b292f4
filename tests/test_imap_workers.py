"""Several IMAP processes on one PostgreSQL (``imap.workers``): connections are
spread over the processes, a change made through one reaches an IDLE session
in the other within a second, a worker that dies is started again, and no
worker outlives ``mssd serve``."""

from __future__ import annotations

import imaplib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PASSWORD, PER, MssdProcess, PkiBundle, run, seed, start_mssd, store_url_for


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    yield from store_url_for("postgresql", tmp_path)


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


def login(server: MssdProcess) -> imaplib.IMAP4_SSL:
    context = ssl.create_default_context(cafile=str(server.pki.dev.ca_bundle))
    client = imaplib.IMAP4_SSL("127.0.0.1", server.imaps, ssl_context=context, timeout=30)
    client.login(PER, PASSWORD)
    return client


def test_more_than_one_worker_is_refused_on_sqlite(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSD_")}
    env |= {
        "MSSD_STORE_URL": f"sqlite+aiosqlite:///{tmp_path / 'mssd.db'}",
        "MSSD_IMAP_WORKERS": "2",
    }
    result = subprocess.run(
        [sys.executable, "-m", "mssd", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert (
        "imap.workers: more than one IMAP process needs the PostgreSQL store (store.url); "
        "with SQLite mssd runs as one process" in result.stderr
    )


def test_workers_share_the_load_and_hear_each_others_changes(
    pg_url: str, test_pki: PkiBundle, tmp_path: Path
) -> None:
    run(seed(pg_url, test_pki))
    server = start_mssd(pg_url, test_pki, tmp_path, MSSD_IMAP_WORKERS="3")
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

        # A worker that dies is replaced; the service goes on.
        victim = children(parent)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in children(parent) and len(children(parent)) == 2)
        fresh = login(server)
        assert fresh.select("INBOX") == ("OK", [b"1"])
        fresh.logout()
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
    pg_url: str, test_pki: PkiBundle, tmp_path: Path
) -> None:
    run(seed(pg_url, test_pki))
    server = start_mssd(pg_url, test_pki, tmp_path, MSSD_IMAP_WORKERS="2")
    assert server.process is not None
    parent = server.process.pid
    wait_for(lambda: len(children(parent)) == 1)
    (worker,) = children(parent)
    server.stop(signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{worker}").exists() or _is_zombie(worker), timeout=20)
