"""Message parsing and building: header edits now; envelope, BODYSTRUCTURE and
attachments with the IMAP server.

Invariants:
- Stored messages are immutable: functions here return new bytes, never edit a blob.
- Nothing here parses a whole message on the event loop; callers hand large
  messages to a worker thread.
"""

OFFLOAD_BYTES = 256 * 1024
"""Messages larger than this are parsed, hashed or unstuffed in a worker thread,
never on the event loop."""
