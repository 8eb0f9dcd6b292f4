"""IMAP server: sans-I/O parser and encoder, one module per command family, thin
asyncio layer (RFC 3501 IMAP4rev1, RFC 9051 IMAP4rev2).

Invariants:
- Protocol modules are pure: they turn bytes into commands and values into
  response bytes; only the asyncio layer touches sockets.
- FETCH values (``fetchdata``) are computed from the stored, immutable message
  bytes and the MIME tree of ``mssd.mime.structure``; they are never cached in
  memory as the source of truth, and no stored blob is ever modified.
- Parsing a stored message never raises: malformed mail is reported as well as
  the grammar allows, and the client gets an answer, not a dropped connection.
- Large messages are parsed off the event loop (see ``mssd.mime``).
- Sizes and line counts are of the message as stored; the store keeps CRLF line
  endings, so RFC822.SIZE, BODY[] and BODYSTRUCTURE agree with each other.
- A session speaks IMAP4rev1 until the client sends ENABLE IMAP4rev2
  (``Session.rev2``); the command handlers choose the rev2 answers, the reader
  only learns that names and strings are UTF-8 (``Session.utf8``). A client
  that never enables rev2 must see exactly the rev1 answers.
"""
