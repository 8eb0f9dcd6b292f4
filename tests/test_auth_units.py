"""Pure parts of mssd.auth: SASL message parsing, passwords, one-time codes, rate windows."""

from __future__ import annotations

import base64
import json
import re

import pytest
from auth_fakes import Clock

from mssd.auth.passwords import PasswordHashError, hash_password, verify_password
from mssd.auth.ratelimit import AuthRateLimiter, FailureWindow, address_key
from mssd.auth.sasl import (
    SaslMalformed,
    bearer_error_challenge,
    parse_external,
    parse_oauthbearer,
    parse_plain,
    parse_xoauth2,
)
from mssd.auth.totp import (
    generate_totp_secret,
    hotp,
    matching_step,
    provisioning_uri,
    split_password_and_code,
    totp_code,
)
from mssd.config import AuthSettings

FAST = AuthSettings(scrypt_n=2**10)


# --- SASL messages ------------------------------------------------------------------------------


def test_plain_message_splits_into_three_fields() -> None:
    message = parse_plain(b"\x00dr.martin@example.mssante.fr\x00s\xc3\xa9same")
    assert (message.authzid, message.authcid, message.password) == (
        "",
        "dr.martin@example.mssante.fr",
        "sésame",
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"alice\x00secret",  # one NUL
        b"\x00alice\x00secret\x00more",  # three NULs
        b"\x00\x00secret",  # empty authcid
        b"\x00alice\x00",  # empty password
        b"\x00al\xffice\x00secret",  # not UTF-8
        b"",
    ],
)
def test_plain_message_without_the_right_shape_is_malformed(raw: bytes) -> None:
    with pytest.raises(SaslMalformed):
        parse_plain(raw)


def test_xoauth2_message_gives_user_and_token() -> None:
    message = parse_xoauth2(b"user=alice@example.fr\x01auth=Bearer abc.def-ghi_jkl\x01\x01")
    assert (message.user, message.token) == ("alice@example.fr", "abc.def-ghi_jkl")


def test_oauthbearer_message_decodes_gs2_authzid_escapes() -> None:
    raw = b"n,a=we=2Cird=3Dname,\x01host=mail.example\x01port=993\x01auth=Bearer tok\x01\x01"
    message = parse_oauthbearer(raw)
    assert (message.user, message.token) == ("we,ird=name", "tok")


def test_oauthbearer_without_authzid_is_accepted() -> None:
    message = parse_oauthbearer(b"n,,\x01auth=bearer tok==\x01\x01")
    assert (message.user, message.token) == ("", "tok==")


@pytest.mark.parametrize(
    "raw",
    [
        b"p=tls-unique,,\x01auth=Bearer t\x01\x01",  # channel binding requested
        b"n,a=x\x01auth=Bearer t\x01\x01",  # gs2 header not closed
        b"n,,\x01auth=Bearer t\x01",  # single final separator
        b"n,,\x01auth=Basic dXNlcg==\x01\x01",  # not a bearer token
        b"n,,\x01auth=Bearer \x01\x01",  # empty token
        b"n,a=bad=41,\x01auth=Bearer t\x01\x01",  # bad escape
        b"n,,\x01auth=Bearer t\x01auth=Bearer u\x01\x01",  # repeated key
    ],
)
def test_oauthbearer_malformed_messages_are_refused(raw: bytes) -> None:
    with pytest.raises(SaslMalformed):
        parse_oauthbearer(raw)


def test_xoauth2_requires_user() -> None:
    with pytest.raises(SaslMalformed):
        parse_xoauth2(b"auth=Bearer tok\x01\x01")


def test_external_authzid_is_utf8_without_nul() -> None:
    assert parse_external(b"") == ""
    assert parse_external(b"labo@example.fr") == "labo@example.fr"
    with pytest.raises(SaslMalformed):
        parse_external(b"a\x00b")


def test_bearer_error_challenges_are_json() -> None:
    oauthbearer = json.loads(
        bearer_error_challenge(xoauth2=False, scope="openid", openid_configuration="https://i/x")
    )
    assert oauthbearer == {
        "status": "invalid_token",
        "schemes": "bearer",
        "scope": "openid",
        "openid-configuration": "https://i/x",
    }
    xoauth2 = json.loads(
        bearer_error_challenge(xoauth2=True, scope="openid", openid_configuration="")
    )
    assert xoauth2["status"] == "401" and xoauth2["schemes"] == "bearer"


# --- passwords ----------------------------------------------------------------------------------


def test_password_hash_has_the_documented_format() -> None:
    stored = hash_password("correct horse", FAST)
    match = re.fullmatch(r"\$scrypt\$ln=10,r=8,p=1\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)", stored)
    assert match is not None
    salt = base64.b64decode(match[1] + "=" * (-len(match[1]) % 4))
    key = base64.b64decode(match[2] + "=" * (-len(match[2]) % 4))
    assert (len(salt), len(key)) == (16, 32)
    assert hash_password("correct horse", FAST) != stored  # fresh salt each time


