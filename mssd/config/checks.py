"""Checks of the values that types alone cannot make: each raises
:class:`ConfigError` naming the key."""

from __future__ import annotations

import ipaddress

from mssd.config.sections import (
    AnnuaireSettings,
    ConfigError,
    RelaySettings,
    Settings,
    WhitelistSettings,
)
from mssd.trust.idnat import IdNatError, check_idnat_struct


def _check_listen(key: str, value: str) -> None:
    if not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(
            f"{key}: expected HOST:PORT (port 0-65535; 0 picks a free port) or empty, got {value!r}"
        )


def _sqlite_in_memory(url: str) -> bool:
    """Whether ``url`` names an in-memory SQLite database (no path, ``:memory:``,
    or an SQLite URI with ``mode=memory``: https://sqlite.org/inmemorydb.html)."""
    prefix = "sqlite+aiosqlite://"
    if not url.startswith(prefix):
        return False
    path, _, query = url[len(prefix) :].partition("?")
    return path in ("", "/", "/:memory:") or "mode=memory" in f"{path}&{query}"


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
    if settings.imap.workers > 1 and _sqlite_in_memory(settings.store.url):
        raise ConfigError(
            "imap.workers: more than one IMAP process needs a store they can share: "
            f"store.url {settings.store.url!r} is an in-memory SQLite database, which only "
            "the process that opens it sees; use a SQLite file or PostgreSQL"
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
