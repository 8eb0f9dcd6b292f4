"""PLAIN and LOGIN through the Authenticator: passwords, one-time codes, rate limits, audit."""

from __future__ import annotations

import asyncio

import pytest
from auth_fakes import AuditList, Clock, MemoryAccounts
from conftest import loop_ticks

from mssd.auth import (
    AuthContext,
    Authenticator,
    Challenge,
    EncryptionRequired,
    ExchangeFinished,
    Failure,
    Success,
    UnknownMechanism,
    hash_password,
    passwords,
    totp_code,
)
from mssd.auth.model import StepResult
from mssd.config import AuthSettings
from mssd.store.records import Account

SETTINGS = AuthSettings(scrypt_n=2**10, failure_limit_per_account=3, failure_limit_per_address=6)
PASSWORD = "Tr0ub4dor&3"
TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
TLS = AuthContext(protocol="smtp", remote_ip="192.0.2.10", tls=True)


STORED = hash_password(PASSWORD, SETTINGS)
ALICE = Account(
    id=1,
    login="alice@example.mssante.fr",
    status="active",
    password_hash=STORED,
    idnat_ps="810002345678",
)
BOB = Account(
    id=2,
    login="bob@example.mssante.fr",
    status="active",
    password_hash=STORED,
    totp_secret=TOTP_SECRET,
)
CAROL = Account(id=3, login="carol@example.mssante.fr", status="suspended", password_hash=STORED)


def make(clock: Clock | None = None) -> tuple[Authenticator, MemoryAccounts, AuditList]:
    accounts = MemoryAccounts(ALICE, BOB, CAROL)
    audit = AuditList()
    auth = Authenticator(SETTINGS, accounts, audit, clock=clock or Clock())
    return auth, accounts, audit


async def plain(
    auth: Authenticator, login: str, secret: str, ctx: AuthContext = TLS, authzid: str = ""
) -> StepResult:
    exchange = auth.start("PLAIN", ctx)
    return await exchange.step(f"{authzid}\x00{login}\x00{secret}".encode())


async def test_plain_with_right_password_gives_principal() -> None:
    auth, _, audit = make()
    result = await plain(auth, "Alice@Example.MSSante.fr", PASSWORD)
    assert isinstance(result, Success)
    principal = result.principal
    assert (principal.account_id, principal.login, principal.mechanism) == (
        1,
        "alice@example.mssante.fr",
        "PLAIN",
    )
    assert principal.idnat_ps == "810002345678" and principal.expires_at is None
    [event] = audit.events
    assert (event.action, event.result, event.target, event.remote) == (
        "auth.success",
        "ok",
        "alice@example.mssante.fr",
        "192.0.2.10",
    )
    assert event.details == {"mechanism": "PLAIN", "protocol": "smtp"}


async def test_plain_without_initial_response_sends_empty_challenge() -> None:
    auth, _, _ = make()
    exchange = auth.start("plain", TLS)
    assert await exchange.step(None) == Challenge(b"")
    result = await exchange.step(f"\x00alice@example.mssante.fr\x00{PASSWORD}".encode())
    assert isinstance(result, Success)
    with pytest.raises(ExchangeFinished):
        await exchange.step(b"")


async def test_wrong_password_and_unknown_login_look_the_same_to_the_client() -> None:
    auth, _, audit = make()
    wrong = await plain(auth, "alice@example.mssante.fr", "guess")
    unknown = await plain(auth, "nobody@example.mssante.fr", "guess")
    again = await plain(auth, "nobody2@example.mssante.fr", "guess")
    assert wrong == unknown == again == Failure(reason="authentication failed", temporary=False)
    assert audit.results == ["bad-credentials", "unknown-account", "unknown-account"]
    assert [e.action for e in audit.events] == ["auth.failure"] * 3
    assert all("guess" not in repr(e) for e in audit.events)


async def test_login_mechanism_asks_username_then_password() -> None:
    auth, _, audit = make()
    exchange = auth.start("LOGIN", TLS)
    assert await exchange.step(None) == Challenge(b"Username:")
    assert await exchange.step(b"alice@example.mssante.fr") == Challenge(b"Password:")
    result = await exchange.step(PASSWORD.encode())
    assert isinstance(result, Success) and result.principal.mechanism == "LOGIN"

    exchange = auth.start("LOGIN", TLS)
    assert await exchange.step(b"alice@example.mssante.fr") == Challenge(b"Password:")
    assert await exchange.step(b"nope") == Failure("authentication failed", temporary=False)
    assert audit.results == ["ok", "bad-credentials"]
    assert PASSWORD not in repr(audit.events)


