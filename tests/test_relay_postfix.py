"""Interoperability with an MTA nobody here wrote: Debian's Postfix as another operator of
the trust space. Throwaway configuration (never /etc/postfix), loopback ports, server and
client certificates from the development PKI, ``smtpd_tls_req_ccert = yes`` and a client
that presents its certificate. Mail flows mssd → Postfix and Postfix → mssd, with
delivery reports both ways; a Postfix client certificate that is not whitelisted is
refused. On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MssdProcess, PkiBundle, require_program, run, store_url_for, unavailable
from relay_helpers import (
    Operator,
    free_port,
    make_operator,
    messages,
    seed_operator,
    start_operator,
    submit,
    wait_for,
    wait_messages,
)

from mssd.trust import pki

P_DOMAIN = "postfix-p.mssd.test"

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
127.0.0.1:{inject} inet n - n - - smtpd
  -o smtpd_tls_security_level=none
  -o smtpd_tls_ask_ccert=no
  -o smtpd_tls_req_ccert=no
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
badsmtp   unix  - - n - - smtp
  -o smtp_tls_cert_file={directory}/bad.pem
  -o smtp_tls_key_file={directory}/bad.key
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {directory}/queue
data_directory = {directory}/data
meta_directory = /etc/postfix
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
mail_owner = postfix
setgid_group = postdrop
maillog_file = {directory}/maillog
maillog_file_prefixes = {directory}
myhostname = mx.{domain}
mydomain = {domain}
myorigin = $mydomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
smtpd_peername_lookup = no
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {directory}/mail
virtual_mailbox_maps = inline:{{ docteur@{domain}=docteur/ }}
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
transport_maps = inline:{{ refuse@{a_domain}=badsmtp:[127.0.0.1]:{a_port},
  {a_domain}=smtp:[127.0.0.1]:{a_port} }}
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
# The operator's server: TLS and a client certificate from every peer.
smtpd_tls_cert_file = {directory}/server.pem
smtpd_tls_key_file = {directory}/server.key
smtpd_tls_CAfile = {directory}/ca.pem
smtpd_tls_security_level = encrypt
smtpd_tls_ask_ccert = yes
smtpd_tls_req_ccert = yes
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
smtpd_tls_mandatory_protocols = >=TLSv1.2
# The operator's client: TLS required, presenting its certificate.
smtp_tls_security_level = encrypt
smtp_tls_CAfile = {directory}/ca.pem
smtp_tls_cert_file = {directory}/server.pem
smtp_tls_key_file = {directory}/server.key
smtp_tls_loglevel = 1
smtp_tls_mandatory_protocols = >=TLSv1.2
"""


@dataclass
class PostfixOperator:
    directory: Path
    port: int
    inject: int

    def log(self) -> str:
        path = self.directory / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def mailbox(self) -> list[bytes]:
        folder = self.directory / "mail" / "docteur" / "new"
        if not folder.is_dir():
            return []
        return [path.read_bytes() for path in sorted(folder.iterdir())]


def _start_postfix(
    postfix: str, cert: pki.IssuedCertificate, bad: pki.IssuedCertificate, ca: Path, a: Operator
) -> PostfixOperator:
    # Postfix's daemons run as the postfix user: a directory they can reach, not pytest's
    # 0700 temporary tree.
    directory = Path(tempfile.mkdtemp(prefix="mssd-postfix-"))
    directory.chmod(0o755)
    for source, name in (
        (cert.cert, "server.pem"),
        (cert.key, "server.key"),
        (bad.cert, "bad.pem"),
        (bad.key, "bad.key"),
        (ca, "ca.pem"),
    ):
        shutil.copy(source, directory / name)
    for name in ("queue", "data", "mail"):
        (directory / name).mkdir()
    shutil.chown(directory / "data", "postfix")
    os.chown(directory / "mail", 65534, 65534)
    operator = PostfixOperator(directory, free_port(), free_port())
    values = {
        "directory": directory,
        "domain": P_DOMAIN,
        "a_domain": a.domain,
        "a_port": a.mta_port,
        "port": operator.port,
        "inject": operator.inject,
    }
    (directory / "main.cf").write_text(MAIN_CF.format(**values))
    (directory / "master.cf").write_text(MASTER_CF.format(**values))
    started = subprocess.run(
        [postfix, "-c", str(directory), "start"], capture_output=True, text=True, timeout=60
    )
    if started.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"postfix did not start: {started.stdout}{started.stderr}")
    wait_for(lambda: _listening(operator.port), 20, "postfix listening")
    return operator


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _stop_postfix(postfix: str, operator: PostfixOperator) -> None:
    subprocess.run(
        [postfix, "-c", str(operator.directory), "stop"], capture_output=True, timeout=60
    )
    shutil.rmtree(operator.directory, ignore_errors=True)


