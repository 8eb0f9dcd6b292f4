"""The store: the only code that writes SQL.

SQLAlchemy 2 (async) over SQLite (embedded default, WAL + synchronous FULL) or
PostgreSQL (asyncpg). Alembic migrations live in ``migrations/``.

Invariants a newcomer would otherwise break:
- Commit, then acknowledge: nothing above the store may answer a client before
  the transaction that holds its change has committed (``delivery.py``).
- Messages are immutable blobs keyed by SHA-256, stored once; mailboxes hold
  placements (folder, UID, flags, modseq). Expunges are recorded before the
  placement disappears.
- Whatever adds or removes placements moves the mailbox's usage counter by their
  sizes in the same transaction, and checks the quota there (``quota.py``).
- A report owed to a sender (a mailbox found full after the 250) is marked in the
  message's transaction and the mark cleared only in the report's (``report_dues.py``).
- Every administrative change writes its audit row in the same transaction;
  audit rows are never updated or deleted (the schema enforces it).
- On SQLite, a transaction that writes starts with BEGIN IMMEDIATE
  (``engine.write_transaction``, ``engine.run_write``), holding the writer lock
  that every process on the file takes turns on (``engine.WriterLock``, an
  ``flock`` of ``<database>-lock``); never write inside a read transaction. Only
  a write its caller knows to be small (``run_write(small=True)``) may commit on
  the event loop.
- On PostgreSQL, ``engine.run_read``, ``run_statements`` and ``run_write`` keep a
  few connections checked out between works (``engine._Held``): a work leaves
  its connection with no transaction open and its execution options as they
  were; one that fails gives its connection back to the pool instead.
- Hot statements run through ``fastpath.py`` (SQLAlchemy compiles them, the DBAPI
  connection runs them, inside SQLAlchemy's transaction); define them there with
  SQLAlchemy Core as any other, never as hand-written SQL.
"""