async def test_plain_authzid_other_than_login_is_refused() -> None:
    auth, _, audit = make()
    refused = await plain(
        auth, "alice@example.mssante.fr", PASSWORD, authzid="bob@example.mssante.fr"
    )
    assert isinstance(refused, Failure) and not refused.temporary
    assert audit.results == ["authzid-refused"]
    same = await plain(
        auth, "alice@example.mssante.fr", PASSWORD, authzid="ALICE@example.mssante.fr"
    )
    assert isinstance(same, Success)


@pytest.mark.parametrize(
    "raw",
    [b"alice@example.mssante.fr\x00" + PASSWORD.encode(), b"\x00alice\x00\xff\xfe", b""],
)
async def test_malformed_plain_is_reported_as_malformed(raw: bytes) -> None:
    auth, accounts, audit = make()
    result = await auth.start("PLAIN", TLS).step(raw)
    assert result == Failure(reason="malformed SASL response", temporary=False, malformed=True)
    assert audit.results == ["malformed"] and accounts.lookups == []


async def test_malformed_login_password_is_reported_as_malformed() -> None:
    auth, _, audit = make()
    exchange = auth.start("LOGIN", TLS)
    await exchange.step(b"alice@example.mssante.fr")
    result = await exchange.step(b"\xc3\x28")
    assert isinstance(result, Failure) and result.malformed
    assert audit.results == ["malformed"]


async def test_plaintext_mechanisms_need_tls_or_a_trusted_network() -> None:
    auth, _, _ = make()
    clear = AuthContext(protocol="smtp", remote_ip="192.0.2.10", tls=False)
    assert auth.mechanisms(clear) == []
    with pytest.raises(EncryptionRequired) as raised:
        auth.start("PLAIN", clear)
    assert raised.value.smtp_reply == (538, "5.7.11")
    with pytest.raises(EncryptionRequired):
        auth.start("LOGIN", clear)
    with pytest.raises(UnknownMechanism):
        auth.start("CRAM-MD5", TLS)
    with pytest.raises(UnknownMechanism):
        auth.start("XOAUTH2", TLS)  # no PSC issuer configured
    with pytest.raises(UnknownMechanism):
        auth.start("EXTERNAL", TLS)  # no client certificate

    proxied = AuthContext(protocol="imap", remote_ip="10.0.0.2", tls=False, trusted_network=True)
    assert auth.mechanisms(proxied) == ["PLAIN", "LOGIN"]
    assert isinstance(await plain(auth, "alice@example.mssante.fr", PASSWORD, proxied), Success)


async def test_suspended_account_fails_like_a_bad_password_but_is_audited_as_suspended() -> None:
    auth, _, audit = make()
    result = await plain(auth, "carol@example.mssante.fr", PASSWORD)
    assert result == Failure(reason="authentication failed", temporary=False)
    assert audit.results == ["suspended"]
    assert audit.events[0].target == "carol@example.mssante.fr"


async def test_plain_authzid_and_authcid_name_one_idn_login_however_typed() -> None:
    """A login with an A-label domain, typed with U-labels in one field and not the
    other: the same login, so no authzid refusal; looked up and audited as stored."""
    claire = Account(
        id=4, login="claire@xn--hpital-idn-rbb.mssd.test", status="active", password_hash=STORED
    )
    accounts = MemoryAccounts(claire)
    audit = AuditList()
    auth = Authenticator(SETTINGS, accounts, audit, clock=Clock())
    result = await plain(
        auth,
        "claire@xn--hpital-idn-rbb.mssd.test",
        PASSWORD,
        authzid="Claire@Hôpital-IDN.mssd.test",
    )
    assert isinstance(result, Success) and result.principal.login == claire.login
    result = await plain(auth, "claire@hôpital-idn.mssd.test", PASSWORD)
    assert isinstance(result, Success)
    assert accounts.lookups == [claire.login, claire.login]
    assert [e.actor for e in audit.events] == [claire.login, claire.login]


async def test_cancel_is_audited_as_failure() -> None:
    auth, _, audit = make()
    exchange = auth.start("LOGIN", TLS)
    await exchange.step(None)
    await exchange.step(b"alice@example.mssante.fr")
    exchange.cancel()
    await auth.close()
    assert audit.results == ["cancelled"]
    assert audit.events[0].actor == "alice@example.mssante.fr"
    assert audit.events[0].action == "auth.failure"


