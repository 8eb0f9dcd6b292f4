"""Hot statements executed straight on the DBAPI connection SQLAlchemy holds.

SQLAlchemy Core stays the one definition of every statement. SQLAlchemy compiles
each one, once per dialect (and per size class of its expanding lists), into a
plan: the SQL text, its positional parameters in order with their bind processors,
and the result processors of its columns (SQLite keeps DateTime as text: it comes
back as ``datetime`` as through ``Connection.execute``). Running a plan costs a
DBAPI cursor call and those processors, not ``Connection.execute``'s per-call
machinery (cache key, execution context, result object, events: ~45 µs a
statement, bench/README.md). Rows come back as plain tuples.

Expanding lists (``bindparam(..., expanding=True)``, ``IN (...)``) are padded to
a few fixed lengths (1, 2, 4, 8, 16, 64, 256, 1024, then multiples of 1024) by
repeating their last value: a repeated value changes nothing in a set membership
test, and a statement has a handful of texts, not one per list length, so
PostgreSQL's per-connection prepared statements (asyncpg) and sqlite3's statement
cache hold them all. An empty list runs through ``Connection.execute`` (SQLAlchemy
renders it as an always-false subquery). Multi-row INSERTs are cut the same way,
into statements of those row counts (one ``VALUES`` list each: one
``sqlite3_step`` rather than one per row, as ``use_insertmanyvalues`` does).

Invariants:
- a statement runs inside the transaction SQLAlchemy began on the connection: the
  connection begins one first if it has none (as ``Connection.execute`` would),
  refuses to run in a failed one, and the statement goes through the DBAPI
  connection's own cursor. On SQLite that is the ``sqlite3`` connection whose
  BEGIN (or SAVEPOINT) SQLAlchemy emitted (engine.py: ``isolation_level`` is
  None). On PostgreSQL it is SQLAlchemy's asyncpg adapter, whose cursor starts
  the asyncpg transaction (with the connection's isolation level) under its
  mutex before the first statement, whatever issued it, and awaits through the
  greenlet of ``run_sync``; its prepared statement cache is the one
  ``Connection.execute`` uses.
- errors become SQLAlchemy's exceptions through the connection, as in
  ``Connection.execute`` (``IntegrityError``...; a lost connection is
  invalidated), so a work that raises rolls back its transaction or savepoint.
- statements that need SQLAlchemy at execution time are refused when their plan
  is made: Python-side column defaults, literal-rendered parameters.
Not done here: the ``before/after_cursor_execute`` events and echo logging.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from sqlalchemy import Connection, Table, bindparam, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine.interfaces import DBAPICursor, Dialect
from sqlalchemy.exc import InvalidRequestError, PendingRollbackError
from sqlalchemy.sql import visitors
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Delete, Insert, Update
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.selectable import Select

Row = tuple[Any, ...]
Processor = Callable[[Any], Any]

_CONSTANT: Final = 0
_SCALAR: Final = 1
_LIST: Final = 2

_SIZES = (1, 2, 4, 8, 16, 64, 256, 1024)
_MAX_PARAMETERS = 30_000
"""Bound values per statement: under SQLite's 32,766 and PostgreSQL's 32,767."""


def size_class(count: int) -> int:
    """The length an expanding list of ``count`` values is padded to."""
    for size in _SIZES:
        if count <= size:
            return size
    return -(-count // 1024) * 1024


@dataclass(frozen=True, slots=True)
class _Marker:
    """Stands for a caller's value while SQLAlchemy expands a statement, so that
    the expanded positional order says where each value goes."""

    key: str
    index: int


Slot = tuple[int, Any, int, Processor | None]
"""(_CONSTANT, value, 0, None) | (_SCALAR, key, 0, processor) |
(_LIST, key, padded length, processor), in positional order."""


@dataclass(frozen=True, slots=True)
class _Plan:
    sql: str
    slots: tuple[Slot, ...]
    results: tuple[tuple[int, Processor], ...]
    """(column index, result processor) for the columns that have one."""


def _compile(statement: Any, dialect: Dialect, sizes: Mapping[str, int]) -> _Plan:
    compiled = statement.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    if not compiled.positional:
        raise NotImplementedError(f"fast path: {dialect.name} is not a positional paramstyle")
    if compiled.literal_execute_params or compiled.insert_prefetch or compiled.update_prefetch:
        raise NotImplementedError("fast path: the statement needs SQLAlchemy at execution time")
    dummy: dict[str, Any] = {}
    for parameter in compiled.bind_names:
        if not parameter.required:
            continue  # a literal of the statement: its value goes in the plan
        if parameter.expanding:
            dummy[parameter.key] = [_Marker(parameter.key, i) for i in range(sizes[parameter.key])]
        else:
            dummy[parameter.key] = _Marker(parameter.key, -1)
    state = compiled.construct_expanded_state(dummy)
    processors: dict[str, Any] = {**compiled._bind_processors, **state.processors}
    escaped = compiled.escaped_bind_names
    slots: list[Slot] = []
    for name in state.positiontup or ():
        value = state.parameters[escaped.get(name, name) if escaped else name]
        processor = processors.get(name)
        if not isinstance(value, _Marker):
            slots.append((_CONSTANT, value if processor is None else processor(value), 0, None))
        elif value.index < 0:
            slots.append((_SCALAR, value.key, 0, processor))
        elif value.index == 0:
            slots.append((_LIST, value.key, sizes[value.key], processor))
        else:  # the rest of a list: SQLAlchemy puts a list's values side by side
            kind, key, size, _ = slots[-1]
            assert kind == _LIST and key == value.key and value.index < size
    results = tuple(
        (index, processor)
        for index, column in enumerate(compiled._result_columns)
        if (processor := column.type._cached_result_processor(dialect, None)) is not None
    )
    return _Plan(state.statement, tuple(slots), results)


def _missing(key: object) -> InvalidRequestError:
    return InvalidRequestError(f"A value is required for bind parameter {key}")


def _arguments(plan: _Plan, params: Mapping[str, Any]) -> list[Any]:
    arguments: list[Any] = []
    try:
        for kind, key, size, processor in plan.slots:
            if kind == _CONSTANT:
                arguments.append(key)
            elif kind == _SCALAR:
                value = params[key]
                arguments.append(value if processor is None else processor(value))
            else:
                values = list(params[key])
                values.extend([values[-1]] * (size - len(values)))
                arguments.extend(values if processor is None else map(processor, values))
    except KeyError as error:
        raise _missing(error.args[0]) from None
    return arguments


def _processed(plan: _Plan, rows: list[Any]) -> list[Row]:
    if not plan.results:
        # sqlite3 rows are tuples already; asyncpg's are Records.
        return rows if not rows or type(rows[0]) is tuple else list(map(tuple, rows))
    processed: list[Row] = []
    for row in rows:
        values = list(row)
        for index, processor in plan.results:
            values[index] = processor(values[index])
        processed.append(tuple(values))
    return processed


def _cursor(conn: Connection) -> DBAPICursor:
    """A cursor of the DBAPI connection, inside SQLAlchemy's transaction (see the
    module docstring); begins one as ``Connection.execute`` would."""
    fairy = conn.connection  # reconnects an invalidated connection, or refuses
    transaction = conn.get_transaction()
    if transaction is None:
        conn.begin()
    else:
        nested = conn.get_nested_transaction()
        if not transaction.is_active or (nested is not None and not nested.is_active):
            raise PendingRollbackError(
                "Can't run a statement in a failed transaction: roll it back first",
                code="8s2b",
            )
    dbapi_connection = fairy.dbapi_connection
    assert dbapi_connection is not None
    cursor = dbapi_connection.cursor()
    # asyncpg adapter: what its execution context does before each statement (the
    # time of the last DDL, which makes it refresh its prepared statements' types).
    stamp = getattr(conn.dialect, "_invalidate_schema_cache_asof", None)
    if stamp is not None:
        cursor._invalidate_schema_cache_asof = stamp  # type: ignore[attr-defined]
    return cursor


def _failed(
    conn: Connection, error: BaseException, sql: str, arguments: Any, cursor: DBAPICursor
) -> NoReturn:
    """Raise ``error`` as ``Connection.execute`` would (wrapped in SQLAlchemy's
    exception, the connection invalidated on a disconnect)."""
    invalidate = getattr(conn.dialect, "_invalidate_schema_cache", None)
    if invalidate is not None:
        # asyncpg adapter, as its execution context does: a statement prepared
        # before a schema change is prepared again.
        dbapi = conn.dialect.loaded_dbapi
        if isinstance(error, (dbapi.InvalidCachedStatementError, dbapi.InternalServerError)):
            invalidate()
    conn._handle_dbapi_exception(error, sql, arguments, cursor, None)


def run_driver_sql(conn: Connection, sql: str) -> None:
    """Run ``sql`` (no parameters, no rows) on the DBAPI connection, errors raised as
    ``Connection.execute`` would: for the statements that manage the transaction
    itself (BEGIN, SAVEPOINT...), so it checks none."""
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
    except BaseException as error:
        _failed(conn, error, sql, (), cursor)
    cursor.close()


def _execute(conn: Connection, sql: str, arguments: Any, *, many: bool, fetch: bool) -> Any:
    cursor = _cursor(conn)
    try:
        if many:
            cursor.executemany(sql, arguments)
        else:
            cursor.execute(sql, arguments)
        result = cursor.fetchall() if fetch else cursor.rowcount
    except BaseException as error:
        _failed(conn, error, sql, arguments, cursor)
    cursor.close()
    return result


class FastStatement:
    """A SELECT, UPDATE or DELETE built once with ``bindparam`` (expanding or not)."""

    def __init__(self, statement: Select[Any] | Update | Delete) -> None:
        self.statement = statement
        self._expanding = tuple(
            sorted(
                {
                    element.key
                    for element in visitors.iterate(statement)
                    if isinstance(element, BindParameter) and element.expanding and element.required
                }
            )
        )
        self._plans: weakref.WeakKeyDictionary[Dialect, dict[tuple[int, ...], _Plan]] = (
            weakref.WeakKeyDictionary()
        )

    def _plan(self, dialect: Dialect, params: Mapping[str, Any]) -> _Plan | None:
        """None when an expanding list is empty."""
        sizes: tuple[int, ...] = ()
        if self._expanding:
            try:
                lengths = [len(params[key]) for key in self._expanding]
            except KeyError as error:
                raise _missing(error.args[0]) from None
            if not all(lengths):
                return None
            sizes = tuple(size_class(length) for length in lengths)
        plans = self._plans.get(dialect)
        if plans is None:
            plans = self._plans[dialect] = {}
        plan = plans.get(sizes)
        if plan is None:
            plan = plans[sizes] = _compile(
                self.statement, dialect, dict(zip(self._expanding, sizes, strict=True))
            )
        return plan

    def rows(self, conn: Connection, params: Mapping[str, Any] | None = None) -> list[Row]:
        """What ``conn.execute(statement, params).all()`` returns, as tuples."""
        params = params or {}
        plan = self._plan(conn.dialect, params)
        if plan is None:
            return [tuple(row) for row in conn.execute(self.statement, params)]
        fetched = _execute(conn, plan.sql, _arguments(plan, params), many=False, fetch=True)
        return _processed(plan, fetched)

    def execute(self, conn: Connection, params: Mapping[str, Any] | None = None) -> int:
        """Run an UPDATE or DELETE; the number of rows it matched."""
        params = params or {}
        plan = self._plan(conn.dialect, params)
        if plan is None:
            return conn.execute(self.statement, params).rowcount
        return int(_execute(conn, plan.sql, _arguments(plan, params), many=False, fetch=False))

    def execute_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run an UPDATE or DELETE once per parameter set (no expanding lists), as
        ``conn.execute(statement, rows)`` does."""
        if not rows:
            return
        if self._expanding:
            raise InvalidRequestError("expanding parameters cannot be run once per row")
        plan = self._plan(conn.dialect, rows[0])
        assert plan is not None
        _execute(conn, plan.sql, [_arguments(plan, row) for row in rows], many=True, fetch=False)


