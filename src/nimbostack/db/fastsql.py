"""Core statements on the SQLite connection without SQLAlchemy's per-execution work.

A Core statement run through SQLAlchemy costs ~60 us of Python on top of SQLite's ~3 us: its
cache key, the execution context, parameter and result processing set up afresh each time. A VM
create runs a few dozen such statements; the node's CPU per create was mostly that. Here a
statement that the node runs again and again (a module-level constant; an INSERT of insert_now) is
compiled once by SQLAlchemy, against the same dialect, and later runs straight on the DBAPI cursor
of the session's connection, inside the session's transaction: same SQL, the type processors
SQLAlchemy would apply (datetimes as text, booleans as integers) and the Python-side defaults of
INSERT and UPDATE (createDate, lastOpDate, ...), done as SQLAlchemy does them.

Only what keeps its meaning outside SQLAlchemy's execution takes this path: a SELECT of columns,
or of ORM entities read as records (the RECORDS option: see execute); an INSERT; an UPDATE or
DELETE that needs no ORM synchronisation; one parameter set; IN lists (the SQL made per count of
elements, as SQLAlchemy renders it); no RETURNING, literal-execute binds or server-side
expression defaults. Everything else, and a statement seen for the first time (one built per call
would be compiled for nothing), runs through SQLAlchemy as before. SQLite only: PostgreSQL goes
through AsyncSession unchanged.

Measured on a 2-core machine, 5,000 VM creates: the server's CPU per create went from 12.7 ms to
7.0 ms (78 -> 134 VMs/s), with the ORM loads of read-only rows turned into records."""

from __future__ import annotations

import weakref
from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Dialect, inspect
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeEngine

# set on a statement object: (a weak reference to it, its state): its preparations by parameter
# names, NOT_YET after its first run, or UNFIT. The reference matters: SQLAlchemy's generative
# methods (.where(), .values(), ...) copy the statement's __dict__ into the new statement, which
# must not inherit its parent's compiled SQL.
_ATTR = "_nimbostack_fast"
_NOT_YET = object()
# an execution option: read the statement's ORM entities as records (see execute)
RECORDS = "nimbostack_records"
_UNFIT = object()


class DmlResult:
    """What callers read of an INSERT/UPDATE/DELETE result."""

    __slots__ = ("rowcount", "lastrowid")

    def __init__(self, rowcount: int, lastrowid: int | None) -> None:
        self.rowcount = rowcount
        self.lastrowid = lastrowid


