"""The LDAP backend (ldap3): mailbox entries of a directory, by address, idNat_PS
or search; and, for publication, the entries of our own mailboxes.

Every value from a user goes through RFC 4515 §3 escaping before it enters a
filter (``escape_filter_chars``). Searches are paged (RFC 2696) and stop at the
caller's limit. ldap3 is synchronous: each operation runs on a thread of the
pool's own executor (``ldap_pool_size`` threads, never the loop's default
executor, so a stalled directory server cannot starve other ``to_thread``
users) on a connection taken from the pool. Every socket operation has
``ldap_timeout_seconds``, and a whole operation that much per exchange with the
server (connecting, binding, each page or write): past that deadline the caller
gets :class:`DirectoryError`. A connection that failed is dropped rather than
returned to the pool.

TLS (ldaps:// or StartTLS) follows the project's policy (``mssd.trust.tls``:
TLS 1.2 floor, the MSSanté suites, host name checked): ldap3 builds its own
``SSLContext`` inside ``Tls.wrap_socket`` and takes none from outside, so
:class:`PolicyTls` overrides that one method to wrap with ours.

The field -> attribute mapping defaults to config/ldap/mssante.schema and can be
overridden (``annuaire.ldap_attributes``) for a site's own directory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import queue
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from mssd.annuaire.model import (
    DirectoryConfigError,
    DirectoryEntry,
    DirectoryError,
    SearchQuery,
    parse_yes_no,
    read_secret,
)
from mssd.config import AnnuaireSettings
from mssd.trust.tls import TlsConfigError, client_context

T = TypeVar("T")

DEFAULT_ATTRIBUTES: dict[str, str] = {
    "object_class": "mssanteMailbox",
    "address": "mssanteAddress",
    "bal_type": "mssanteBalType",
    "idnat_ps": "mssanteIdNatPs",
    "civility": "personalTitle",
    "last_name": "sn",
    "first_name": "givenName",
    "profession_code": "mssanteProfessionCode",
    "profession_label": "title",
    "savoir_faire": "mssanteSavoirFaire",
    "structure_id": "mssanteIdNatStruct",
    "structure_name": "o",
    "structure_category": "mssanteStructureCategory",
    "service": "ou",
    "street": "street",
    "postcode": "postalCode",
    "city": "l",
    "description": "description",
    "responsible": "mssanteResponsible",
    "phone": "telephoneNumber",
    "dematerialisation": "mssanteDematerialisation",
    "liste_rouge": "mssanteListeRouge",
}
"""DirectoryEntry field -> LDAP attribute; ``object_class`` selects mailbox entries."""

_SETUP_EXCHANGES = 2
"""Exchanges before the work itself: connecting (with StartTLS) and binding."""
_FLAGS = ("dematerialisation", "liste_rouge")
_PAGED_RESULTS = "1.2.840.113556.1.4.319"  # RFC 2696


def attribute_map(overrides: Sequence[str]) -> dict[str, str]:
    """The default mapping with ``field=attribute`` overrides (an empty attribute
    drops the field)."""
    mapping = dict(DEFAULT_ATTRIBUTES)
    for item in overrides:
        name, _, attribute = item.partition("=")
        name, attribute = name.strip(), attribute.strip()
        if name not in DEFAULT_ATTRIBUTES:
            raise DirectoryConfigError(
                f"annuaire.ldap_attributes: unknown field {name!r} "
                f"(known: {', '.join(DEFAULT_ATTRIBUTES)})"
            )
        if name == "address" and not attribute:
            raise DirectoryConfigError("annuaire.ldap_attributes: address needs an attribute")
        mapping[name] = attribute
    return mapping


@dataclass(frozen=True)
class LdapConfig:
    url: str
    base_dn: str
    starttls: bool = False
    ca_file: Path | None = None
    bind_dn: str = ""
    password: str = field(default="", repr=False)
    timeout: float = 1.5
    pool_size: int = 4
    page_size: int = 500
    attributes: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ATTRIBUTES))

    @classmethod
    def from_settings(cls, settings: AnnuaireSettings, *, base_dn: str | None = None) -> LdapConfig:
        password = ""
        if settings.ldap_bind_password_file is not None:
            password = read_secret(
                settings.ldap_bind_password_file, "annuaire.ldap_bind_password_file"
            )
        return cls(
            url=settings.ldap_url,
            base_dn=settings.ldap_base_dn if base_dn is None else base_dn,
            starttls=settings.ldap_starttls,
            ca_file=settings.ldap_ca_file,
            bind_dn=settings.ldap_bind_dn,
            password=password,
            timeout=settings.ldap_timeout_seconds,
            pool_size=settings.ldap_pool_size,
            page_size=settings.ldap_page_size,
            attributes=attribute_map(settings.ldap_attributes),
        )


class PolicyTls(ldap3.Tls):
    """ldap3's TLS step with an ``SSLContext`` of ``mssd.trust.tls``: the server's
    certificate is verified and its name checked by OpenSSL during the handshake."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        self.context = context

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self.context.wrap_socket(
            connection.socket,
            server_side=False,
            do_handshake_on_connect=do_handshake,
            server_hostname=connection.server.host,
        )