async def test_scrypt_does_not_block_the_event_loop() -> None:
    slow = AuthSettings(scrypt_n=2**15)
    account = Account(
        id=9, login="slow@example.fr", status="active", password_hash=hash_password("pw", slow)
    )
    auth = Authenticator(slow, MemoryAccounts(account), AuditList())
    async with loop_ticks(0.001) as ticks:
        result = await plain(auth, "slow@example.fr", "pw")
    assert isinstance(result, Success)
    assert ticks[0] > 3


# --- one-time codes -----------------------------------------------------------------------------


async def test_totp_account_needs_password_followed_by_current_code() -> None:
    clock = Clock()
    auth, _, audit = make(clock)
    code = totp_code(TOTP_SECRET, clock.now)

    assert isinstance(await plain(auth, "bob@example.mssante.fr", PASSWORD), Failure)
    result = await plain(auth, "bob@example.mssante.fr", PASSWORD + code)
    assert isinstance(result, Success)
    assert audit.results == ["missing-code", "ok"]
    assert code not in repr(audit.events)


async def test_totp_code_is_usable_once() -> None:
    clock = Clock()
    auth, _, audit = make(clock)
    code = totp_code(TOTP_SECRET, clock.now)
    assert isinstance(await plain(auth, "bob@example.mssante.fr", PASSWORD + code), Success)
    clock.now += 5  # same 30-second step
    replay = await plain(auth, "bob@example.mssante.fr", PASSWORD + code)
    assert replay == Failure(reason="authentication failed", temporary=False)
    assert audit.results == ["ok", "code-replayed"]
    clock.now += 30
    fresh = totp_code(TOTP_SECRET, clock.now)
    assert isinstance(await plain(auth, "bob@example.mssante.fr", PASSWORD + fresh), Success)


async def test_wrong_or_stale_totp_code_is_refused() -> None:
    clock = Clock()
    auth, _, audit = make(clock)
    stale = totp_code(TOTP_SECRET, clock.now - 120)
    current = totp_code(TOTP_SECRET, clock.now)
    wrong = f"{(int(current) + 1) % 1_000_000:06d}"
    assert isinstance(await plain(auth, "bob@example.mssante.fr", PASSWORD + wrong), Failure)
    assert isinstance(await plain(auth, "bob@example.mssante.fr", PASSWORD + stale), Failure)
    assert audit.results == ["bad-code", "bad-code"]


async def test_code_from_previous_step_is_accepted_within_window() -> None:
    clock = Clock()
    auth, _, _ = make(clock)
    previous = totp_code(TOTP_SECRET, clock.now - 30)
    assert isinstance(await plain(auth, "bob@example.mssante.fr", PASSWORD + previous), Success)


async def test_right_code_with_wrong_password_does_not_burn_the_code() -> None:
    clock = Clock()
    auth, accounts, audit = make(clock)
    code = totp_code(TOTP_SECRET, clock.now)
    assert isinstance(await plain(auth, "bob@example.mssante.fr", "wrong" + code), Failure)
    assert accounts.last_step == {}
    assert isinstance(await plain(auth, "bob@example.mssante.fr", PASSWORD + code), Success)
    assert audit.results == ["bad-credentials", "ok"]


# --- rate limits --------------------------------------------------------------------------------


async def test_account_limit_refuses_temporarily_without_checking_credentials() -> None:
    clock = Clock()
    auth, accounts, audit = make(clock)
    for i in range(3):
        ctx = AuthContext(protocol="imap", remote_ip=f"198.51.100.{i}", tls=True)
        assert isinstance(await plain(auth, "alice@example.mssante.fr", "guess", ctx), Failure)
    lookups = len(accounts.lookups)

    limited = await plain(auth, "ALICE@example.mssante.fr", PASSWORD)
    assert limited == Failure(reason="too many failed attempts, try again later", temporary=True)
    assert len(accounts.lookups) == lookups  # the right password was not even looked at
    assert audit.results[-1] == "rate-limited"
    assert audit.events[-1].action == "auth.failure"

    # Other accounts from the same address are unaffected.
    assert isinstance(await plain(auth, "carol@example.mssante.fr", "x"), Failure)
    assert not audit.events[-1].result == "rate-limited"

    clock.now += SETTINGS.failure_window_seconds + 1
    assert isinstance(await plain(auth, "alice@example.mssante.fr", PASSWORD), Success)


