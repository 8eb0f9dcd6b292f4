"""Settings: one TOML file plus ``MSSD_*`` environment overrides, validated at start.

This module owns the list of every setting, its type, default and meaning. The
rest of the code receives a validated :class:`Settings` object and never reads the
environment or the file itself. ``config/mssd.example.toml`` documents every key;
a test keeps the two in agreement.

Environment overrides are named ``MSSD_<SECTION>_<KEY>`` in upper case, for example
``MSSD_STORE_URL`` or ``MSSD_SMTP_MAX_MESSAGE_SIZE``; lists are comma-separated.
Relative paths are taken from the directory mssd is started in.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mssd.trust.idnat import IdNatError, check_idnat_struct

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """A setting is missing, misspelt or invalid; the message names the key."""


@dataclass(frozen=True)
class ServerSettings:
    hostname: str = "localhost"
    """Name announced in SMTP greetings and Received headers."""
    var_dir: Path = Path("var")
    event_loop: str = "auto"
    """"uvloop", "asyncio", or "auto" (uvloop when installed)."""
    trusted_networks: tuple[str, ...] = ()
    """Networks from which plaintext authentication is allowed on SMTP submission
    and IMAP (TLS-terminating proxies, local test tools), as Dovecot's
    ``login_trusted_networks``."""


@dataclass(frozen=True)
class StoreSettings:
    url: str = "sqlite+aiosqlite:///var/mssd.db"
    group_commit_max_batch: int = 128
    """Most deliveries committed together in one transaction."""
    echo_sql: bool = False


@dataclass(frozen=True)
class SmtpSettings:
    mta_listen: str = "127.0.0.1:2525"
    submission_listen: str = "127.0.0.1:5587"
    submissions_listen: str = "127.0.0.1:5465"
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    timeout_seconds: float = 300.0
    mta_require_tls: bool = True
    proxy_protocol: bool = False
    """Every connection on 25, 587 and 465 starts with a PROXY header (v1 or v2)
    naming the client, before TLS on 465."""
    proxy_protocol_networks: tuple[str, ...] = ()
    """Load balancers allowed to send PROXY headers; required with proxy_protocol."""
    proxy_protocol_timeout_seconds: float = 10.0
    mta_require_client_cert: bool = True
    """Port 25 refuses MAIL from a peer without a TLS client certificate."""


@dataclass(frozen=True)
class ImapSettings:
    imap_listen: str = "127.0.0.1:1143"
    imaps_listen: str = "127.0.0.1:1993"
    login_timeout_seconds: float = 60.0
    idle_timeout_seconds: float = 1860.0
    """RFC 9051 §5.4: at least 30 minutes of inactivity before an autologout."""
    append_limit: int = 25 * 1024 * 1024
    header_cache_bytes: int = 64 * 1024 * 1024
    """Message header blocks kept parsed in memory (0: none), shared by all sessions."""
    fact_cache_entries: int = 20_000
    """Messages whose internal date, size and digest are kept in memory (0: none)."""
    workers: int = 1
    """Processes serving IMAP (``mssd.workers``); more than one needs PostgreSQL."""
    proxy_protocol: bool = False
    """Every connection starts with a PROXY header (v1 or v2) naming the client."""
    proxy_protocol_networks: tuple[str, ...] = ()
    """Load balancers allowed to send PROXY headers; required with proxy_protocol."""
    proxy_protocol_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class TlsSettings:
    cert_file: Path = Path("var/pki/server.pem")
    key_file: Path = Path("var/pki/server.key")
    client_ca_file: Path = Path("var/pki/ca-bundle.pem")
    crl_file: Path | None = Path("var/pki/crl.pem")
    operator_ca_file: Path | None = None
    """CAs that issue other operators' certificates, trusted both ways: their client
    certificate on port 25, their server certificate for the relay; None:
    client_ca_file. Formerly smtp.mta_client_ca_file and relay.ca_file."""


@dataclass(frozen=True)
class AuthSettings:
    scrypt_n: int = 2**14
    scrypt_r: int = 8
    scrypt_p: int = 1
    totp_window: int = 1
    """Accepted clock drift for one-time codes, in 30-second steps either side."""
    psc_issuer: str = ""
    """Expected ``iss`` of Pro Santé Connect access tokens; empty disables XOAUTH2/OAUTHBEARER."""
    psc_jwks_url: str = ""
    psc_ca_file: Path | None = None
    """CA bundle used to verify the JWKS server; empty means the system store."""
    psc_audience: str = ""
    psc_jwks_cache_seconds: int = 3600
    psc_leeway_seconds: int = 5
    psc_algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256")
    failure_limit_per_account: int = 5
    failure_limit_per_address: int = 20
    failure_window_seconds: int = 900
    verified_cache_seconds: int = 300
    """How long a verified password skips scrypt on the next logins (0: never)."""


@dataclass(frozen=True)
class PkiSettings:
    directory: Path = Path("var/pki")
    operator_structure: str = "1750000000"
    """idNat_Struct of the operator, written as ``OU`` of its server certificate."""


@dataclass(frozen=True)
class WhitelistSettings:
    source: str = ""
    """File path or https:// URL of the ANS ``listeblanchemssante.xml``; empty: none fetched."""
    checksum_source: str = ""
    """File path or https:// URL of its SHA-256 ``checksum`` file; empty: not checked."""
    ca_file: Path | None = None
    """CAs that verify the HTTPS server of the sources; None: the system store."""
    refresh_seconds: int = 3600
    checksum_retry_seconds: float = 30.0
    """After a checksum mismatch (the list and its checksum fetched while ANS publishes a
    new pair), the first early retry; each next one waits twice as long, four at most."""
    max_shrink: float = 0.10
    """Largest fraction of the current list a new one may drop before it is refused."""
    timeout_seconds: float = 60.0
    cache_file: Path | None = None
    """The last good list on disk; None: ``<server.var_dir>/whitelist/listeblanchemssante.xml``."""


