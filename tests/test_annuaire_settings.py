"""``mssd annuaire set``: what the directory settings of our mailboxes accept, through
the real command line on both stores. A refused value names the field and the rule,
exits with status 2, and leaves the stored settings and the audit trail as they were."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_cli import Cli

from mssd.store.annuaire import PublishedMailbox, our_mailboxes
from mssd.store.engine import create_engine

OURS = "ours.mssd.test"
ACCUEIL = f"accueil@{OURS}"
IDN_DOMAIN = "hôpital-annuaire.mssd.test"
IDN_A_LABEL = "xn--hpital-annuaire-csb.mssd.test"


@pytest.fixture
def cli(store_url: str, tmp_path: Path) -> Cli:
    cli = Cli(store_url, tmp_path)
    cli.ok("db", "upgrade")
    cli.ok("domain", "add", OURS)
    cli.ok("mailbox", "create", "--type", "ORG", "--structure", "1990000009", "--address", ACCUEIL)
    return cli


def stored(cli: Cli, address: str = ACCUEIL) -> PublishedMailbox:
    async def read() -> list[PublishedMailbox]:
        engine = create_engine(cli.url)
        try:
            return await our_mailboxes(engine)
        finally:
            await engine.dispose()

    return next(m for m in asyncio.run(read()) if m.address == address)


def settings_audit(cli: Cli) -> list[str]:
    return cli.ok("audit", "--action", "annuaire.settings").splitlines()


def refused(cli: Cli, *args: str) -> str:
    result = cli("annuaire", "set", ACCUEIL, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("mssd: ") and result.stderr.endswith("; nothing was changed\n")
    return result.stderr


def test_a_phone_too_long_for_its_column_is_refused_and_nothing_is_written(cli: Cli) -> None:
    cli.ok("annuaire", "set", ACCUEIL, "--phone", "01 02 03 04 05", "--service", "Accueil")
    before = stored(cli)
    audit = settings_audit(cli)
    # 65 characters: one more than annuaire_mailbox_settings.phone holds. PostgreSQL
    # used to fail with a raw DataError; SQLite stored it whole.
    too_long = "01 02 03 04 05 " * 4 + "06789"
    assert len(too_long) == 65
    message = refused(cli, "--phone", too_long, "--service", "Cardiologie")
    assert "phone is 65 characters long, at most 64 fit" in message
    # Neither the phone nor the other setting given with it changed.
    assert stored(cli) == before
    assert settings_audit(cli) == audit
    # 64 characters fit.
    cli.ok("annuaire", "set", ACCUEIL, "--phone", too_long[:64])
    assert stored(cli).phone == too_long[:64]


@pytest.mark.parametrize(
    "phone",
    ["01 23 abc", "tel:0123456789", "33+1 23 45 67 89", "++33 1 23 45 67 89", "- . ( )", "0123;4"],
)
def test_a_phone_must_look_like_one(cli: Cli, phone: str) -> None:
    message = refused(cli, "--phone", phone)
    assert f"phone {phone!r} is not a telephone number" in message
    assert stored(cli).phone is None


def test_phone_numbers_as_people_write_them_are_kept(cli: Cli) -> None:
    for phone in ("+33 (0)1 23-45-67-89", "01.23.45.67.89", "0123456789"):
        out = cli.ok("annuaire", "set", ACCUEIL, "--phone", f" {phone} ")
        assert f"phone={phone}\n" in out
        assert stored(cli).phone == phone


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--description", "Accueil\nDeuxième ligne", "description contains a control character"),
        ("--responsible", "Dr\tResponsable", "responsible contains a control character"),
        ("--service", "Cardiologie\x7f", "service contains a control character"),
        # What Python makes of a command-line argument that is not UTF-8.
        ("--service", "Cardiologie \udce9", "service is not valid UTF-8 text"),
    ],
)
def test_text_settings_are_one_line_of_valid_text(
    cli: Cli, option: str, value: str, reason: str
) -> None:
    before = stored(cli)
    assert reason in refused(cli, option, value)
    assert stored(cli) == before
    assert settings_audit(cli) == []


def test_an_empty_text_clears_the_setting(cli: Cli) -> None:
    cli.ok("annuaire", "set", ACCUEIL, "--phone", "0102030405", "--description", "Accueil")
    out = cli.ok("annuaire", "set", ACCUEIL, "--phone", "", "--description", " ")
    assert out.endswith("changed: description=, phone=\n")
    after = stored(cli)
    assert (after.phone, after.description) == (None, None)


def test_a_mailbox_of_an_idn_domain_is_found_as_typed(cli: Cli) -> None:
    cli.ok("domain", "add", IDN_DOMAIN)
    cli.ok(
        "mailbox", "create", "--type", "ORG", "--structure", "1990000009",
        "--address", f"secretariat@{IDN_DOMAIN}",
    )  # fmt: skip
    out = cli.ok("annuaire", "set", f"Secretariat@{IDN_DOMAIN}", "--phone", "0102030405")
    assert out == f"directory settings of secretariat@{IDN_A_LABEL} changed: phone=0102030405\n"
    assert stored(cli, f"secretariat@{IDN_A_LABEL}").phone == "0102030405"
