"""Real store failures for tests: a trigger that makes the database itself refuse some
writes (as a full disk or a broken constraint would), on SQLite and PostgreSQL."""

from __future__ import annotations

from mssd.store.engine import create_engine


async def refuse(url: str, name: str, table: str, event: str, condition: str) -> None:
    """Make the database raise on ``event`` (e.g. ``UPDATE``) of the ``table`` rows for
    which ``condition`` (on ``NEW``) holds."""
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                await conn.exec_driver_sql(
                    f"CREATE TRIGGER {name} BEFORE {event} ON {table} WHEN {condition} "
                    "BEGIN SELECT RAISE(ABORT, 'the store refuses (test)'); END"
                )
            else:
                await conn.exec_driver_sql(
                    f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'the store refuses (test)'; END $$"
                )
                await conn.exec_driver_sql(
                    f"CREATE TRIGGER {name} BEFORE {event} ON {table} FOR EACH ROW "
                    f"WHEN ({condition}) EXECUTE FUNCTION {name}()"
                )
    finally:
        await engine.dispose()


async def allow(url: str, name: str, table: str) -> None:
    """Undo :func:`refuse`."""
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                await conn.exec_driver_sql(f"DROP TRIGGER {name}")
            else:
                await conn.exec_driver_sql(f"DROP TRIGGER {name} ON {table}")
                await conn.exec_driver_sql(f"DROP FUNCTION {name}()")
    finally:
        await engine.dispose()
