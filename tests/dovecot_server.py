"""A real Dovecot for the differential IMAP tests and the IMAP benchmark.

:func:`start_dovecot` runs ``dovecot -F`` (Debian's ``dovecot-imapd``, 2.3) with a
throwaway configuration whose state (``base_dir``, ``state_dir``, log, homes)
lives in one directory, on free loopback ports: a plain ``imap`` listener, and an
implicit-TLS ``imaps`` one when given a certificate. Everything not set in
:func:`dovecot_config` keeps Dovecot's own default (process model, login
processes, ``mail_fsync``, indexes), so what a benchmark measures is Dovecot as
an operator runs it.

As root, Dovecot refuses mail access as UID 0, so mail belongs to the ``dovecot``
user (or ``nobody``), which must be able to reach the directory; as another
user, everything runs as that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from server_processes import free_port, listening, stop_process

DEFAULT_INTERNAL_USER = "dovecot"
DEFAULT_LOGIN_USER = "dovenull"


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def mail_owner() -> pwd.struct_passwd:
    """The account Dovecot reads and writes mail as."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    return pwd.getpwnam(DEFAULT_INTERNAL_USER if _has_user(DEFAULT_INTERNAL_USER) else "nobody")


def static_passdb(password: str) -> str:
    """Every user name logs in with ``password``."""
    return f"driver = static\n  args = password={password}"


def passwd_file_passdb(path: Path) -> str:
    """Users and hashed passwords (``name:{SCHEME}hash`` lines) in ``path``."""
    return f"driver = passwd-file\n  args = {path}"


def dovecot_config(
    directory: Path,
    passdb: str,
    imap_port: int,
    tls: tuple[Path, Path, int] | None = None,
    mail_location: str = "maildir:~/Maildir",
) -> str:
    """Dovecot 2.3 settings with all state under ``directory`` (homes in ``home/``).

    ``tls``: certificate chain, key and port of an implicit-TLS listener;
    without it, TLS is off."""
    owner = mail_owner()
    lines = [
        f"base_dir = {directory}/run",
        f"state_dir = {directory}/state",
        f"log_path = {directory}/dovecot.log",
        "listen = 127.0.0.1",
        "protocols = imap",
        f"mail_location = {mail_location}",
        f"first_valid_uid = {min(owner.pw_uid, 500)}",
    ]
    if os.geteuid() == 0:
        login = DEFAULT_LOGIN_USER if _has_user(DEFAULT_LOGIN_USER) else owner.pw_name
    else:
        login = owner.pw_name
    if owner.pw_name != DEFAULT_INTERNAL_USER:
        lines.append(f"default_internal_user = {owner.pw_name}")
    if login != DEFAULT_LOGIN_USER:
        lines.append(f"default_login_user = {login}")
    if tls is None:
        lines.append("ssl = no")
    else:
        lines += [f"ssl_cert = <{tls[0]}", f"ssl_key = <{tls[1]}"]
    # Only root can chroot the login processes and the anvil (their default).
    chroot = "" if os.geteuid() == 0 else "  chroot =\n"
    return (
        "\n".join(lines)
        + f"""
passdb {{
  {passdb}
}}
userdb {{
  driver = static
  args = uid={owner.pw_uid} gid={owner.pw_gid} home={directory}/home/%u
}}
service imap-login {{
{chroot}  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = {0 if tls is None else tls[2]}
  }}
}}
service anvil {{
{chroot}}}
"""
    )


@dataclass
class Dovecot:
    directory: Path
    ports: dict[str, int]
    """Listener name (``imap``, ``imaps``) to loopback port."""
    process: subprocess.Popen[bytes]
    temporary: bool
    """Remove ``directory`` at :meth:`stop`."""

    @property
    def port(self) -> int:
        return self.ports["imap"]

    @property
    def log(self) -> Path:
        return self.directory / "dovecot.log"

    @property
    def config(self) -> Path:
        """The settings file, for ``doveadm -c``."""
        return self.directory / "dovecot.conf"

    def stop(self) -> None:
        stop_process(self.process)
        if self.temporary:
            shutil.rmtree(self.directory, ignore_errors=True)


def start_dovecot(
    binary: str,
    passdb: str,
    *,
    directory: Path | None = None,
    tls: tuple[Path, Path] | None = None,
    mail_location: str = "maildir:~/Maildir",
    extra_config: str = "",
) -> Dovecot:
    """Dovecot on free loopback ports, its state in ``directory`` (by default a new
    temporary one, removed at stop); ``extra_config`` is appended to the settings."""
    temporary = directory is None
    if directory is None:
        # Not under pytest's tmp_path: its parent is 0700 and the mail owner must reach it.
        directory = Path(tempfile.mkdtemp(prefix="mssd-dovecot-"))
        directory.chmod(0o755)
    else:
        directory.mkdir(mode=0o755, exist_ok=True)
    home = directory / "home"
    home.mkdir(exist_ok=True)
    owner = mail_owner()
    os.chown(home, owner.pw_uid, owner.pw_gid)
    ports = {"imap": free_port()}
    if tls is not None:
        ports["imaps"] = free_port()
    listener = None if tls is None else (*tls, ports["imaps"])
    config = directory / "dovecot.conf"
    settings = dovecot_config(directory, passdb, ports["imap"], listener, mail_location)
    config.write_text(settings + extra_config)
    with (directory / "stderr").open("wb") as stderr:
        process = subprocess.Popen(
            [binary, "-F", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=stderr
        )
    server = Dovecot(directory, ports, process, temporary)
    if listening(process, ports["imap"], 20):
        return server
    problems = (directory / "stderr").read_text(errors="replace")
    if server.log.exists():
        problems += server.log.read_text(errors="replace")[-3000:]
    server.stop()
    raise RuntimeError(f"Dovecot did not start:\n{problems}")