def test_password_verifies_after_scrypt_settings_change() -> None:
    old = hash_password("correct horse", AuthSettings(scrypt_n=2**10, scrypt_r=4))
    new_settings = AuthSettings(scrypt_n=2**11, scrypt_r=8)
    assert hash_password("x", new_settings).startswith("$scrypt$ln=11,r=8,p=1$")
    assert verify_password("correct horse", old)
    assert not verify_password("correct horsE", old)


def test_password_compares_in_unicode_nfc() -> None:
    stored = hash_password("caf\u00e9", FAST)  # é precomposed
    assert verify_password("cafe\u0301", stored)  # e + combining acute, as macOS types it


@pytest.mark.parametrize(
    "stored",
    [
        "plaintext",
        "$scrypt$ln=10,r=8,p=1$c2FsdA",
        "$scrypt$ln=40,r=8,p=1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5",
        "$scrypt$ln=10,r=8,p=1$!!$a2V5",
    ],
)
def test_unreadable_stored_hash_raises(stored: str) -> None:
    with pytest.raises(PasswordHashError):
        verify_password("x", stored)


# --- one-time codes -----------------------------------------------------------------------------

RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()


def test_hotp_matches_rfc_4226_appendix_d() -> None:
    expected = ["755224", "287082", "359152", "969429", "338314"]
    assert [hotp(b"12345678901234567890", i) for i in range(5)] == expected


@pytest.mark.parametrize(
    ("at", "code"),
    [(59, "287082"), (1111111109, "081804"), (1234567890, "005924"), (2000000000, "279037")],
)
def test_totp_matches_rfc_6238_appendix_b_sha1(at: int, code: str) -> None:
    # Appendix B lists 8 digits; the 6-digit code is its last six.
    assert totp_code(RFC_SECRET, at) == code


def test_totp_window_accepts_one_step_of_drift_either_side() -> None:
    now = 1_700_000_000.0
    secret = generate_totp_secret()
    assert len(secret) == 32
    assert matching_step(secret, totp_code(secret, now - 30), now, 1) == int(now // 30) - 1
    assert matching_step(secret, totp_code(secret, now + 30), now, 1) == int(now // 30) + 1
    assert matching_step(secret, totp_code(secret, now - 90), now, 1) is None
    assert matching_step(secret.lower(), totp_code(secret, now), now, 0) == int(now // 30)


def test_password_and_code_split_on_the_last_six_digits() -> None:
    assert split_password_and_code("s3cret123456") == ("s3cret", "123456")
    assert split_password_and_code("123456") is None
    assert split_password_and_code("s3cret12345x") is None


def test_provisioning_uri_names_issuer_and_account() -> None:
    uri = provisioning_uri("JBSWY3DPEHPK3PXP", "dr.martin@example.fr")
    assert uri.startswith("otpauth://totp/mssd:dr.martin@example.fr?")
    assert "secret=JBSWY3DPEHPK3PXP" in uri and "issuer=mssd" in uri
    assert "digits=6" in uri and "period=30" in uri and "algorithm=SHA1" in uri


# --- rate windows -------------------------------------------------------------------------------


def test_failure_window_slides() -> None:
    clock = Clock()
    window = FailureWindow(3, 60, clock=clock)
    for _ in range(3):
        window.record("k")
        clock.now += 10
    assert window.exceeded("k")
    clock.now += 31  # the first failure is now 61 s old
    assert not window.exceeded("k")
    assert window.count("k") == 2


def test_failure_window_memory_is_bounded() -> None:
    clock = Clock()
    window = FailureWindow(2, 60, clock=clock, max_keys=100)
    for i in range(1000):
        window.record(f"key{i}")
    assert len(window) == 100
    assert window.count("key999") == 1 and window.count("key0") == 0
    clock.now += 61
    window.record("fresh")
    assert len(window) == 1  # expired keys pruned


def test_ipv6_addresses_are_counted_per_slash_64() -> None:
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_success_resets_account_but_not_address() -> None:
    clock = Clock()
    limiter = AuthRateLimiter(
        AuthSettings(failure_limit_per_account=2, failure_limit_per_address=3), clock=clock
    )
    limiter.failure("Alice", "192.0.2.1")
    limiter.failure("alice", "192.0.2.1")
    assert limiter.limited("ALICE", "192.0.2.9") == "account"
    limiter.success("alice")
    assert limiter.limited("alice", "192.0.2.9") is None
    limiter.failure("bob", "192.0.2.1")
    assert limiter.limited("carol", "192.0.2.1") == "address"
