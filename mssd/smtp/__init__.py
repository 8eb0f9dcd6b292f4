"""SMTP: the MTA listener (port 25, between operators) and submission (587
STARTTLS, 465 implicit TLS) on aiosmtpd, and the outbound relay (``relay.py``, with its
connections in ``pool.py`` and its outcomes in ``outcomes.py``).

Invariants:
- TLS before any mail command: STARTTLS is required on 25 and 587 (except from
  the configured trusted networks on 587); 465 is TLS from the first byte.
- Behind a load balancer (``smtp.proxy_protocol``) the client's address is the
  PROXY header's, read by ``mssd.proxy_protocol`` before the greeting and before
  TLS on 465: every decision and record that names the client uses it.
- Policy is decided by ``mssd.delivery``; this package only translates between
  SMTP and the pipeline. 250 after DATA means committed. The one policy that is
  SMTP's own, who may send on port 25 (``inbound.py``), plugs in as a PolicyCheck.
- Port 25 has its own TLS context: the handshake checks the chain, revocation is
  checked at MAIL so that the 550 can say why.
- The protocol servers never import each other (``mssd.imap`` is a sibling).
"""
