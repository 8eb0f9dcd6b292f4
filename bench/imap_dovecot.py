"""Dovecot as the server ``imap_load.py --server dovecot`` measures.

It starts the Dovecot of ``tests/dovecot_server.py`` (Dovecot's defaults except
what a throwaway instance on loopback needs) with the bench's users in a
passwd-file, their INBOXes written as Maildir files beforehand (and, for sdbox
or mdbox, converted by Dovecot's own dsync), and only the connection limits
raised that the run would otherwise hit. Without ``tuned`` it must not change a
setting that makes Dovecot faster or slower than an operator's defaults: process
model, login processes, ``mail_fsync``, indexes and cache stay Dovecot's. With
it, :func:`tuned_config` adds Dovecot's documented performance settings and
nothing that gives up durability or security of the stored mail.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dovecot_server import Dovecot, mail_owner, passwd_file_passdb, start_dovecot
from server_processes import find_program

PASSWORD_SCHEME = "SHA512-CRYPT"
MAIL_FORMATS = ("maildir", "sdbox", "mdbox")
"""Dovecot's mailbox formats on local disk the bench can fill."""
LOG_PROBLEM = re.compile(r"\b(Error|Panic|Fatal):")
# Maildir info flags (cr.yp.to/proto/maildir.html), written in ASCII order.
MAILDIR_FLAGS = {"\\Answered": "R", "\\Flagged": "F", "\\Seen": "S"}


def dovecot_binary() -> str:
    binary = find_program("dovecot")
    if binary is None:
        raise SystemExit("--server dovecot: dovecot is not installed (Debian: dovecot-imapd)")
    return binary


def doveadm_binary() -> str:
    return shutil.which("doveadm") or "/usr/bin/doveadm"


def version(binary: str) -> str:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return done.stdout.split()[0]


