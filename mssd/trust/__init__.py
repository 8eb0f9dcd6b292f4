"""Trust: the development PKI shaped like IGC-Santé, TLS contexts, certificate
identities and (later) the ANS whitelist.

Invariants:
- Certificate DNs are compared parsed and normalised (RFC 4514), never as raw strings.
- Private keys are written with mode 0600 and never leave the PKI directory; none is committed.
- TLS 1.2 is the floor; on 1.2 only the four ECDHE-RSA suites of the MSSanté client rules.
"""
