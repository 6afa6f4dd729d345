"""The SQLite fast path (db/fastsql.py) gives what SQLAlchemy gives: a statement's first run goes
through SQLAlchemy, its later runs through the fast path, and each assertion below compares the two
or checks the database afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import Boolean, DateTime, Integer, String, bindparam, insert, inspect, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from nimbostack.db import fastsql
from nimbostack.db.engine import Database

NO_SYNC = {"synchronize_session": False}


class _Base(DeclarativeBase):
    pass


class Thing(_Base):
    __tablename__ = "thing"
    uuid: Mapped[str] = mapped_column(String(32), primary_key=True)
    size: Mapped[int] = mapped_column(Integer, default=7)
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    createDate: Mapped[datetime] = mapped_column(DateTime, default=datetime.utcnow)
    lastOpDate: Mapped[datetime] = mapped_column(DateTime, default=datetime.utcnow, onupdate=datetime.utcnow)


class Other(_Base):
    __tablename__ = "other"
    uuid: Mapped[str] = mapped_column(String(32), primary_key=True)
    thingUuid: Mapped[str] = mapped_column(String(32))
    note: Mapped[str | None] = mapped_column(String(32), nullable=True)


INSERT = insert(Thing)
ALL = select(Thing.uuid, Thing.size, Thing.ready, Thing.createDate).order_by(Thing.uuid)
GROW_IF_SMALL = update(Thing).where(Thing.uuid == "a", Thing.size < 10).values(size=Thing.size + 5)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'f.db'}")
    _Base.metadata.create_all(database.sync_engine)
    yield database
    await database.close()


def _marked_fast(stmt: object) -> bool:
    mark = stmt.__dict__.get(fastsql._ATTR)
    return mark is not None and isinstance(mark[1], dict) and bool(mark[1])


async def test_inserts_apply_python_defaults_and_types_as_sqlalchemy(db: Database) -> None:
    for uuid, ready in (("a", True), ("b", False), ("c", True)):  # SQLAlchemy, SQLAlchemy, fast
        async with db.tx() as s:
            await s.execute(INSERT, {"uuid": uuid, "ready": ready})
    assert _marked_fast(INSERT)
    async with db.tx() as s:
        rows = [tuple(r) for r in (await s.execute(select(Thing.uuid, Thing.size, Thing.ready)))]
        dates = (await s.execute(select(Thing.createDate, Thing.lastOpDate))).all()
    assert rows == [("a", 7, True), ("b", 7, False), ("c", 7, True)]
    assert all(isinstance(d, datetime) and abs((datetime.utcnow() - d).total_seconds()) < 60 for r in dates for d in r)


async def test_selects_read_the_same_rows_and_types(db: Database) -> None:
    async with db.tx() as s:
        for uuid in "ab":
            await s.execute(insert(Thing), {"uuid": uuid, "ready": uuid == "a"})
    results = []
    for _ in range(3):
        async with db.tx() as s:
            results.append([tuple(r) for r in await s.execute(ALL)])
    assert _marked_fast(ALL)
    assert results[0] == results[1] == results[2]
    assert [type(v) for v in results[2][0]] == [str, int, bool, datetime]
    async with db.tx() as s:  # the Result API callers use
        assert (await s.execute(ALL)).mappings().first()["uuid"] == "a"
        assert (await s.scalars(ALL)).all() == ["a", "b"]


async def test_conditional_update_counts_rows_and_stamps_onupdate(db: Database) -> None:
    async with db.tx() as s:
        await s.execute(insert(Thing), {"uuid": "a", "size": 0, "lastOpDate": datetime(2000, 1, 1)})
    counts = []
    for _ in range(4):  # 0 -> 5 -> 10, then the condition no longer holds
        async with db.tx() as s:
            counts.append((await s.execute(GROW_IF_SMALL, execution_options=NO_SYNC)).rowcount)
    assert _marked_fast(GROW_IF_SMALL)
    assert counts == [1, 1, 0, 0]
    async with db.tx() as s:
        size, stamp = (await s.execute(select(Thing.size, Thing.lastOpDate))).one()
    assert size == 10 and stamp.year > 2000


async def test_a_statement_derived_from_a_prepared_one_runs_its_own_sql(db: Database) -> None:
    """.where() copies the statement's __dict__, and with it the mark: the copy must not inherit
    the parent's compiled SQL."""
    async with db.tx() as s:
        for uuid in "ab":
            await s.execute(insert(Thing), {"uuid": uuid})
    base = select(Thing.uuid).order_by(Thing.uuid)
    for _ in range(3):
        async with db.tx() as s:
            assert (await s.scalars(base)).all() == ["a", "b"]
    assert _marked_fast(base)
    narrowed = base.where(Thing.uuid == "b")
    for _ in range(3):
        async with db.tx() as s:
            assert (await s.scalars(narrowed)).all() == ["b"]