@dataclass(frozen=True)
class AnnuaireSettings:
    """The national directory (mssd/annuaire): resolvers, cache, publication."""

    backends: tuple[str, ...] = ("extraction",)
    """Resolvers asked in this order: "ldap", "fhir", "extraction"."""
    budget_seconds: float = 2.0
    """Longest a lookup may take; beyond, the caller gets "unknown"."""
    cache_ttl_seconds: int = 86400
    negative_ttl_seconds: int = 3600
    cache_purge_seconds: float = 3600
    """How often ``mssd serve`` deletes expired cache rows (0: never)."""
    search_limit: int = 50
    ldap_url: str = ""
    ldap_starttls: bool = False
    ldap_ca_file: Path | None = None
    ldap_bind_dn: str = ""
    ldap_bind_password_file: Path | None = None
    ldap_base_dn: str = ""
    ldap_timeout_seconds: float = 1.5
    ldap_pool_size: int = 4
    ldap_page_size: int = 500
    ldap_attributes: tuple[str, ...] = ()
    """Overrides of the field=attribute mapping (config/ldap/README.md)."""
    ldap_publish_base_dn: str = ""
    fhir_url: str = "https://gateway.api.esante.gouv.fr/fhir/v2"
    fhir_api_key_file: Path | None = None
    fhir_ca_file: Path | None = None
    fhir_timeout_seconds: float = 1.5
    fhir_retries: int = 2
    fhir_backoff_seconds: float = 0.2
    fhir_max_pages: int = 10
    publish_targets: tuple[str, ...] = ("fhir",)


