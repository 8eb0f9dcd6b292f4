"""Trust: the development PKI shaped like IGC-Santé, TLS contexts, certificate
identities, certificate checks outside the handshake (``verify``) and the ANS
whitelist (``whitelist``: the sans-I/O parser and rules; ``whitelist_source``: fetching).

Invariants:
- Certificate DNs are compared parsed and normalised (RFC 4514), never as raw strings.
- Private keys are written with mode 0600 and never leave the PKI directory; none is committed.
- TLS 1.2 is the floor; on 1.2 only the four ECDHE-RSA suites of the MSSanté client rules.
- Whitelist domains are compared as IDNA A-labels; a list replaces the one in force only
  if ``whitelist.accept_update`` accepts it (checksum, parse, shrink).
"""