def _server(config: LdapConfig) -> ldap3.Server:
    parsed = urllib.parse.urlsplit(config.url)
    if parsed.scheme not in ("ldap", "ldaps") or not parsed.hostname:
        raise DirectoryConfigError(
            f"annuaire.ldap_url: expected ldap[s]://HOST[:PORT], got {config.url!r}"
        )
    use_ssl = parsed.scheme == "ldaps"
    tls = None
    if use_ssl or config.starttls:
        try:
            tls = PolicyTls(client_context(ca_file=config.ca_file))
        except TlsConfigError as error:
            raise DirectoryConfigError(f"annuaire.ldap_ca_file: {error}") from None
    return ldap3.Server(
        parsed.hostname,
        port=parsed.port or (636 if use_ssl else 389),
        use_ssl=use_ssl,
        tls=tls,
        get_info=ldap3.NONE,
        connect_timeout=config.timeout,
    )


class LdapPool:
    """At most ``size`` open connections, each used by one thread at a time, and
    the ``size`` threads that use them."""

    def __init__(self, config: LdapConfig) -> None:
        self.config = config
        self.server = _server(config)
        self._idle: queue.LifoQueue[ldap3.Connection] = queue.LifoQueue()
        self._open = 0
        self._lock = threading.Lock()
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            config.pool_size, thread_name_prefix="mssd-ldap"
        )

    async def run(self, work: Callable[..., T], *args: Any, exchanges: int = 1) -> T:
        """``work(*args)`` on one of the pool's threads, within the deadline of
        ``exchanges`` round trips with the server (plus connecting and binding).
        A caller that gives up (cancelled, deadline) takes back work not started
        yet; a thread already talking to the server is freed by its socket
        timeout."""
        deadline = self.config.timeout * (_SETUP_EXCHANGES + exchanges)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(deadline):
                return await loop.run_in_executor(self._executor, work, *args)
        except TimeoutError:
            raise DirectoryError(
                f"LDAP server {self.config.url}: no answer within {deadline:g} s"
            ) from None

    async def aclose(self) -> None:
        """Unbind the idle connections, then stop the threads."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.close)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _connect(self) -> ldap3.Connection:
        config = self.config
        connection = ldap3.Connection(
            self.server,
            user=config.bind_dn or None,
            password=config.password or None,
            authentication=ldap3.SIMPLE if config.bind_dn else ldap3.ANONYMOUS,
            receive_timeout=math.ceil(config.timeout),
            raise_exceptions=False,
            read_only=False,
            auto_referrals=False,
        )
        try:
            connection.open()
            if config.starttls and not connection.start_tls():
                raise DirectoryError(f"LDAP StartTLS refused: {connection.result}")
            if not connection.bind():
                result = connection.result or {}
                raise DirectoryError(
                    f"LDAP bind as {config.bind_dn or 'anonymous'} refused: "
                    f"{result.get('description')} {result.get('message') or ''}".strip()
                )
        except LDAPException as error:
            connection.unbind()
            raise DirectoryError(f"LDAP server {config.url}: {error}") from None
        except DirectoryError:
            connection.unbind()
            raise
        return connection

    def acquire(self) -> ldap3.Connection:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._open < self.config.pool_size:
                self._open += 1
                create = True
            else:
                create = False
        if create:
            try:
                return self._connect()
            except BaseException:
                with self._lock:
                    self._open -= 1
                raise
        try:
            return self._idle.get(timeout=self.config.timeout)
        except queue.Empty:
            raise DirectoryError(
                f"LDAP: all {self.config.pool_size} connections busy for {self.config.timeout} s"
            ) from None

    def release(self, connection: ldap3.Connection, *, broken: bool = False) -> None:
        if broken or self._closed:
            with self._lock:
                self._open -= 1
            try:
                connection.unbind()
            except LDAPException:
                pass
            return
        self._idle.put(connection)

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                connection = self._idle.get_nowait()
            except queue.Empty:
                return
            self.release(connection, broken=True)


def _text(values: Any) -> str | None:
    if isinstance(values, (list, tuple)):
        values = values[0] if values else None
    if values is None:
        return None
    if isinstance(values, bytes):
        values = values.decode("utf-8", "replace")
    text = str(values).strip()
    return text or None


def _flag(value: str | None) -> bool | None:
    if value is None:
        return None
    return parse_yes_no(value) is True


class LdapBackend:
    name = "ldap"
    cacheable = True

    def __init__(self, config: LdapConfig) -> None:
        self.config = config
        self.attributes = dict(config.attributes)
        self.pool = LdapPool(config)

    @classmethod
    def from_settings(cls, settings: AnnuaireSettings) -> LdapBackend:
        return cls(LdapConfig.from_settings(settings))

    async def close(self) -> None:
        await self.pool.aclose()

    # -- filters (RFC 4515) -----------------------------------------------------------

    def _attribute(self, field_name: str) -> str | None:
        return self.attributes.get(field_name) or None

    def _filter(self, *parts: str) -> str:
        object_class = self._attribute("object_class")
        clauses = [f"(objectClass={escape_filter_chars(object_class)})"] if object_class else []
        clauses.extend(parts)
        return clauses[0] if len(clauses) == 1 else f"(&{''.join(clauses)})"

    def _equals(self, field_name: str, value: str) -> str:
        attribute = self._attribute(field_name)
        if attribute is None:
            raise DirectoryError(f"LDAP: no attribute is mapped for {field_name}")
        return f"({attribute}={escape_filter_chars(value)})"

    def _prefix(self, field_name: str, value: str) -> str | None:
        attribute = self._attribute(field_name)
        if attribute is None:
            return None
        return f"({attribute}={escape_filter_chars(value)}*)"

    def address_filter(self, address: str) -> str:
        return self._filter(self._equals("address", address))

    def search_filter(self, query: SearchQuery) -> str:
        parts: list[str | None] = []
        if query.name:
            parts.append(self._prefix("last_name", query.name.strip()))
        if query.first_name:
            parts.append(self._prefix("first_name", query.first_name.strip()))
        if query.profession:
            profession = query.profession.strip()
            parts.append(
                self._equals("profession_code", profession)
                if profession.isdigit()
                else self._prefix("profession_label", profession)
            )
        if query.city:
            parts.append(self._prefix("city", query.city.strip()))
        if query.postcode:
            parts.append(self._prefix("postcode", query.postcode.strip()))
        if query.bal_type:
            parts.append(self._equals("bal_type", query.bal_type.strip().upper()))
        given = [p for p in parts if p]
        if len(given) != len(parts):
            raise DirectoryError("LDAP: a search criterion has no attribute mapped")
        liste_rouge = self._attribute("liste_rouge")
        if liste_rouge:
            given.append(f"(!({liste_rouge}=TRUE))")
        return self._filter(*given)

    # -- lookups ---------------------------------------------------------------------

    async def by_address(self, address: str) -> list[DirectoryEntry]:
        return await self._search(self.address_filter(address), 10)

    async def by_idnat_ps(self, idnat_ps: str) -> list[DirectoryEntry]:
        return await self._search(self._filter(self._equals("idnat_ps", idnat_ps)), 100)

    async def search(self, query: SearchQuery, limit: int) -> list[DirectoryEntry]:
        # The server's matching rules decide case (and accent) folding.
        return await self._search(self.search_filter(query), limit)

    async def _search(self, search_filter: str, limit: int) -> list[DirectoryEntry]:
        pages = math.ceil(limit / self.config.page_size)
        return await self.pool.run(self._search_sync, search_filter, limit, exchanges=pages + 1)

    def _search_sync(self, search_filter: str, limit: int) -> list[DirectoryEntry]:
        connection = self.pool.acquire()
        broken = True
        try:
            entries = self._paged(connection, search_filter, limit)
            broken = False
            return entries
        except LDAPException as error:
            raise DirectoryError(f"LDAP search failed: {error}") from None
        finally:
            self.pool.release(connection, broken=broken)

    def _paged(
        self, connection: ldap3.Connection, search_filter: str, limit: int
    ) -> list[DirectoryEntry]:
        wanted = [a for k, a in self.attributes.items() if a and k != "object_class"]
        entries: list[DirectoryEntry] = []
        cookie: bytes | None = None
        while True:
            page = min(self.config.page_size, max(limit - len(entries), 1))
            connection.search(
                self.config.base_dn,
                search_filter,
                search_scope=ldap3.SUBTREE,
                attributes=wanted,
                paged_size=page,
                paged_cookie=cookie,
                time_limit=math.ceil(self.config.timeout),
            )
            result = connection.result or {}
            code = result.get("result")
            if code == 32:  # noSuchObject: the base DN is not there
                raise DirectoryError(f"LDAP: base DN {self.config.base_dn!r} does not exist")
            if code not in (0, 4):  # success, sizeLimitExceeded
                raise DirectoryError(
                    f"LDAP search refused: {result.get('description')} "
                    f"{result.get('message') or ''}".strip()
                )
            for item in connection.response or []:
                if item.get("type") == "searchResEntry":
                    entry = self._entry(item.get("attributes", {}))
                    if entry is not None:
                        entries.append(entry)
            controls = result.get("controls") or {}
            cookie = controls.get(_PAGED_RESULTS, {}).get("value", {}).get("cookie") or None
            if not cookie or len(entries) >= limit:
                break
        if cookie:
            # RFC 2696 §3: a page size of zero with the cookie abandons the search.
            connection.search(
                self.config.base_dn,
                search_filter,
                search_scope=ldap3.SUBTREE,
                attributes=["1.1"],
                paged_size=0,
                paged_cookie=cookie,
            )
        return entries[:limit]

    def _entry(self, attributes: Mapping[str, Any]) -> DirectoryEntry | None:
        lowered = {k.lower(): v for k, v in attributes.items()}
        values: dict[str, Any] = {}
        for field_name, attribute in self.attributes.items():
            if not attribute or field_name == "object_class":
                continue
            text = _text(lowered.get(attribute.lower()))
            if field_name in _FLAGS:
                flag = _flag(text)
                if flag is not None:
                    values[field_name] = flag
            elif text is not None:
                values[field_name] = text
        if "address" not in values:
            return None
        if values.get("bal_type"):
            values["bal_type"] = str(values["bal_type"]).upper()
        return DirectoryEntry(**values, source="ldap")