@dataclass(frozen=True)
class RelaySettings:
    enabled: bool = True
    """Run the relay worker in ``mssd serve`` (the queue is filled either way)."""
    routes: tuple[str, ...] = ()
    """Static routes ``domain=host:port`` used instead of MX look-ups."""
    poll_seconds: float = 5.0
    """How often the queue is read for due entries (new local messages wake it at once)."""
    batch_size: int = 100
    max_connections: int = 50
    max_connections_per_peer: int = 4
    connect_timeout_seconds: float = 30.0
    command_timeout_seconds: float = 300.0
    idle_connection_seconds: float = 30.0
    """How long an idle connection to a peer is kept for the next messages."""
    lease_seconds: int = 900
    """How long a claimed entry stays with its worker before another may take it."""
    retry_base_seconds: float = 300.0
    retry_max_seconds: float = 14400.0
    retry_jitter: float = 0.2
    give_up_seconds: int = 5 * 86400
    delay_report_seconds: int = 4 * 3600
    dns_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class DkimSettings:
    sign: bool = True
    """Sign relayed mail for every sender domain that has a key in key_dir."""
    selector: str = "mssd"
    key_dir: Path | None = None
    """Where ``mssd dkim keygen`` writes keys; None: ``<server.var_dir>/dkim``."""
    verify_inbound: bool = True
    dns_timeout_seconds: float = 5.0
    txt_records_file: Path | None = None
    """Lines ``NAME TXT-VALUE`` consulted before DNS when verifying (tests, closed networks)."""


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    imap: ImapSettings = field(default_factory=ImapSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    pki: PkiSettings = field(default_factory=PkiSettings)
    whitelist: WhitelistSettings = field(default_factory=WhitelistSettings)
    annuaire: AnnuaireSettings = field(default_factory=AnnuaireSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    dkim: DkimSettings = field(default_factory=DkimSettings)


SECTIONS: dict[str, type[Any]] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Settings)
}
DEPRECATED: dict[tuple[str, str], tuple[str, str]] = {
    # One per direction, both naming the IGC-Santé CAs of operator certificates.
    ("smtp", "mta_client_ca_file"): ("tls", "operator_ca_file"),
    ("relay", "ca_file"): ("tls", "operator_ca_file"),
}
"""Old names still read, with a warning: (section, key) -> its new (section, key)."""


