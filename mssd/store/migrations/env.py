"""Alembic environment: migrations always run on a connection handed over by
:func:`mssd.store.engine.upgrade` (``config.attributes["connection"]``)."""

from __future__ import annotations

from alembic import context

from mssd.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
