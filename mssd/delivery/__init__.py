"""Delivery: the path every message takes once a protocol session has it.

Policy is decided per recipient at RCPT time (DESIGN.md, "One message", step
2); acceptance commits the message before the session answers (step 3).

Invariants:
- A refusal is a :class:`PolicyRefusal` carrying the exact SMTP reply; nothing is
  silently dropped.
- Hooks plug in through :class:`PolicyCheck` objects handed to the pipeline;
  this package never imports the patient gateway, the DMP bridge or the port 25
  trust-space check (``mssd.smtp.inbound``) that use them. It keeps the ANS
  whitelist current (``whitelist.py``) for them and for the relay (``mssd.smtp.relay``),
  builds delivery reports (``dsn.py``), makes the ones a full mailbox leaves owed after
  the 250, at least once (``local_reports.py``), and signs and verifies DKIM (``dkim.py``).
- Nothing here blocks the event loop on work proportional to message size:
  hashing and header edits of large messages run in a worker thread.
"""

from mssd.delivery.pipeline import (
    DeliveryPipeline,
    PolicyCheck,
    PolicyRefusal,
    SessionInfo,
    Transaction,
)

__all__ = ["DeliveryPipeline", "PolicyCheck", "PolicyRefusal", "SessionInfo", "Transaction"]