def _parse_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _parse_int(key: str, value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _parse_float(key: str, value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _parse_str(key: str, value: object) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected a string, got {value!r}")


def _parse_tuple(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{key}: expected a list of strings, got {value!r}")


def _parse_path(key: str, value: object) -> Path:
    return Path(_parse_str(key, value))


def _parse_optional_path(key: str, value: object) -> Path | None:
    text = _parse_str(key, value)
    return Path(text) if text else None


_PARSERS: dict[str, Callable[[str, object], Any]] = {
    "bool": _parse_bool,
    "int": _parse_int,
    "float": _parse_float,
    "str": _parse_str,
    "tuple[str, ...]": _parse_tuple,
    "Path": _parse_path,
    "Path | None": _parse_optional_path,
}


def env_name(section: str, key: str) -> str:
    return f"MSSD_{section}_{key}".upper()


def all_keys() -> list[tuple[str, str]]:
    """Every ``(section, key)`` pair mssd knows, in declaration order."""
    return [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _build_section(
    section: str, cls: type[Any], table: Mapping[str, object], env: Mapping[str, str]
) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(
                f"{section}.{key}: unknown setting (known: {', '.join(sorted(known))})"
            )
    values: dict[str, Any] = {}
    for name, f in known.items():
        full = f"{section}.{name}"
        raw: object | None = table.get(name)
        source = full
        env_value = env.get(env_name(section, name))
        if env_value is not None:
            raw, source = env_value, f"{full} (from {env_name(section, name)})"
        if raw is None:
            continue
        parser = _PARSERS[str(f.type)]
        values[name] = parser(source, raw)
    return cls(**values)


def _check_listen(key: str, value: str) -> None:
    if not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(
            f"{key}: expected HOST:PORT (port 0-65535; 0 picks a free port) or empty, got {value!r}"
        )


def validate(settings: Settings) -> Settings:
    """Check values that types alone cannot; raise ConfigError naming the key."""
    for key in ("mta_listen", "submission_listen", "submissions_listen"):
        _check_listen(f"smtp.{key}", getattr(settings.smtp, key))
    for key in ("imap_listen", "imaps_listen"):
        _check_listen(f"imap.{key}", getattr(settings.imap, key))
    positive = {
        "smtp.max_message_size": settings.smtp.max_message_size,
        "smtp.max_recipients": settings.smtp.max_recipients,
        "imap.append_limit": settings.imap.append_limit,
        "store.group_commit_max_batch": settings.store.group_commit_max_batch,
        "auth.failure_limit_per_account": settings.auth.failure_limit_per_account,
        "auth.failure_limit_per_address": settings.auth.failure_limit_per_address,
        "auth.failure_window_seconds": settings.auth.failure_window_seconds,
        "auth.psc_jwks_cache_seconds": settings.auth.psc_jwks_cache_seconds,
        "auth.scrypt_r": settings.auth.scrypt_r,
        "auth.scrypt_p": settings.auth.scrypt_p,
    }
    for key, number in positive.items():
        if number <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {number}")
    if settings.auth.verified_cache_seconds < 0:
        raise ConfigError(
            "auth.verified_cache_seconds: must be 0 or more, "
            f"got {settings.auth.verified_cache_seconds}"
        )
    for key in ("header_cache_bytes", "fact_cache_entries"):
        if getattr(settings.imap, key) < 0:
            raise ConfigError(f"imap.{key}: must be 0 or more, got {getattr(settings.imap, key)}")
    for key in ("login_timeout_seconds", "idle_timeout_seconds"):
        if getattr(settings.imap, key) <= 0:
            raise ConfigError(f"imap.{key}: must be greater than 0")
    if settings.smtp.timeout_seconds <= 0:
        raise ConfigError(
            f"smtp.timeout_seconds: must be greater than 0, got {settings.smtp.timeout_seconds}"
        )
    n = settings.auth.scrypt_n
    if n < 2 or n & (n - 1):
        raise ConfigError(f"auth.scrypt_n: must be a power of two above 1, got {n}")
    if not 0 <= settings.auth.totp_window <= 10:
        raise ConfigError(
            f"auth.totp_window: must be between 0 and 10, got {settings.auth.totp_window}"
        )
    if settings.auth.psc_leeway_seconds < 0:
        raise ConfigError("auth.psc_leeway_seconds: must not be negative")
    _validate_networks("server.trusted_networks", settings.server.trusted_networks)
    for section, proxy in (("smtp", settings.smtp), ("imap", settings.imap)):
        _validate_proxy_protocol(
            section,
            proxy.proxy_protocol,
            proxy.proxy_protocol_networks,
            proxy.proxy_protocol_timeout_seconds,
        )
    if bool(settings.auth.psc_issuer) != bool(settings.auth.psc_jwks_url):
        raise ConfigError(
            "auth.psc_issuer and auth.psc_jwks_url: set both to enable Pro Santé Connect "
            "tokens, or neither"
        )
    if settings.auth.psc_jwks_url and not settings.auth.psc_jwks_url.startswith("https://"):
        raise ConfigError(
            f"auth.psc_jwks_url: must be an https:// URL, got {settings.auth.psc_jwks_url!r}"
        )
    if not settings.store.url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        raise ConfigError(
            "store.url: must start with sqlite+aiosqlite:// or postgresql+asyncpg://, "
            f"got {settings.store.url!r}"
        )
    try:
        check_idnat_struct(settings.pki.operator_structure)
    except IdNatError as error:
        raise ConfigError(f"pki.operator_structure: {error}") from None
    if settings.imap.workers < 1:
        raise ConfigError(f"imap.workers: must be 1 or more, got {settings.imap.workers}")
    if settings.imap.workers > 1 and not settings.store.url.startswith("postgresql"):
        raise ConfigError(
            "imap.workers: more than one IMAP process needs the PostgreSQL store "
            "(store.url); with SQLite mssd runs as one process"
        )
    _validate_whitelist(settings.whitelist)
    _validate_relay(settings.relay)
    if settings.server.event_loop not in ("auto", "asyncio", "uvloop"):
        raise ConfigError(
            "server.event_loop: expected auto, asyncio or uvloop, "
            f"got {settings.server.event_loop!r}"
        )
    if not settings.server.hostname or " " in settings.server.hostname:
        raise ConfigError(f"server.hostname: invalid host name {settings.server.hostname!r}")
    _validate_annuaire(settings.annuaire)
    return settings


def _validate_proxy_protocol(
    section: str, enabled: bool, networks: tuple[str, ...], timeout: float
) -> None:
    _validate_networks(f"{section}.proxy_protocol_networks", networks)
    if enabled and not networks:
        raise ConfigError(
            f"{section}.proxy_protocol_networks: list the load balancers' networks (PROXY "
            "headers from anywhere else would let any client choose its own address)"
        )
    if timeout < 3:
        # proxy-protocol.txt §2: "at least 3 seconds to cover a TCP retransmit".
        raise ConfigError(f"{section}.proxy_protocol_timeout_seconds: must be 3 or more")


def _validate_networks(key: str, networks: tuple[str, ...]) -> None:
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"{key}: {network!r} is not an IP network (e.g. 127.0.0.0/8)"
            ) from None


def _validate_whitelist(whitelist: WhitelistSettings) -> None:
    for key in ("source", "checksum_source"):
        value: str = getattr(whitelist, key)
        if "://" in value and not value.startswith("https://"):
            raise ConfigError(
                f"whitelist.{key}: a URL must be https:// (the list decides whom mail is "
                f"exchanged with), got {value!r}"
            )
    if whitelist.checksum_source and not whitelist.source:
        raise ConfigError("whitelist.checksum_source: set whitelist.source too")
    if whitelist.refresh_seconds <= 0:
        raise ConfigError(
            f"whitelist.refresh_seconds: must be greater than 0, got {whitelist.refresh_seconds}"
        )
    if whitelist.timeout_seconds <= 0:
        raise ConfigError("whitelist.timeout_seconds: must be greater than 0")
    if whitelist.checksum_retry_seconds <= 0:
        raise ConfigError("whitelist.checksum_retry_seconds: must be greater than 0")
    if not 0.0 <= whitelist.max_shrink <= 1.0:
        raise ConfigError(
            f"whitelist.max_shrink: must be a fraction between 0 and 1, got {whitelist.max_shrink}"
        )


def parse_route(value: str) -> tuple[str, str, int]:
    """``domain=host:port`` -> (domain, host, port); ValueError when malformed."""
    domain, eq, target = value.partition("=")
    host, colon, port = target.strip().rpartition(":")
    if not eq or not domain.strip() or not colon or not host or not port.isdigit():
        raise ValueError(f"expected domain=host:port, got {value!r}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port out of range in {value!r}")
    return domain.strip().lower(), host.strip("[]"), int(port)


def _validate_relay(relay: RelaySettings) -> None:
    for route in relay.routes:
        try:
            parse_route(route)
        except ValueError as error:
            raise ConfigError(f"relay.routes: {error}") from None
    for key in (
        "poll_seconds",
        "batch_size",
        "max_connections",
        "max_connections_per_peer",
        "connect_timeout_seconds",
        "command_timeout_seconds",
        "lease_seconds",
        "retry_base_seconds",
        "retry_max_seconds",
        "give_up_seconds",
        "delay_report_seconds",
        "dns_timeout_seconds",
    ):
        if getattr(relay, key) <= 0:
            raise ConfigError(f"relay.{key}: must be greater than 0, got {getattr(relay, key)}")
    if relay.idle_connection_seconds < 0:
        raise ConfigError("relay.idle_connection_seconds: must be 0 or more")
    if not 0.0 <= relay.retry_jitter < 1.0:
        raise ConfigError(f"relay.retry_jitter: must be in [0, 1), got {relay.retry_jitter}")


def operator_ca_file(settings: Settings) -> Path:
    """The CAs other operators' certificates are checked against, in both directions."""
    return settings.tls.operator_ca_file or settings.tls.client_ca_file


def dkim_key_dir(settings: Settings) -> Path:
    """Where DKIM private keys live (outside the repository: under the var directory)."""
    return settings.dkim.key_dir or settings.server.var_dir / "dkim"


def whitelist_cache_file(settings: Settings) -> Path:
    """Where the last good whitelist is kept on disk."""
    configured = settings.whitelist.cache_file
    if configured is not None:
        return configured
    return settings.server.var_dir / "whitelist" / "listeblanchemssante.xml"


def _validate_annuaire(annuaire: AnnuaireSettings) -> None:
    known = ("ldap", "fhir", "extraction")
    for name in annuaire.backends:
        if name not in known:
            raise ConfigError(
                f"annuaire.backends: unknown backend {name!r} (known: {', '.join(known)})"
            )
    if len(set(annuaire.backends)) != len(annuaire.backends):
        raise ConfigError("annuaire.backends: a backend is listed twice")
    for target in annuaire.publish_targets:
        if target not in ("fhir", "ldap"):
            raise ConfigError(
                f"annuaire.publish_targets: unknown target {target!r} (known: fhir, ldap)"
            )
    for key in (
        "budget_seconds",
        "cache_ttl_seconds",
        "search_limit",
        "ldap_timeout_seconds",
        "ldap_pool_size",
        "ldap_page_size",
        "fhir_timeout_seconds",
        "fhir_max_pages",
    ):
        if getattr(annuaire, key) <= 0:
            raise ConfigError(f"annuaire.{key}: must be greater than 0")
    for key in (
        "negative_ttl_seconds",
        "cache_purge_seconds",
        "fhir_retries",
        "fhir_backoff_seconds",
    ):
        if getattr(annuaire, key) < 0:
            raise ConfigError(f"annuaire.{key}: must not be negative")
    if "ldap" in annuaire.backends or "ldap" in annuaire.publish_targets:
        if not annuaire.ldap_url.startswith(("ldap://", "ldaps://")):
            raise ConfigError(
                f"annuaire.ldap_url: expected ldap://HOST[:PORT] or ldaps://HOST[:PORT], "
                f"got {annuaire.ldap_url!r}"
            )
        if annuaire.ldap_url.startswith("ldaps://") and annuaire.ldap_starttls:
            raise ConfigError("annuaire.ldap_starttls: not with an ldaps:// URL (already TLS)")
        if bool(annuaire.ldap_bind_dn) != bool(annuaire.ldap_bind_password_file):
            raise ConfigError(
                "annuaire.ldap_bind_dn and annuaire.ldap_bind_password_file: set both to "
                "bind, or neither for an anonymous search"
            )
    if "ldap" in annuaire.backends and not annuaire.ldap_base_dn:
        raise ConfigError("annuaire.ldap_base_dn: required when backends include ldap")
    if "ldap" in annuaire.publish_targets and not annuaire.ldap_publish_base_dn:
        raise ConfigError("annuaire.ldap_publish_base_dn: required to publish to LDAP")
    for entry in annuaire.ldap_attributes:
        name, sep, attribute = entry.partition("=")
        if not sep or not name.strip() or not attribute.strip():
            raise ConfigError(f"annuaire.ldap_attributes: expected FIELD=ATTRIBUTE, got {entry!r}")
    if ("fhir" in annuaire.backends or "fhir" in annuaire.publish_targets) and not (
        annuaire.fhir_url.startswith("https://")
    ):
        raise ConfigError(f"annuaire.fhir_url: expected an https:// URL, got {annuaire.fhir_url!r}")


def _renamed(
    document: dict[str, object], env: Mapping[str, str]
) -> tuple[dict[str, object], dict[str, str]]:
    """The file and the environment with each deprecated name moved to its new one."""
    tables = {name: dict(t) if isinstance(t, dict) else t for name, t in document.items()}
    variables = dict(env)
    for (section, key), (new_section, new_key) in DEPRECATED.items():
        new = f"{new_section}.{new_key}"
        table, new_table = tables.get(section), tables.setdefault(new_section, {})
        if isinstance(table, dict) and isinstance(new_table, dict):
            _move(table, key, new_table, new_key, f"{section}.{key}", new)
        old_env, new_env = env_name(section, key), env_name(new_section, new_key)
        _move(variables, old_env, variables, new_env, old_env, new)
    return tables, variables


def _move(
    source: dict[str, Any], name: str, target: dict[str, Any], new_name: str, old: str, new: str
) -> None:
    if name in source:
        value = source.pop(name)
        log.warning("%s is deprecated: it is now %s", old, new)
        if target.get(new_name, value) != value:
            raise ConfigError(f"{old}: deprecated name of {new}, which is set to another value")
        target[new_name] = value


def load(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if any), apply ``MSSD_*`` overrides, validate.

    ``path`` defaults to ``$MSSD_CONFIG``; with neither, built-in defaults apply.
    """
    env = os.environ if env is None else env
    if path is None and env.get("MSSD_CONFIG"):
        path = Path(env["MSSD_CONFIG"])
    document: dict[str, object] = {}
    if path is not None:
        try:
            with path.open("rb") as handle:
                document = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"configuration file {path} is not valid TOML: {error}") from None
    for section, table in document.items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table [{section}]")
    document, env = _renamed(document, env)
    known_env = {env_name(s, k) for s, k in all_keys()} | {"MSSD_CONFIG", "MSSD_REQUIRE_ALL"}
    for name in env:
        if name.startswith("MSSD_") and not name.startswith("MSSD_TEST_") and name not in known_env:
            raise ConfigError(f"{name}: unknown environment override")
    sections = {
        name: _build_section(name, cls, document.get(name, {}), env)  # type: ignore[arg-type]
        for name, cls in SECTIONS.items()
    }
    return validate(Settings(**sections))
