"""Alembic environment: one migration history for SQLite, PostgreSQL and TimescaleDB."""

from __future__ import annotations

from typing import Any

from alembic import context

from db.aggregates import ROLLUP_TABLES
from db.engine import make_engine
from db.models import Base

config = context.config


def _database_url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        # Plain `alembic` from the repository root: the same setting as the service.
        from api.settings import load_settings

        url = load_settings().database_url
    return str(url)


def _include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Leave the rollup tables out of `alembic check`: they are made from the
    aggregate registry (db/aggregates.py) and exist only where the service
    maintains the aggregates itself."""
    table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
    return table not in ROLLUP_TABLES


def run_migrations_online() -> None:
    engine = make_engine(_database_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            # SQLite cannot ALTER most things in place; batch mode copies the table.
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
            include_object=_include_object,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run them against a database")
run_migrations_online()