@dataclass(frozen=True, slots=True)
class _InsertPlan:
    sql: str
    slots: tuple[tuple[int, Any, Processor | None], ...]
    """(row index, column name, processor), or (-1, value, None) for a literal."""


class FastInsert:
    """An INSERT of rows (mappings with the same keys, column names) into
    ``table``, as multi-row ``VALUES`` statements of a few fixed row counts;
    with ``skip_conflicts_on`` (columns of a unique index), ``ON CONFLICT DO
    NOTHING`` (PostgreSQL, SQLite: a row whose key is stored already is left out)."""

    def __init__(self, table: Table, *, skip_conflicts_on: Sequence[str] = ()) -> None:
        self.table = table
        self._conflicts = list(skip_conflicts_on)
        self._plans: weakref.WeakKeyDictionary[
            Dialect, dict[tuple[tuple[str, ...], int], _InsertPlan]
        ] = weakref.WeakKeyDictionary()

    def _plan(self, dialect: Dialect, keys: tuple[str, ...], count: int) -> _InsertPlan:
        plans = self._plans.get(dialect)
        if plans is None:
            plans = self._plans[dialect] = {}
        plan = plans.get((keys, count))
        if plan is None:
            names = {(row, key): f"r{row}_{key}" for row in range(count) for key in keys}
            values = [
                {key: bindparam(names[row, key], type_=self.table.c[key].type) for key in keys}
                for row in range(count)
            ]
            statement = self._insert(dialect).values(values if count > 1 else values[0])
            compiled = _compile(statement, dialect, {})
            where = {name: place for place, name in names.items()}
            slots = tuple(
                (-1, value, None) if kind == _CONSTANT else (*where[value], processor)
                for kind, value, _, processor in compiled.slots
            )
            plan = plans[(keys, count)] = _InsertPlan(compiled.sql, slots)
        return plan

    def _insert(self, dialect: Dialect) -> Insert:
        if not self._conflicts:
            return insert(self.table)
        if dialect.name == "postgresql":
            return postgresql.insert(self.table).on_conflict_do_nothing(
                index_elements=self._conflicts
            )
        if dialect.name == "sqlite":
            return sqlite.insert(self.table).on_conflict_do_nothing(index_elements=self._conflicts)
        raise NotImplementedError(f"fast path: no ON CONFLICT for {dialect.name}")

    def rows(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert ``rows``, in their order."""
        if not rows:
            return
        keys = tuple(rows[0])
        largest = max(1, _MAX_PARAMETERS // max(1, len(keys)))
        start = 0
        while start < len(rows):
            left = min(len(rows) - start, largest)
            count = max(size for size in _SIZES if size <= left)
            plan = self._plan(conn.dialect, keys, count)
            chunk = rows[start : start + count]
            arguments: list[Any] = []
            try:
                for row, key, processor in plan.slots:
                    if row < 0:
                        arguments.append(key)
                    else:
                        value = chunk[row][key]
                        arguments.append(value if processor is None else processor(value))
            except KeyError as error:
                raise _missing(error.args[0]) from None
            _execute(conn, plan.sql, arguments, many=False, fetch=False)
            start += count
