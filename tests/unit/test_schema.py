"""The Alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from nimbostack.db.engine import upgrade_schema
from nimbostack.db.models import Base


def test_migrations_match_models(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    upgrade_schema(f"sqlite+aiosqlite:///{db}")
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations differ; add a migration: {diff}"