class _Prepared:
    __slots__ = (
        "sql",
        "compiled",
        "order",
        "processors",
        "defaults",
        "expanding",
        "variants",
        "meta",
        "row_processors",
        "shape",
    )

    def __init__(self, stmt: Any, dialect: Dialect, keys: list[str] | None, records: bool) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=keys)
        if compiled.positiontup is None or getattr(compiled, "returning", None):
            raise _Unfit
        if any(b.literal_execute for b in compiled.binds.values()):
            raise _Unfit
        self.sql: str = compiled.string
        self.compiled = compiled
        self.order: list[str] = list(compiled.positiontup)
        procs = compiled._bind_processors
        self.processors: list[tuple[str, Callable[[Any], Any] | None]] = [(k, procs.get(k)) for k in self.order]
        # IN (:list) binds: the SQL has one ? per element, so it is made per count of elements
        expanding = {compiled.bind_names[b] for b in compiled.post_compile_params}
        self.expanding: tuple[str, ...] = tuple(dict.fromkeys(k for k in self.order if k in expanding))
        if len(self.expanding) != len(expanding):
            raise _Unfit
        self.variants: dict[tuple[int, ...], tuple[str, list[tuple[str, int | None, Any]]]] = {}
        # Python-side column defaults, as DefaultExecutionContext._process_execute_defaults
        self.defaults: list[tuple[str, Any, bool]] = []
        prefetch = compiled.insert_prefetch or compiled.update_prefetch
        key_of = compiled._within_exec_param_key_getter if prefetch else None
        for col, describe in [(c, c._default_description_tuple) for c in compiled.insert_prefetch] + [
            (c, c._onupdate_description_tuple) for c in compiled.update_prefetch
        ]:
            arg, is_scalar, is_callable, is_sentinel = describe
            if is_sentinel or not (is_scalar or is_callable):
                raise _Unfit
            self.defaults.append((key_of(col), arg, is_callable))  # type: ignore[misc]
        self.meta: SimpleResultMetaData | None = None
        self.row_processors: list[Callable[[Any], Any] | None] | None = None
        self.shape: list[Any] | None = None
        if stmt.is_select:
            cols = compiled._result_columns
            row_procs = [c.type._cached_result_processor(dialect, None) for c in cols]
            self.row_processors = row_procs if any(row_procs) else None
            names, self.shape = _shape(stmt, cols, records)
            self.meta = SimpleResultMetaData(names)

    def args(self, params: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
        values = self.compiled.construct_params(params)
        for key, arg, is_callable in self.defaults:  # columns the statement does not set
            values[key] = arg(None) if is_callable else arg
        if not self.expanding:
            return self.sql, [proc(values[k]) if proc else values[k] for k, proc in self.processors]
        counts = tuple(len(values[k]) for k in self.expanding)
        variant = self.variants.get(counts)
        if variant is None:
            variant = self.variants[counts] = self._expand(params, counts)
        sql, plan = variant
        out = []
        for key, index, proc in plan:
            value = values[key] if index is None else values[key][index]
            out.append(proc(value) if proc else value)
        return sql, out

    def _expand(self, params: Mapping[str, Any] | None, counts: tuple[int, ...]) -> tuple[str, list[Any]]:
        """The SQL for these counts of IN elements, as SQLAlchemy renders it, and where each of its
        parameters comes from: (bind name, element index or None, processor)."""
        state = self.compiled.construct_expanded_state(params)
        count_of = dict(zip(self.expanding, counts, strict=True))
        plan: list[tuple[str, int | None, Any]] = []
        for key, proc in self.processors:
            if key in count_of:
                plan += [(key, i, state.processors.get(f"{key}_{i + 1}")) for i in range(count_of[key])]
            else:
                plan.append((key, None, proc))
        expected = [key if i is None else f"{key}_{i + 1}" for key, i, _ in plan]
        if list(state.positiontup or ()) != expected:  # e.g. tuple IN: not named as assumed
            raise _Unfit
        return state.statement, plan


# per mapped class: the type of its records (see "records" in execute)
_RECORDS: dict[type, Any] = {}


def _record_type(model: type) -> Any:
    found = _RECORDS.get(model)
    if found is None:
        keys = [p.key for p in inspect(model).column_attrs]
        try:
            found = _RECORDS[model] = namedtuple(f"{model.__name__}Record", keys)  # type: ignore[misc]
        except ValueError:  # an attribute name a named tuple cannot have (_x, a keyword): the ORM reads it
            raise _Unfit from None
    return found


def _shape(stmt: Any, cols: list[Any], records: bool) -> tuple[list[str], list[Any] | None]:
    """The result's keys, and how its rows are built from the cursor's rows: None when a row is the
    cursor row; else per item a column index, or (record type, column indexes in its fields'
    order, primary-key indexes) for an entity read as a record."""
    descs = stmt.column_descriptions
    if all(isinstance(d["type"], TypeEngine) for d in descs):
        return [c.keyname for c in cols], None
    if not records:
        raise _Unfit
    shape: list[Any] = []
    names: list[str] = []
    at = 0
    for d in descs:
        if isinstance(d["type"], TypeEngine):
            shape.append(at)
            names.append(cols[at].keyname)
            at += 1
            continue
        model = d["entity"]
        if model is None or d["expr"] is not model:
            raise _Unfit  # an aliased entity, a bundle, ...
        mapper = inspect(model)
        rtype = _record_type(model)
        index: dict[str, int] = {}
        for _ in rtype._fields:
            if at >= len(cols):
                raise _Unfit
            obj = cols[at].objects[0]
            column = getattr(obj, "element", obj)  # a label SQLAlchemy gave a repeated name
            try:
                index[mapper.get_property_by_column(column).key] = at
            except Exception:
                raise _Unfit from None
            at += 1
        if set(index) != set(rtype._fields):
            raise _Unfit
        pk = [index[mapper.get_property_by_column(c).key] for c in mapper.primary_key]
        shape.append((rtype, [index[k] for k in rtype._fields], pk))
        names.append(d["name"])
    if at != len(cols):
        raise _Unfit
    return names, shape


def _build(shape: list[Any], row: Any) -> tuple[Any, ...]:
    out = []
    for item in shape:
        if isinstance(item, int):
            out.append(row[item])
            continue
        rtype, fields, pk = item
        # an outer join's missing side: no entity, as the ORM reads it
        out.append(None if all(row[i] is None for i in pk) else rtype._make([row[i] for i in fields]))
    return tuple(out)


class _Unfit(Exception):
    pass


def _eligible(stmt: Any) -> bool:
    if stmt.is_dml:
        return not stmt._returning
    return bool(stmt.is_select)


def execute(
    dbapi: Any, dialect: Dialect, session: Session | None, stmt: Any, params: Any, options: Mapping[str, Any] | None
) -> Any:
    """The statement's result through the fast path, or None: run it through SQLAlchemy.
    ``session``: the transaction's ORM session if it has one, whose pending changes go first.

    A SELECT of ORM entities takes this path only with the RECORDS execution option set on the
    statement itself (engine.records), not passed with one call: each entity
    comes as a record of its columns (a named tuple: same attribute names, read-only), not an
    object of the session. For the many places that only read an entity's fields (a VM create
    reads a dozen), that skips the ORM's loading, a third of the node's CPU per create. The
    option promises that the caller does not change what it read; where the statement goes
    through SQLAlchemy instead (PostgreSQL, a first run) the caller gets ORM objects, which read
    the same."""
    if params is not None and not isinstance(params, Mapping):
        return None  # executemany
    if stmt.is_dml and not stmt.is_insert and not (options and options.get("synchronize_session") is False):
        return None  # an UPDATE/DELETE whose loaded objects this call asks to keep in step: the ORM's
    mark = stmt.__dict__.get(_ATTR)
    if mark is None or mark[0]() is not stmt:  # first run (or a mark copied from its parent)
        stmt.__dict__[_ATTR] = (weakref.ref(stmt), _NOT_YET)
        return None
    found = mark[1]
    if found is _UNFIT:
        return None
    key = tuple(params) if params and stmt.is_dml else ()
    if found is _NOT_YET:
        if not _eligible(stmt):
            stmt.__dict__[_ATTR] = (mark[0], _UNFIT)
            return None
        found = {}
        stmt.__dict__[_ATTR] = (mark[0], found)
    prepared = found.get(key)
    if prepared is None:
        try:
            prepared = found[key] = _Prepared(
                # the statement's own option, not the call's: the preparation serves every call
                stmt, dialect, list(key) if key else None, bool(stmt.is_select and stmt._execution_options.get(RECORDS))
            )
        except (_Unfit, AttributeError, TypeError):  # AttributeError: an SQLAlchemy without these internals
            stmt.__dict__[_ATTR] = (mark[0], _UNFIT)
            return None
    if session is not None:
        if stmt.is_select:
            session._autoflush()
        else:
            session.flush()
    try:
        sql, args = prepared.args(params)
    except _Unfit:  # an IN list whose SQL SQLAlchemy renders otherwise than assumed
        stmt.__dict__[_ATTR] = (mark[0], _UNFIT)
        return None
    cursor = dbapi.cursor()
    try:
        cursor.execute(sql, args)
        if prepared.meta is None:
            return DmlResult(cursor.rowcount, cursor.lastrowid)
        rows = cursor.fetchall()
    except dialect.loaded_dbapi.Error as err:
        # as SQLAlchemy raises it (IntegrityError, OperationalError ...), whichever path ran
        base = dialect.loaded_dbapi.Error
        raise DBAPIError.instance(sql, args, err, base, dialect=dialect) from err
    finally:
        cursor.close()
    procs = prepared.row_processors
    if procs is not None:
        rows = [tuple(p(v) if p else v for p, v in zip(procs, row, strict=True)) for row in rows]
    shape = prepared.shape
    if shape is not None:
        rows = [_build(shape, row) for row in rows]
    return IteratorResult(prepared.meta, iter(rows))
