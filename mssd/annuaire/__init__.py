"""The national health directory (annuaire): find professionals and their
MSSanté mailboxes, and publish ours.

- ``model``: the values (a mailbox record, a search, an answer); no I/O.
- ``resolver``: one interface over the backends, asked in the configured order,
  with the cache (``cache``, in the store, shared by processes) and the budget.
- Backends: ``ldap`` (ldap3), ``fhir`` (httpx, the Annuaire Santé API),
  ``offline`` (the extraction file imported by ``extraction``).
- ``publish``: FHIR PATCH payloads and LDAP entries for our own mailboxes.

Invariants a newcomer would otherwise break:
- A lookup answers within ``annuaire.budget_seconds`` and never raises: callers
  in SMTP/IMAP sessions get ``unknown`` instead and decide without the directory.
- User input never reaches an LDAP filter unescaped (RFC 4515 §3) nor a LIKE
  pattern unescaped; the local part of an address is compared exactly, the
  domain case-insensitively (RFC 5321 §2.4).
- Unlisted (liste rouge) mailboxes are never published and never appear in a
  search; a closed mailbox is deleted from the directory.
- This package writes no SQL: the tables are ``mssd.store.annuaire``'s.
"""
