"""LDAP write backend: our mailboxes as entries of a site's directory
(config/ldap/mssante.schema), one per mailbox, RDN ``mssanteAddress=<address>``."""

from __future__ import annotations

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.dn import escape_rdn

from mssd.annuaire.ldap import LdapConfig, LdapPool
from mssd.annuaire.model import DirectoryError
from mssd.config import AnnuaireSettings
from mssd.store.annuaire import PublishedMailbox


def mailbox_dn(address: str, base_dn: str) -> str:
    # RFC 4514 §2.4: special characters of the value are escaped.
    return f"mssanteAddress={escape_rdn(address)},{base_dn}"


def ldap_attributes(mailbox: PublishedMailbox) -> dict[str, list[str]]:
    """The entry's attributes (without the RDN's own, which the DN carries too)."""
    person = mailbox.bal_type in ("PER", "CAB")
    name = mailbox.display_name or mailbox.address
    attributes: dict[str, list[str]] = {
        "objectClass": [
            "inetOrgPerson" if person else "organizationalRole",
            "mssanteMailbox",
        ],
        "cn": [name],
        "mssanteAddress": [mailbox.address],
        "mssanteBalType": [mailbox.bal_type],
        "mssanteDematerialisation": ["TRUE" if mailbox.dematerialisation else "FALSE"],
        "mssanteListeRouge": ["FALSE"],
    }
    if person:
        attributes["sn"] = [name.split()[-1] if mailbox.display_name else mailbox.address]
    if mailbox.bal_type == "PER":
        attributes["mssanteIdNatPs"] = [mailbox.owner_idnat]
    else:
        attributes["mssanteIdNatStruct"] = [mailbox.owner_idnat]
    for field_name, attribute in (
        ("description", "description"),
        ("responsible", "mssanteResponsible"),
        ("service", "ou"),
        ("phone", "telephoneNumber"),
    ):
        value = getattr(mailbox, field_name)
        if value:
            attributes[attribute] = [value]
    return attributes


_MANAGED = (
    "cn",
    "sn",
    "mssanteBalType",
    "mssanteIdNatPs",
    "mssanteIdNatStruct",
    "mssanteDematerialisation",
    "mssanteListeRouge",
    "description",
    "mssanteResponsible",
    "ou",
    "telephoneNumber",
)


class LdapPublisher:
    def __init__(self, config: LdapConfig) -> None:
        self.config = config
        self.pool = LdapPool(config)

    @classmethod
    def from_settings(cls, settings: AnnuaireSettings) -> LdapPublisher:
        return cls(LdapConfig.from_settings(settings, base_dn=settings.ldap_publish_base_dn))

    async def close(self) -> None:
        await self.pool.aclose()

    async def write(self, mailbox: PublishedMailbox, delete: bool) -> str:
        """Make the directory match; returns what was done (add, modify, delete, absent)."""
        # Two exchanges: whether the entry exists, then the add, modify or delete.
        return await self.pool.run(self._write_sync, mailbox, delete, exchanges=2)

    def _write_sync(self, mailbox: PublishedMailbox, delete: bool) -> str:
        connection = self.pool.acquire()
        broken = True
        try:
            done = self._write(connection, mailbox, delete)
            broken = False
            return done
        except LDAPException as error:
            raise DirectoryError(f"LDAP write of {mailbox.address} failed: {error}") from None
        finally:
            self.pool.release(connection, broken=broken)

    def _write(self, connection: ldap3.Connection, mailbox: PublishedMailbox, delete: bool) -> str:
        dn = mailbox_dn(mailbox.address, self.config.base_dn)
        connection.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["1.1"])
        exists = (connection.result or {}).get("result") == 0 and bool(connection.entries)
        if delete:
            if not exists:
                return "absent"
            connection.delete(dn)  # type: ignore[no-untyped-call]
            self._check(connection, "delete", dn)
            return "delete"
        attributes = ldap_attributes(mailbox)
        if not exists:
            connection.add(dn, attributes=attributes)  # type: ignore[no-untyped-call]
            self._check(connection, "add", dn)
            return "add"
        # Replacing with no value removes an attribute the mailbox no longer has.
        changes = {name: [(ldap3.MODIFY_REPLACE, attributes.get(name, []))] for name in _MANAGED}
        connection.modify(dn, changes)  # type: ignore[no-untyped-call]
        self._check(connection, "modify", dn)
        return "modify"

    @staticmethod
    def _check(connection: ldap3.Connection, operation: str, dn: str) -> None:
        result = connection.result or {}
        if result.get("result") != 0:
            raise DirectoryError(
                f"LDAP {operation} {dn} refused: {result.get('description')} "
                f"{result.get('message') or ''}".strip()
            )