async def test_a_failed_transaction_undoes_fast_statements(db: Database) -> None:
    for uuid in "ab":
        async with db.tx() as s:
            await s.execute(INSERT, {"uuid": uuid})
    with pytest.raises(RuntimeError):
        async with db.tx() as s:
            await s.execute(INSERT, {"uuid": "c"})
            await s.execute(GROW_IF_SMALL, execution_options=NO_SYNC)
            raise RuntimeError("a later step failed")
    async with db.tx() as s:
        assert (await s.scalars(ALL)).all() == ["a", "b"]
        assert (await s.scalar(select(Thing.size).where(Thing.uuid == "a"))) == 7


async def test_pending_orm_objects_are_flushed_before_a_fast_select(db: Database) -> None:
    for _ in range(2):
        async with db.tx() as s:
            await s.execute(ALL)
    async with db.tx() as s:
        s.add(Thing(uuid="z"))
        assert (await s.scalars(ALL)).all() == ["z"]
        assert (await s.get(Thing, "z")) is not None
    async with db.tx() as s:
        assert (await s.scalars(ALL)).all() == ["z"]


async def test_in_lists_of_any_length_read_what_sqlalchemy_reads(db: Database) -> None:
    async with db.tx() as s:
        for uuid in "abcd":
            await s.execute(insert(Thing), {"uuid": uuid, "ready": uuid in "ab"})
    among = (
        select(Thing.uuid)
        .where(Thing.uuid.in_(bindparam("uuids")), Thing.ready.in_([True]), Thing.size == bindparam("size"))
        .order_by(Thing.uuid)
    )
    asked = [["a", "c"], ["a", "b", "d"], [], ["b"], ["a", "c"], ["d", "a", "b"]]
    answers = []
    for uuids in asked:
        async with db.tx() as s:
            answers.append((await s.scalars(among, {"uuids": uuids, "size": 7})).all())
    assert _marked_fast(among)
    assert answers == [["a"], ["a", "b"], [], ["b"], ["a"], ["a", "b"]]
    async with db.tx() as s:
        stamps = (await s.scalars(select(Thing.createDate).where(Thing.uuid.in_(["a", "b"])))).all()
    by_date = select(Thing.uuid).where(Thing.createDate.in_(bindparam("dates"))).order_by(Thing.uuid)
    for _ in range(3):  # a datetime in a list is stored text, as a datetime alone
        async with db.tx() as s:
            assert (await s.scalars(by_date, {"dates": stamps})).all() == ["a", "b"]


OUTER = (
    select(Thing, Other)
    .outerjoin(Other, Other.thingUuid == Thing.uuid)
    .order_by(Thing.uuid)
    .execution_options(**{fastsql.RECORDS: True})
)


async def test_entities_read_as_records_carry_the_same_fields(db: Database) -> None:
    async with db.tx() as s:
        await s.execute(insert(Thing), {"uuid": "a", "ready": True})
        await s.execute(insert(Thing), {"uuid": "b"})
        await s.execute(insert(Other), {"uuid": "o", "thingUuid": "a", "note": "x"})
    runs = []
    for _ in range(3):
        async with db.tx() as s:
            runs.append((await s.execute(OUTER)).all())
    assert _marked_fast(OUTER)
    first, last = runs[0], runs[2]
    assert isinstance(first[0][0], Thing) and not isinstance(last[0][0], Thing)  # ORM object, then record
    for orm_row, record_row in zip(first, last, strict=True):
        for orm, record in zip(orm_row, record_row, strict=True):
            if orm is None:
                assert record is None  # no Other for "b": None, as the ORM gives
                continue
            fields = [a.key for a in inspect(type(orm)).column_attrs]
            assert {f: getattr(orm, f) for f in fields} == {f: getattr(record, f) for f in fields}
    assert last[1][1] is None and last[0][1].note == "x"
    with pytest.raises(AttributeError):
        last[0][0].size = 99  # a record is read-only: a change would never reach the database
    async with db.tx() as s:
        assert (await s.scalars(OUTER)).all()[0].ready is True