async def test_address_limit_covers_every_login_from_that_address() -> None:
    clock = Clock()
    auth, accounts, audit = make(clock)
    attacker = AuthContext(protocol="smtp", remote_ip="203.0.113.7", tls=True)
    for i in range(6):
        await plain(auth, f"user{i}@example.mssante.fr", "guess", attacker)
    lookups = len(accounts.lookups)
    result = await plain(auth, "alice@example.mssante.fr", PASSWORD, attacker)
    assert isinstance(result, Failure) and result.temporary
    assert len(accounts.lookups) == lookups
    assert audit.results[-1] == "rate-limited"
    # Another address can still log in to the same account.
    assert isinstance(await plain(auth, "alice@example.mssante.fr", PASSWORD), Success)


async def test_success_resets_the_account_count_but_not_the_address_count() -> None:
    clock = Clock()
    auth, _, _ = make(clock)
    for _ in range(2):
        await plain(auth, "alice@example.mssante.fr", "guess")
    assert isinstance(await plain(auth, "alice@example.mssante.fr", PASSWORD), Success)
    for _ in range(2):
        await plain(auth, "alice@example.mssante.fr", "guess")
    # 4 failures in total: above the account limit of 3 had success not reset it.
    assert isinstance(await plain(auth, "alice@example.mssante.fr", PASSWORD), Success)
    assert auth.limiter.address_failures("192.0.2.10") == 4


@pytest.fixture
def scrypt_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords scrypt is run for, in order (the real verification, counted)."""
    runs: list[str] = []
    real = passwords.verify_password_async

    async def counted(password: str, stored: str) -> bool:
        runs.append(password)
        return await real(password, stored)

    monkeypatch.setattr(passwords, "verify_password_async", counted)
    return runs


async def test_a_verified_password_skips_scrypt_until_it_expires_or_changes(
    scrypt_runs: list[str],
) -> None:
    runs = scrypt_runs
    now = [1000.0]
    cache = passwords.VerifiedPasswords(300, clock=lambda: now[0])
    assert await cache.verify(PASSWORD, STORED)
    assert await cache.verify(PASSWORD, STORED)
    assert runs == [PASSWORD]  # the second login ran no scrypt
    # A wrong password is never remembered, and always pays scrypt.
    assert not await cache.verify("wrong", STORED)
    assert not await cache.verify("wrong", STORED)
    assert runs == [PASSWORD, "wrong", "wrong"]
    # A new stored hash (password changed or reset) misses at once.
    renewed = hash_password(PASSWORD, SETTINGS)
    assert await cache.verify(PASSWORD, renewed)
    assert runs[-1] == PASSWORD and len(runs) == 4
    # Past the period, scrypt runs again.
    now[0] += 301
    assert await cache.verify(PASSWORD, STORED)
    assert len(runs) == 5
    # The cache keeps digests, never the password.
    assert all(PASSWORD.encode() not in key for key in cache._entries)
    # 0 keeps nothing.
    off = passwords.VerifiedPasswords(0)
    assert await off.verify(PASSWORD, STORED) and await off.verify(PASSWORD, STORED)
    assert len(runs) == 7


async def test_logins_with_one_password_at_the_same_moment_share_one_scrypt(
    scrypt_runs: list[str],
) -> None:
    runs = scrypt_runs
    cache = passwords.VerifiedPasswords(300)
    # A client opening five connections at once: one scrypt, five answers.
    assert await asyncio.gather(*(cache.verify(PASSWORD, STORED) for _ in range(5))) == [True] * 5
    assert runs == [PASSWORD]
    # The same wrong password at once: one scrypt, every try refused, nothing kept.
    assert await asyncio.gather(*(cache.verify("wrong", STORED) for _ in range(3))) == [False] * 3
    assert runs == [PASSWORD, "wrong"]
    assert not await cache.verify("wrong", STORED)
    assert runs == [PASSWORD, "wrong", "wrong"]
    # Different passwords at once each pay their own.
    assert await asyncio.gather(cache.verify("one", STORED), cache.verify("two", STORED)) == [
        False,
        False,
    ]
    assert sorted(runs[3:]) == ["one", "two"]
    # The first login given up (its client gone): the others still get the answer,
    # which is then kept.
    fresh = passwords.VerifiedPasswords(300)
    first = asyncio.create_task(fresh.verify(PASSWORD, STORED))
    await asyncio.sleep(0)
    second = asyncio.create_task(fresh.verify(PASSWORD, STORED))
    await asyncio.sleep(0)
    first.cancel()
    assert await second
    assert first.cancelled()
    assert len(runs) == 6
    assert await fresh.verify(PASSWORD, STORED) and len(runs) == 6
    assert not fresh._running
