"""The SQLite transaction (db/engine.py InlineSession) answers as SQLAlchemy does: a read of columns
gives Rows on every call, a read of entities gives ORM objects, and a transaction that went through
both the Connection and the Session commits or rolls back as one."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import Row, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from nimbostack.db import models as m
from nimbostack.db.engine import NO_SYNC, Database, columns, get_row, in_values, rowcount

ZONE_NAMES = select(m.Zone.name).order_by(m.Zone.name)
RENAME = update(m.Zone).where(m.Zone.uuid == bindparam("zone")).values(name=bindparam("name"))
ZONES_BY_STATE = select(*columns(m.Zone)).where(m.Zone.state == bindparam("state")).order_by(m.Zone.uuid)


def _uuid(c: str) -> str:
    return c * 32


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'n.db'}")
    m.Base.metadata.create_all(database.sync_engine)
    async with database.tx() as s:
        for c in "ab":
            await s.execute(insert(m.Zone), {"uuid": _uuid(c), "name": f"zone-{c}"})
    yield database
    await database.close()


async def test_a_read_gives_the_same_read_only_row_on_every_call(db: Database) -> None:
    """The records of the old fast path came only from a statement's second run: its first gave ORM
    objects, whose changes were committed. A Row is a Row from the first call on."""
    for _ in range(3):
        async with db.tx() as s:
            zone = await get_row(s, m.Zone, _uuid("a"))
            (listed,) = (await s.execute(ZONES_BY_STATE, {"state": "Enabled"})).all()[:1]
        for row in (zone, listed):
            assert type(row) is Row
            assert row.uuid == _uuid("a") and row.name == "zone-a" and isinstance(row.createDate, datetime)
            with pytest.raises(AttributeError):
                row.name = "renamed"  # type: ignore[misc]
    async with db.tx() as s:
        assert await get_row(s, m.Zone, _uuid("z")) is None
        assert (await s.execute(ZONE_NAMES)).scalars().all() == ["zone-a", "zone-b"]


async def test_a_read_of_entities_gives_objects_of_the_session_whose_changes_commit(db: Database) -> None:
    for n in range(2):
        async with db.tx() as s:
            zone = (await s.execute(select(m.Zone).where(m.Zone.uuid == _uuid("a")))).scalar_one()
            assert isinstance(zone, m.Zone)
            zone.name = f"renamed-{n}"
    async with db.tx() as s:
        assert (await s.get(m.Zone, _uuid("a"))).name == "renamed-1"  # type: ignore[union-attr]


async def test_pending_objects_are_flushed_before_a_read_of_columns(db: Database) -> None:
    async with db.tx() as s:
        s.add(m.Zone(uuid=_uuid("c"), name="zone-c"))
        assert (await s.execute(ZONE_NAMES)).scalars().all() == ["zone-a", "zone-b", "zone-c"]


async def test_an_update_of_a_mapped_class_keeps_loaded_objects_in_step_unless_told_not_to(db: Database) -> None:
    async with db.tx() as s:
        zone = await s.get(m.Zone, _uuid("a"))
        assert zone is not None
        await s.execute(update(m.Zone).where(m.Zone.uuid == _uuid("a")).values(name="synced"))
        assert zone.name == "synced"  # through the Session, which brought the object in step
        await s.execute(RENAME, {"zone": _uuid("a"), "name": "unsynced"}, execution_options=NO_SYNC)
        assert zone.name == "synced"  # on the Connection: the object is as it was loaded
    async with db.tx() as s:
        assert (await get_row(s, m.Zone, _uuid("a"))).name == "unsynced"  # type: ignore[union-attr]


@pytest.mark.parametrize("fails", [False, True])
async def test_a_transaction_through_both_doors_ends_whole(db: Database, fails: bool) -> None:
    """Statements on the Connection before the Session is made (it then joins their transaction),
    and after: the transaction commits or rolls back as one, and leaves none open."""
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        async with db.tx() as s:
            assert rowcount(await s.execute(RENAME, {"zone": _uuid("a"), "name": "core"})) == 1
            s.add(m.Zone(uuid=_uuid("c"), name="orm"))
            await s.execute(insert(m.Zone), {"uuid": _uuid("d"), "name": "core-after"})
            if fails:
                raise RuntimeError("a later step failed")
    assert not db.connection().in_transaction()
    async with db.tx() as s:
        names = (await s.execute(ZONE_NAMES)).scalars().all()
    assert names == (["zone-a", "zone-b"] if fails else ["core", "core-after", "orm", "zone-b"])


async def test_a_database_error_is_sqlalchemys_and_leaves_the_connection_usable(db: Database) -> None:
    with pytest.raises(IntegrityError, match="UNIQUE constraint failed"):
        async with db.tx() as s:
            await s.execute(insert(m.Zone), {"uuid": _uuid("a"), "name": "again"})
    async with db.tx() as s:
        assert (await s.execute(ZONE_NAMES)).scalars().all() == ["zone-a", "zone-b"]


async def test_in_values_is_a_fixed_in_list_that_answers_as_in(db: Database) -> None:
    fixed = select(m.Zone.name).where(in_values(m.Zone.uuid, [_uuid("b"), _uuid("z")]))
    assert "POSTCOMPILE" not in str(fixed.compile(dialect=db.sync_engine.dialect))
    async with db.tx() as s:
        assert (await s.execute(fixed)).scalars().all() == ["zone-b"]
