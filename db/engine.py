"""Engines for each backend, and which backend a URL points at."""

from __future__ import annotations

import enum
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url


class Backend(enum.StrEnum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"
    TIMESCALEDB = "timescaledb"


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for any other backend."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise ValueError("SQLite needs a file (in-memory databases are per connection)")
    return Path(parsed.database)


def configure_sqlite(
    connection: sqlite3.Connection, synchronous: str, busy_timeout_ms: int
) -> None:
    """Pragmas every SQLite connection of the service runs with.

    WAL lets readers run beside the writer; the busy timeout makes a second
    writer wait instead of failing at once.
    """
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA synchronous={synchronous}")
    connection.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")


def make_engine(
    url: str, *, sqlite_synchronous: str = "NORMAL", sqlite_busy_timeout_ms: int = 5000
) -> Engine:
    """An engine for `url`, with the settings the service needs on that backend."""
    path = sqlite_path(url)
    if path is None:
        # pool_pre_ping turns a connection broken by a database restart into a
        # fresh one instead of an error on the next request.
        return create_engine(url, pool_pre_ping=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        configure_sqlite(dbapi_connection, sqlite_synchronous, sqlite_busy_timeout_ms)

    return engine


def backend_of(bind: Engine | Connection) -> Backend:
    """Which of the supported backends `bind` (an engine or an open connection) talks to.

    TimescaleDB is PostgreSQL with the extension installed in this database.
    """
    if bind.dialect.name == "sqlite":
        return Backend.SQLITE
    query = text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
    if isinstance(bind, Connection):
        has_timescale = bind.execute(query).first()
    else:
        with bind.connect() as connection:
            has_timescale = connection.execute(query).first()
    return Backend.TIMESCALEDB if has_timescale else Backend.POSTGRESQL