@pytest.mark.parametrize("call_options", [None, {fastsql.RECORDS: True}])
async def test_entities_without_the_option_stay_orm_objects(db: Database, call_options: dict | None) -> None:
    """Records are the statement's choice, not one call's: the preparation serves every later call."""
    async with db.tx() as s:
        await s.execute(insert(Thing), {"uuid": "a"})
    plain = select(Thing)
    for _ in range(3):
        async with db.tx() as s:
            thing = (await s.scalars(plain, execution_options=call_options)).one()
            assert isinstance(thing, Thing)
            thing.size += 1
    async with db.tx() as s:
        assert (await s.scalar(select(Thing.size))) == 10


async def test_a_tuple_in_list_falls_back_to_sqlalchemy_and_still_answers(db: Database) -> None:
    async with db.tx() as s:
        for uuid in "ab":
            await s.execute(insert(Thing), {"uuid": uuid})
    pairs = select(Thing.uuid).where(tuple_(Thing.uuid, Thing.size).in_(bindparam("pairs"))).order_by(Thing.uuid)
    for _ in range(3):
        async with db.tx() as s:
            assert (await s.scalars(pairs, {"pairs": [("a", 7), ("b", 8)]})).all() == ["a"]


@pytest.mark.parametrize("fails", [False, True])
async def test_a_transaction_through_every_path_ends_whole(db: Database, fails: bool) -> None:
    """A transaction may write through SQLAlchemy's Connection (a statement's first run), the ORM
    Session and fastsql (later runs): it commits or rolls back as one, and leaves no transaction
    open on the connection for the next one to join."""
    grow = update(Thing).values(size=Thing.size + 1).where(Thing.uuid == bindparam("u"))
    async with db.tx() as s:
        await s.execute(INSERT, {"uuid": "a"})
    for n in range(2):  # grow runs through SQLAlchemy, then through fastsql
        with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
            async with db.tx() as s:
                await s.execute(grow, {"u": "a"}, execution_options=NO_SYNC)
                s.add(Thing(uuid=f"orm{n}"))
                await s.execute(INSERT, {"uuid": f"core{n}"})
                if fails:
                    raise RuntimeError("a later step failed")
        assert not db.connection().in_transaction() and not db.dbapi().in_transaction
    async with db.tx() as s:
        uuids = (await s.scalars(select(Thing.uuid).order_by(Thing.uuid))).all()
        size = await s.scalar(select(Thing.size).where(Thing.uuid == "a"))
    if fails:
        assert (uuids, size) == (["a"], 7)
    else:
        assert (uuids, size) == (["a", "core0", "core1", "orm0", "orm1"], 9)


async def test_a_database_error_is_sqlalchemys_whichever_path_ran(db: Database) -> None:
    for uuid in "ab":
        async with db.tx() as s:
            await s.execute(INSERT, {"uuid": uuid})
    assert _marked_fast(INSERT)
    with pytest.raises(IntegrityError, match="UNIQUE constraint failed"):
        async with db.tx() as s:
            await s.execute(INSERT, {"uuid": "a"})
    async with db.tx() as s:  # the failed transaction left nothing behind, the connection works on
        assert (await s.scalars(ALL)).all() == ["a", "b"]


async def test_an_update_that_asks_for_synchronisation_keeps_loaded_objects_in_step(db: Database) -> None:
    async with db.tx() as s:
        await s.execute(insert(Thing), {"uuid": "a", "size": -5})
    for _ in range(2):  # prepared for the fast path by calls that need no synchronisation
        async with db.tx() as s:
            await s.execute(GROW_IF_SMALL, execution_options=NO_SYNC)
    async with db.tx() as s:
        thing = await s.get(Thing, "a")
        assert thing is not None and thing.size == 5
        await s.execute(GROW_IF_SMALL)  # no option: the ORM brings the loaded object in step
        assert thing.size == 10
    async with db.tx() as s:
        assert (await s.scalar(select(Thing.size))) == 10