def hash_password(password: str) -> str:
    """``{SHA512-CRYPT}$6$...`` from Dovecot's own ``doveadm pw``."""
    done = subprocess.run(
        [doveadm_binary(), "pw", "-s", PASSWORD_SCHEME, "-p", password],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def write_passwd_file(path: Path, logins: list[str], password: str) -> None:
    """One ``name:{SCHEME}hash`` line per user (one hash: mssd's bench shares one too)."""
    hashed = hash_password(password)
    path.write_text("".join(f"{login}:{hashed}\n" for login in logins))
    # Read by the auth process, which runs as Dovecot's internal user.
    os.chown(path, 0 if os.geteuid() == 0 else -1, mail_owner().pw_gid)
    path.chmod(0o640)


def write_maildirs(
    home: Path,
    logins: list[str],
    count: int,
    message: Callable[[int], bytes],
    flags: list[list[str]],
    dates: list[float],
) -> None:
    """Each user's INBOX as Dovecot leaves what it delivers: one file per message in
    ``cur/`` with LF line ends (``mail_save_crlf = no``), ``S=`` and ``W=`` (the size
    with CRLF) in the name, flags after ``:2,``, the internal date as the file's
    mtime, and a ``dovecot-uidlist`` that gives message ``i`` the UID ``i + 1``.
    The first user's files are hard-linked into the others' INBOXes, as Dovecot's
    own COPY does (``maildir_copy_with_hardlinks``)."""
    owner = mail_owner()
    home.mkdir(mode=0o755, parents=True, exist_ok=True)
    maildirs = [home / login / "Maildir" for login in logins]
    for maildir in maildirs:
        for directory in (maildir.parent, maildir, *(maildir / d for d in ("cur", "new", "tmp"))):
            directory.mkdir(mode=0o700, exist_ok=True)
            os.chown(directory, owner.pw_uid, owner.pw_gid)
    bases = []
    for index in range(count):
        data = message(index)
        stored = data.replace(b"\r\n", b"\n")
        if b"\r" in stored:
            raise ValueError(f"message {index}: a CR outside CRLF would make W= wrong")
        base = f"{int(dates[index])}.M{index}P0.bench,S={len(stored)},W={len(data)}"
        name = f"{base}:2,{''.join(sorted(MAILDIR_FLAGS[f] for f in flags[index]))}"
        first = maildirs[0] / "cur" / name
        first.write_bytes(stored)
        os.chown(first, owner.pw_uid, owner.pw_gid)
        os.utime(first, (dates[index], dates[index]))
        for maildir in maildirs[1:]:
            os.link(first, maildir / "cur" / name)
        bases.append(base)
    uids = "".join(f"{uid} :{base}\n" for uid, base in enumerate(bases, start=1))
    for maildir in maildirs:
        uidlist = maildir / "dovecot-uidlist"
        uidlist.write_text(f"3 V{int(time.time())} N{count + 1} G{uuid.uuid4().hex}\n{uids}")
        os.chown(uidlist, owner.pw_uid, owner.pw_gid)
    # On disk before the load, as mssd's store is after its seed's commits: the
    # kernel's write-back must not compete with the measured fsyncs.
    os.sync()


def mail_location(mail_format: str) -> str:
    """``mail_location`` of the format: ``~/Maildir``, ``~/sdbox`` or ``~/mdbox``."""
    if mail_format not in MAIL_FORMATS:
        raise ValueError(f"unknown mail format {mail_format!r}")
    return f"{mail_format}:~/{'Maildir' if mail_format == 'maildir' else mail_format}"


def convert_maildirs(server: Dovecot, logins: list[str]) -> None:
    """Each user's Maildir copied into the running Dovecot's ``mail_location`` by
    dsync (``doveadm backup -R``: UIDs, flags and received dates kept),
    as the mail user, then removed. ``LAYOUT=fs`` gives the Maildir side the same
    hierarchy separator as dbox, which dsync requires."""
    for login in logins:
        done = subprocess.run(
            [doveadm_binary(), "-c", str(server.config), "backup", "-R", "-u", login,
             "maildir:~/Maildir:LAYOUT=fs"],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"doveadm backup -u {login}: {done.stderr.strip()}")
        shutil.rmtree(server.directory / "home" / login / "Maildir")
    os.sync()


def tuned_config(mail_format: str, cores: int) -> str:
    """Dovecot's documented settings for throughput (doc.dovecot.org 2.3: "Login
    processes", "Service configuration", "Performance tuning", "Maildir"); nothing
    that gives up durability (``mail_fsync`` stays ``optimized``) or TLS."""
    lines = [
        # High-performance login mode: ``cores`` long-running imap-login processes,
        # each proxying many connections' TLS, instead of one process per connection.
        f"service imap-login {{\n  service_count = 0\n  process_min_avail = {cores}\n"
        "  vsz_limit = 1G\n}",
        # An imap process serves up to 100 sessions before exiting, instead of one:
        # documented for when every user has the same UID, as here.
        "service imap {\n  service_count = 100\n}",
        # The passdb lookup cached; the hash is still checked at every login, by
        # auth-worker processes on all cores rather than the single auth process.
        "auth_cache_size = 10M",
        "auth_cache_verify_password_with_worker = yes",
        # Only Dovecot touches the mail: no stat() of mailbox directories to check
        # the list index,
        "mailbox_list_index_very_dirty_syncs = yes",
    ]
    if mail_format == "maildir":
        # nor of ``cur/`` before each sync.
        lines.append("maildir_very_dirty_syncs = yes")
    return "".join(line + "\n" for line in lines)


def limits_config(connections: int, mailboxes: int, tuned: bool = False) -> str:
    """Dovecot's connection limits raised where this run would hit them: at most 100
    login processes (one per connection, ``default_process_limit``), 10 connections
    per user and IP, and 1,000 clients of ``auth``/``anvil`` per process. The
    margin covers the processes of sessions that are still ending, and for
    ``default_client_limit`` anvil's other clients (the 100 ``imap-urlauth-login``
    processes, ``auth``). ``tuned``
    (:func:`tuned_config`): login and imap processes that serve more than one
    connection keep theirs to ``auth``, whose ``client_limit`` must then cover
    their process limits (Dovecot warns at start otherwise)."""
    lines = []
    processes = 2 * connections
    if processes > 100:
        lines.append(f"service imap-login {{\n  process_limit = {processes}\n}}")
    if processes > 1024:
        lines.append(f"service imap {{\n  process_limit = {processes}\n}}")
    client_limit = max(1000, processes + 200)
    if client_limit > 1000:
        lines.append(f"default_client_limit = {client_limit}")
    # imap, imap-login and imap-urlauth-login (100) processes.
    auth_clients = max(1024, processes) + max(100, processes) + 100
    if tuned and auth_clients > client_limit:
        lines.append(f"service auth {{\n  client_limit = {auth_clients}\n}}")
    per_user = 2 * math.ceil(connections / mailboxes)
    if per_user > 10:
        lines.append(f"mail_max_userip_connections = {per_user}")
    return "".join(line + "\n" for line in lines)


def log_problems(log: Path) -> list[str]:
    """Dovecot's ``Error:``, ``Panic:`` and ``Fatal:`` lines."""
    if not log.exists():
        return []
    return [
        line for line in log.read_text(errors="replace").splitlines() if LOG_PROBLEM.search(line)
    ]


@contextmanager
def running_dovecot(
    binary: str,
    directory: Path,
    logins: list[str],
    password: str,
    tls: tuple[Path, Path],
    mail_format: str,
    extra_config: str,
) -> Iterator[Dovecot]:
    """Dovecot started on ``directory``, whose ``home/`` already holds the mail as
    Maildirs (converted to ``mail_format`` before this yields)."""
    passwd = directory / "passwd"
    write_passwd_file(passwd, logins, password)
    server = start_dovecot(
        binary,
        passwd_file_passdb(passwd),
        directory=directory,
        tls=tls,
        mail_location=mail_location(mail_format),
        extra_config=extra_config,
    )
    try:
        if mail_format != "maildir":
            convert_maildirs(server, logins)
        yield server
    finally:
        server.stop()
