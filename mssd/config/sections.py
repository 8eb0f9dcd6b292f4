"""Every setting of mssd: one frozen dataclass per section of the file, each
field with its type, default and meaning (``config/mssd.example.toml`` documents
the same keys; a test keeps the two in agreement), and the paths derived from
them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    """Processes serving IMAP (``mssd.workers``); more than one needs a store they
    can share: PostgreSQL or a SQLite file (not an in-memory SQLite database)."""
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