@dataclass
class Interop:
    a: MssdProcess
    op_a: Operator
    postfix: PostfixOperator


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def interop(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[Interop]:
    postfix = require_program("postfix")
    if os.geteuid() != 0:
        unavailable("Postfix's master must be started as root")
    dev = test_pki.dev
    op_a = make_operator(dev, "A", "operateur-a.mssd.test", "1750000031", request.param)
    p_cert = make_operator(dev, "P", P_DOMAIN, "1750000032", request.param).cert
    # Same CN as P's, another organisation: not in A's whitelist.
    bad = make_operator(dev, "Pbad", P_DOMAIN, "1750000033", request.param).cert
    op_p = Operator("P", P_DOMAIN, "1750000032", p_cert)
    base = tmp_path_factory.mktemp(f"postfix-{request.param}")
    generator = store_url_for(request.param, base)
    url = next(generator)
    server: MssdProcess | None = None
    operator: PostfixOperator | None = None
    try:
        run(seed_operator(url, op_a, ("docteur",)))
        operator = _start_postfix(postfix, p_cert, bad, dev.ca_bundle, op_a)
        op_p.mta_port = operator.port
        server = start_operator(
            op_a, url, test_pki, base / "a", whitelisted=[op_a, op_p], routes=[op_p]
        )
        yield Interop(server, op_a, operator)
    finally:
        if server is not None:
            server.stop()
        if operator is not None:
            _stop_postfix(postfix, operator)
        for _ in generator:
            pass


def _action(report: bytes) -> str | None:
    found = re.search(rb"^Action: *(\w+)", report, re.M | re.I)
    return found[1].decode().lower() if found else None


def test_mssd_to_postfix_with_a_success_report(interop: Interop) -> None:
    a_user = interop.op_a.user()
    target = f"docteur@{P_DOMAIN}"
    body = (
        f"From: <{a_user}>\nTo: <{target}>\nSubject: vers postfix\nX-MSS-NIL: test/1\n\nBonjour\n"
    )
    code, _ = submit(interop.a, a_user, [(target, "NOTIFY=SUCCESS")], body.encode(), "ENVID=pf1")
    assert code == 250
    [delivered] = wait_for(interop.postfix.mailbox, 30, "delivery into Postfix's mailbox")
    assert b"X-MSS-NIL: test/1" in delivered
    # Postfix verified mssd's client certificate (smtpd_tls_received_header).
    head = delivered.split(b"\n\n")[0].replace(b"\n\t", b" ").replace(b"\n ", b" ")
    assert re.search(rb"Client CN \"mx\.operateur-a\.mssd\.test\".*verified OK", head), head
    # Postfix answers NOTIFY=SUCCESS with its own report, sent back to mssd over TLS.
    [report] = wait_messages(interop.a, a_user, 1)
    assert b"multipart/report" in report and _action(report) == "delivered"
    assert b"\r\nOriginal-Envelope-Id: pf1\r\n" in report


def test_postfix_to_mssd_with_a_success_report(interop: Interop) -> None:
    a_user = interop.op_a.user("docteur")
    before = len(messages(interop.a, a_user))
    sender = f"docteur@{P_DOMAIN}"
    with smtplib.SMTP("127.0.0.1", interop.postfix.inject, timeout=30) as client:
        client.ehlo("injecteur.local")
        assert client.docmd("MAIL", f"FROM:<{sender}> RET=HDRS")[0] == 250
        assert client.docmd("RCPT", f"TO:<{a_user}> NOTIFY=SUCCESS")[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(
            f"From: <{sender}>\r\nTo: <{a_user}>\r\nSubject: depuis postfix\r\n"
            "X-MSS-INS: 123^1.2.250.1.213.1.4.10\r\n\r\nBonjour mssd\r\n.\r\n".encode()
        )
        assert client.getreply()[0] == 250
    found = wait_for(
        lambda: [m for m in messages(interop.a, a_user)[before:] if b"depuis postfix" in m],
        30,
        "Postfix's message in mssd",
    )
    assert b"X-MSS-INS: 123^1.2.250.1.213.1.4.10" in found[0]
    assert b"with ESMTPS" in found[0]
    # mssd reports the local delivery; the report goes to Postfix over mutual TLS.
    reports = wait_for(
        lambda: [m for m in interop.postfix.mailbox() if b"multipart/report" in m],
        30,
        "mssd's report in Postfix's mailbox",
    )
    assert _action(reports[0]) == "delivered"
    assert f"Reporting-MTA: dns; {interop.op_a.host}".encode() in reports[0]


def test_postfix_with_a_certificate_not_whitelisted_is_refused(interop: Interop) -> None:
    sender = f"docteur@{P_DOMAIN}"
    target = f"refuse@{interop.op_a.domain}"
    with smtplib.SMTP("127.0.0.1", interop.postfix.inject, timeout=30) as client:
        client.sendmail(sender, [target], f"Subject: refus\r\nTo: <{target}>\r\n\r\nx\r\n")
    line = wait_for(
        lambda: [
            ln for ln in interop.postfix.log().splitlines() if target in ln and "status=" in ln
        ],
        30,
        "Postfix's outcome for the refused message",
    )[0]
    assert "status=bounced" in line and "550 5.7.1" in line and "not listed" in line
