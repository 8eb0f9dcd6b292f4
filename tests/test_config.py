"""Settings: the example file documents every key; bad values name the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

from mssd.config import ConfigError, Settings, all_keys, env_name, load

EXAMPLE = ROOT / "config" / "mssd.example.toml"


def test_example_file_lists_every_key_with_a_comment() -> None:
    document = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    listed = {(section, key) for section, table in document.items() for key in table}
    assert listed == set(all_keys())
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    key = re.compile(r"^[a-z_0-9]+ = ")
    for index, line in enumerate(lines):
        if key.match(line):
            above = index - 1
            while key.match(lines[above]):
                above -= 1
            assert lines[above].startswith("#"), f"{line!r} has no comment above it"


def test_example_file_loads_to_the_defaults() -> None:
    assert load(EXAMPLE, env={}) == Settings()


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "mssd.toml"
    config.write_text(
        '[smtp]\nmax_message_size = 1000\n[store]\nurl = "sqlite+aiosqlite:///x.db"\n'
    )
    settings = load(
        config,
        env={
            env_name("smtp", "max_message_size"): "2000",
            "MSSD_SERVER_TRUSTED_NETWORKS": "127.0.0.0/8, ::1/128",
            "MSSD_SMTP_MTA_REQUIRE_TLS": "false",
        },
    )
    assert settings.smtp.max_message_size == 2000
    assert settings.server.trusted_networks == ("127.0.0.0/8", "::1/128")
    assert settings.smtp.mta_require_tls is False
    assert settings.store.url == "sqlite+aiosqlite:///x.db"


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("[smtp]\nmax_message_size = 'big'\n", {}, "smtp.max_message_size: expected an integer"),
        ("", {"MSSD_SMTP_MAX_MESSAGE_SIZE": "-1"}, "smtp.max_message_size: must be greater than 0"),
        ("", {"MSSD_SMTP_MAX_MESSAGE_SIZE": "x"}, "(from MSSD_SMTP_MAX_MESSAGE_SIZE)"),
        (
            "[smtp]\nsubmission_listen = '127.0.0.1'\n",
            {},
            "smtp.submission_listen: expected HOST:PORT",
        ),
        ("[smtp]\nmax_mesage_size = 1\n", {}, "smtp.max_mesage_size: unknown setting"),
        ("[smpt]\n", {}, "smpt: unknown section"),
        ("", {"MSSD_SMTP_MAX_MESAGE_SIZE": "1"}, "MSSD_SMTP_MAX_MESAGE_SIZE: unknown environment"),
        ("[store]\nurl = 'mysql://x'\n", {}, "store.url: must start with"),
        ("[auth]\nscrypt_n = 1000\n", {}, "auth.scrypt_n: must be a power of two"),
        ("[auth]\npsc_issuer = 'https://psc'\n", {}, "auth.psc_issuer and auth.psc_jwks_url"),
        (
            "[auth]\npsc_issuer = 'x'\npsc_jwks_url = 'http://idp/jwks'\n",
            {},
            "auth.psc_jwks_url: must be an https:// URL",
        ),
        (
            "[server]\ntrusted_networks = ['10.0.0.0/33']\n",
            {},
            "server.trusted_networks: '10.0.0.0/33'",
        ),
        (
            "[smtp]\nproxy_protocol = true\n",
            {},
            "smtp.proxy_protocol_networks: list the load balancers' networks",
        ),
        (
            "",
            {"MSSD_SMTP_PROXY_PROTOCOL": "true", "MSSD_SMTP_PROXY_PROTOCOL_NETWORKS": "lb"},
            "smtp.proxy_protocol_networks: 'lb' is not an IP network",
        ),
        (
            "[smtp]\nproxy_protocol_timeout_seconds = 0.5\n",
            {},
            "smtp.proxy_protocol_timeout_seconds: must be 3 or more",
        ),
        (
            "[imap]\nproxy_protocol = true\n",
            {},
            "imap.proxy_protocol_networks: list the load balancers' networks",
        ),
        (
            "[imap]\nproxy_protocol_networks = ['balancer']\n",
            {},
            "imap.proxy_protocol_networks: 'balancer' is not an IP network",
        ),
        (
            "[imap]\nproxy_protocol_timeout_seconds = 1.0\n",
            {},
            "imap.proxy_protocol_timeout_seconds: must be 3 or more",
        ),
        (
            "[pki]\noperator_structure = '42'\n",
            {},
            "pki.operator_structure: '42' is not an idNat_Struct",
        ),
        ("[smtp]\nmta_require_tls = 'maybe'\n", {}, "smtp.mta_require_tls: expected true or false"),
        ("[smtp\n", {}, "is not valid TOML"),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, content: str, env: dict[str, str], message: str
) -> None:
    config = tmp_path / "mssd.toml"
    config.write_text(content)
    with pytest.raises(ConfigError) as error:
        load(config, env=env)
    assert message in str(error.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "absent.toml", env={})


def test_the_old_names_of_the_operator_cas_are_read_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "mssd.toml"
    config.write_text('[smtp]\nmta_client_ca_file = "igc-sante-org.pem"\n')
    settings = load(config, env={"MSSD_RELAY_CA_FILE": "igc-sante-org.pem"})
    assert settings.tls.operator_ca_file == Path("igc-sante-org.pem")
    assert [r.getMessage() for r in caplog.records] == [
        "smtp.mta_client_ca_file is deprecated: it is now tls.operator_ca_file",
        "MSSD_RELAY_CA_FILE is deprecated: it is now tls.operator_ca_file",
    ]
    # One setting for both directions: two old names that disagree cannot be merged.
    config.write_text('[smtp]\nmta_client_ca_file = "org.pem"\n[relay]\nca_file = "autre.pem"\n')
    with pytest.raises(ConfigError) as refused:
        load(config, env={})
    assert str(refused.value) == (
        "relay.ca_file: deprecated name of tls.operator_ca_file, which is set to another value"
    )
    assert load(EXAMPLE, env={}).tls.operator_ca_file is None
