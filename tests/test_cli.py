"""The `mssd` command as an administrator uses it: real processes, real store."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PkiBundle

from mssd.cli import main
from mssd.store.accounts import StoreAccounts
from mssd.store.engine import create_engine
from mssd.store.mailstore import MailStore
from mssd.trust.identity import normalise_dn

NOW = dt.datetime(2026, 12, 20, 9, 30, tzinfo=dt.UTC)


class Cli:
    """Runs ``mssd`` the way a shell does, in-process to keep the suite fast:
    real argument parsing, real settings from the environment, real store."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.url = url
        self.workdir = workdir

    def __call__(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        environment = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("MSSD_") or k == "MSSD_REQUIRE_ALL"
        }
        environment.update({"MSSD_STORE_URL": self.url, "MSSD_AUTH_SCRYPT_N": "1024"})
        environment.update(env or {})
        out, err = io.StringIO(), io.StringIO()
        saved_env, saved_cwd, saved_stdin = dict(os.environ), os.getcwd(), sys.stdin
        os.environ.clear()
        os.environ.update(environment)
        os.chdir(self.workdir)
        sys.stdin = io.StringIO(stdin or "")
        status = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main(list(args))
                except SystemExit as exit_:
                    status = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            os.chdir(saved_cwd)
            sys.stdin = saved_stdin
        return subprocess.CompletedProcess(["mssd", *args], status, out.getvalue(), err.getvalue())

    def create_marie(self) -> None:
        self.ok(
            "mailbox",
            "create",
            "--type",
            "PER",
            "--idnat",
            "810001234567",
            "--address",
            "marie@clinique.mssd.test",
        )

    def create_accueil(self) -> None:
        self.ok(
            "mailbox",
            "create",
            "--type",
            "ORG",
            "--structure",
            "1750000000",
            "--address",
            "accueil@clinique.mssd.test",
        )

    def create_labo(self, test_pki: PkiBundle) -> None:
        self.ok(
            "mailbox",
            "create",
            "--type",
            "APP",
            "--cert-dn",
            test_pki.app.subject_dn,
            "--address",
            "labo@clinique.mssd.test",
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self(*args, stdin=stdin)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture
def cli(store_url: str, tmp_path: Path) -> Cli:
    tool = Cli(store_url, tmp_path)
    tool.ok("db", "upgrade")
    tool.ok("domain", "add", "clinique.mssd.test")
    return tool


def refused(result: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("mssd: "), result.stderr
    assert text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_store_without_schema(tmp_path: Path) -> None:
    tool = Cli(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", tmp_path)
    refused(tool("serve"), 1, "run `mssd db upgrade`")
    # The same, as a separate process started from a shell.
    result = subprocess.run(
        [sys.executable, "-m", "mssd", "serve"],
        cwd=tmp_path,
        env={**os.environ, "MSSD_STORE_URL": f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    refused(result, 1, "run `mssd db upgrade`")
    assert "up to date" not in tool("db", "status").stdout


def test_serve_stops_on_a_bad_setting(tmp_path: Path) -> None:
    tool = Cli(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tmp_path)
    refused(tool("serve", env={"MSSD_SMTP_MAX_MESSAGE_SIZE": "lots"}), 2, "smtp.max_message_size")


def test_domains(cli: Cli) -> None:
    refused(cli("domain", "add", "clinique.mssd.test"), 1, "already exists")
    refused(cli("domain", "add", "not a domain"), 2, "not a valid")
    assert cli.ok("domain", "list").split() == ["clinique.mssd.test"]


def test_create_each_mailbox_type(cli: Cli, test_pki: PkiBundle) -> None:
    cli.ok(
        "mailbox",
        "create",
        "--type",
        "PER",
        "--idnat",
        "810001234567",
        "--address",
        "Marie.Curie@Clinique.mssd.test",
        "--password-stdin",
        stdin="un mot de passe assez long\n",
    )
    cli.ok(
        "mailbox",
        "create",
        "--type",
        "ORG",
        "--structure",
        "1750000000",
        "--address",
        "secretariat@clinique.mssd.test",
    )
    cli.create_labo(test_pki)
    cli.ok(
        "mailbox",
        "create",
        "--type",
        "CAB",
        "--structure",
        "312345678901234",
        "--address",
        "cabinet@clinique.mssd.test",
    )
    listing = cli.ok("mailbox", "list")
    lines = {line.split("\t")[0]: line for line in listing.splitlines()}
    assert (
        "\tPER\tactive\towner=810001234567\tlogin=marie.curie@clinique.mssd.test"
        in lines["marie.curie@clinique.mssd.test"]
    )
    # The APP mailbox's owner comes from the OU of its certificate DN.
    assert "\tAPP\tactive\towner=1750000000" in lines["labo@clinique.mssd.test"]
    assert "\tCAB\tactive\towner=312345678901234" in lines["cabinet@clinique.mssd.test"]
    shown = cli.ok("mailbox", "show", "secretariat@clinique.mssd.test")
    assert "mailbox.show\tok\tactor=cli:" in cli.ok("audit", "--limit", "1")
    for folder in ("INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"):
        assert f"folder {folder}: uidvalidity=" in shown
    assert "0 message(s)" in shown


BAD_MAILBOXES = [
    (
        ["--type", "PER", "--idnat", "12345", "--address", "a@clinique.mssd.test"],
        2,
        "not an idNat_PS",
    ),
    (["--type", "PER", "--address", "a@clinique.mssd.test"], 2, "needs --idnat"),
    (["--type", "ORG", "--address", "a@clinique.mssd.test"], 2, "needs --structure"),
    (
        ["--type", "ORG", "--structure", "2750000000", "--address", "a@clinique.mssd.test"],
        2,
        "not an idNat_Struct",
    ),
    (["--type", "APP", "--address", "a@clinique.mssd.test"], 2, "needs --cert-dn"),
    (
        ["--type", "APP", "--cert-dn", "CN=x,,=", "--address", "a@clinique.mssd.test"],
        2,
        "--cert-dn",
    ),
    (
        [
            "--type",
            "APP",
            "--cert-dn",
            "CN=logiciel,O=Sans OU,C=FR",
            "--address",
            "a@clinique.mssd.test",
        ],
        2,
        "needs --structure",
    ),
    (
        ["--type", "PER", "--idnat", "810001234567", "--address", "pas une adresse"],
        2,
        "not a valid mail address",
    ),
    (
        ["--type", "PER", "--idnat", "810001234567", "--address", "a@ailleurs.mssd.test"],
        1,
        "domain ailleurs.mssd.test is not hosted here",
    ),
    (["--type", "XYZ", "--address", "a@clinique.mssd.test"], 2, "invalid choice"),
]


def test_bad_mailbox_input_is_named(cli: Cli) -> None:
    for args, status, text in BAD_MAILBOXES:
        result = cli("mailbox", "create", *args)
        assert result.returncode == status, (args, result.stderr)
        assert text in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert cli.ok("mailbox", "list") == ""


def test_duplicates_are_refused(cli: Cli, test_pki: PkiBundle) -> None:
    cli.create_marie()
    refused(
        cli(
            "mailbox",
            "create",
            "--type",
            "ORG",
            "--structure",
            "1750000000",
            "--address",
            "MARIE@clinique.mssd.test",
        ),
        1,
        "already exists",
    )
    cli.create_labo(test_pki)
    # The same DN written differently is the same DN (RFC 4514 comparison).
    respelled = normalise_dn(test_pki.app.subject_dn).upper().replace(",", " , ")
    refused(
        cli(
            "mailbox",
            "create",
            "--type",
            "APP",
            "--cert-dn",
            respelled,
            "--address",
            "labo2@clinique.mssd.test",
        ),
        1,
        "already registered",
    )


def test_delegation_and_states(cli: Cli) -> None:
    cli.create_marie()
    cli.create_accueil()
    refused(
        cli("mailbox", "grant", "marie@clinique.mssd.test", "accueil@clinique.mssd.test"),
        1,
        "only ORG and CAB mailboxes",
    )
    refused(
        cli("mailbox", "grant", "accueil@clinique.mssd.test", "nobody@clinique.mssd.test"),
        1,
        "no account with login",
    )
    refused(
        cli(
            "mailbox",
            "grant",
            "accueil@clinique.mssd.test",
            "marie@clinique.mssd.test",
            "--rights",
            "lrz",
        ),
        2,
        "RFC 4314 letters",
    )
    cli.ok(
        "mailbox",
        "grant",
        "accueil@clinique.mssd.test",
        "marie@clinique.mssd.test",
        "--rights",
        "lrs",
        "--no-send",
    )
    assert "delegates=marie@clinique.mssd.test:lrs" in cli.ok("mailbox", "list")
    cli.ok("mailbox", "suspend", "accueil@clinique.mssd.test")
    refused(cli("mailbox", "suspend", "accueil@clinique.mssd.test"), 1, "already suspended")
    cli.ok("mailbox", "reactivate", "accueil@clinique.mssd.test")
    cli.ok("mailbox", "close", "accueil@clinique.mssd.test")
    refused(cli("mailbox", "reactivate", "accueil@clinique.mssd.test"), 1, "is closed")
    refused(cli("mailbox", "suspend", "absent@clinique.mssd.test"), 1, "no mailbox")


def test_passwords_and_one_time_codes(cli: Cli) -> None:
    cli.create_marie()
    refused(
        cli("account", "passwd", "marie@clinique.mssd.test", "--password-stdin", stdin="court\n"),
        2,
        "at least 12 characters",
    )
    refused(cli("account", "passwd", "marie@clinique.mssd.test"), 2, "--password-stdin")
    cli.ok(
        "account",
        "passwd",
        "marie@clinique.mssd.test",
        "--password-stdin",
        stdin="un mot de passe assez long\n",
    )
    out = cli.ok("account", "totp", "marie@clinique.mssd.test")
    assert "otpauth://totp/" in out
    refused(
        cli(
            "account",
            "passwd",
            "nobody@clinique.mssd.test",
            "--password-stdin",
            stdin="un mot de passe assez long\n",
        ),
        1,
        "no account",
    )


def test_every_change_is_audited(cli: Cli) -> None:
    cli.create_marie()
    cli.create_accueil()
    cli.ok("mailbox", "grant", "accueil@clinique.mssd.test", "marie@clinique.mssd.test")
    cli.ok(
        "account",
        "passwd",
        "marie@clinique.mssd.test",
        "--password-stdin",
        stdin="un mot de passe assez long\n",
    )
    cli.ok("mailbox", "suspend", "accueil@clinique.mssd.test")
    actions = [line.split("\t")[1] for line in cli.ok("audit", "--limit", "20").splitlines()]
    assert actions == [
        "mailbox.suspended",
        "account.passwd",
        "mailbox.grant",
        "mailbox.create",
        "mailbox.create",
        "domain.add",
    ]
    assert "un mot de passe" not in cli.ok("audit")
    # A refused change leaves no audit line.
    cli("mailbox", "suspend", "accueil@clinique.mssd.test")
    assert len(cli.ok("audit", "--limit", "20").splitlines()) == 6


def test_quota_is_set_at_creation_changed_and_shown_with_the_usage(cli: Cli) -> None:
    address = "marie@clinique.mssd.test"
    created = cli.ok(
        "mailbox", "create", "--type", "PER", "--idnat", "810001234567", "--address", address,
        "--quota", "10K",
    )  # fmt: skip
    assert created == f"PER mailbox {address} created (owner 810001234567)\n"
    assert "quota: 0 KiB used of 10 KiB (0.0 %)\n" in cli.ok("mailbox", "show", address)

    async def append() -> None:
        engine = create_engine(cli.url)
        try:
            store = MailStore(engine)
            account = await StoreAccounts(engine).by_login(address)
            assert account is not None
            inbox = await store.folder(account.id, "INBOX")
            assert inbox is not None
            content = b"Subject: compte rendu\r\n\r\n" + b"x" * 2500
            await store.append(inbox.id, content, flags=frozenset(), internal_date=NOW)
        finally:
            await engine.dispose()

    asyncio.run(append())
    shown = cli.ok("mailbox", "show", address)
    assert "quota: 3 KiB used of 10 KiB (24.7 %)\n" in shown
    assert cli.ok("mailbox", "quota", address, "2MiB") == (
        f"mailbox {address}: 3 KiB used of 2048 KiB (0.1 %)\n"
    )
    assert (
        cli.ok("mailbox", "quota", address, "none") == f"mailbox {address}: 3 KiB used, no quota\n"
    )
    refused(cli("mailbox", "quota", address, "1,5G"), 2, "'1,5G' is not a size")
    refused(cli("mailbox", "quota", "absent@clinique.mssd.test", "1G"), 1, "no mailbox absent@")
    audit = cli.ok("audit", "--limit", "3").splitlines()
    assert [line.split("\t")[1] for line in audit] == [
        "mailbox.quota",
        "mailbox.quota",
        "mailbox.show",
    ]
