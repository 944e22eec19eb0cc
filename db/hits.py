"""Writing hits: the hot path of ingestion, and the one place that knows the
fastest way to insert them on each backend."""

from __future__ import annotations

import fcntl
import functools
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import psycopg
from sqlalchemy import Engine, insert
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert

from db.engine import configure_sqlite, sqlite_path
from db.models import Hit, SeenEvent


class NewHit(NamedTuple):
    """A validated, hashed hit ready to be stored. `ts` is timezone-aware UTC."""

    ts: datetime
    site: str
    path: str
    referrer: str | None
    ip_hash: bytes
    user_agent: str | None
    browser: str | None
    os: str | None
    device: str
    is_bot: bool
    event_id: str | None = None


HIT_COLUMNS = ("ts", "site", "path", "referrer", "ip_hash", "user_agent", "browser", "os",
               "device", "is_bot")  # fmt: skip


class StorageUnavailable(Exception):
    """The database cannot be written right now; the client should retry later."""


# Server states that pass: the server is restarting or shutting down, or it is a
# read-only standby (e.g. the old primary after a failover). psycopg reports the
# last one as an InternalError, which SQLAlchemy does not treat as a lost connection.
_UNAVAILABLE_SERVER_ERRORS = (
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.AdminShutdown,
    psycopg.errors.CannotConnectNow,
)


@contextmanager
def outages_as_unavailable() -> Iterator[None]:
    """Turn a database error that means "retry later" into StorageUnavailable (503);
    any other error (a bug: 500) passes unchanged."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) or isinstance(
            exc.orig, _UNAVAILABLE_SERVER_ERRORS
        ):
            raise StorageUnavailable(str(exc.orig or exc)) from exc
        raise


def write_lock_path(database: Path) -> str:
    """The file every SQLite writer of the service locks around its write transaction."""
    return f"{database}-writelock"


@contextmanager
def sqlite_write_lock(path: Path) -> Iterator[None]:
    """The blocking file lock every SQLite writer of the service holds around its
    write transaction (see _SqliteWriter); rollup refreshes and retention take it too."""
    with open(write_lock_path(path), "ab") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def writers_lock(engine: Engine) -> AbstractContextManager[None]:
    """For bulk changes beside ingestion (refreshes, retention): on SQLite, queue
    with the hit writers on their file lock instead of failing them on SQLite's
    busy timeout; elsewhere the database's row locks suffice."""
    path = sqlite_path(str(engine.url))
    return sqlite_write_lock(path) if path is not None else nullcontext()


class HitStore:
    """Stores groups of hits, each group in one transaction, each event id once."""

    def __init__(
        self, engine: Engine, *, sqlite_synchronous: str = "NORMAL", busy_timeout_ms: int = 5000
    ) -> None:
        path = sqlite_path(str(engine.url))
        self._writer: _SqliteWriter | _SqlAlchemyWriter
        if path is not None:
            self._writer = _SqliteWriter(path, sqlite_synchronous, busy_timeout_ms)
        else:
            self._writer = _SqlAlchemyWriter(engine)

    def write(self, hits: Sequence[NewHit]) -> int:
        """Commit `hits` in one transaction; return how many were new (not repeats)."""
        if not hits:
            return 0
        return self._writer.write(hits)

    def close(self) -> None:
        self._writer.close()


class _SqliteWriter:
    """A dedicated connection per process, bypassing the pool and the ORM.

    Processes serialise their write transactions on a blocking file lock rather
    than on SQLite's busy handler, which polls in millisecond sleeps when two
    processes contend and so wastes most of a group commit's time.
    """

    ROW = f"({', '.join('?' * len(HIT_COLUMNS))})"
    INSERT = f"INSERT INTO hits ({', '.join(HIT_COLUMNS)}) VALUES {ROW}"
    # SQLite allows 32766 parameters per statement.
    ROWS_PER_STATEMENT = 1000
    REMEMBER = "INSERT INTO seen_events (event_id, ts) VALUES (?, ?) ON CONFLICT DO NOTHING"

    def __init__(self, path: Path, synchronous: str, busy_timeout_ms: int) -> None:
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        configure_sqlite(self._connection, synchronous, busy_timeout_ms)
        # Kept open, unlike sqlite_write_lock's: an open() per commit is paid on the hot path.
        self._lock_file = open(write_lock_path(path), "ab")  # noqa: SIM115 - lives with the writer
        self._mutex = threading.Lock()

    def write(self, hits: Sequence[NewHit]) -> int:
        with self._mutex:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                return self._write_locked(hits)
            except sqlite3.Error as exc:
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
                    raise StorageUnavailable(str(exc)) from exc
                raise
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _write_locked(self, hits: Sequence[NewHit]) -> int:
        connection = self._connection
        if len(hits) <= self.ROWS_PER_STATEMENT and not any(hit.event_id for hit in hits):
            # One multi-row INSERT outside BEGIN/COMMIT is a transaction of its own
            # (more rows take several statements, which must share one).
            self._insert(hits)
            return len(hits)
        connection.execute("BEGIN IMMEDIATE")
        new_hits = []
        for hit in hits:
            if hit.event_id is not None:
                cursor = connection.execute(self.REMEMBER, (hit.event_id, _sqlite_ts(hit.ts)))
                if cursor.rowcount == 0:
                    continue  # seen before: acknowledged again, stored once
            new_hits.append(hit)
        self._insert(new_hits)
        connection.execute("COMMIT")
        return len(new_hits)

    def _insert(self, hits: Sequence[NewHit]) -> None:
        """Insert with as few calls into SQLite as possible.

        Every call releases and re-acquires the GIL, and under load each
        re-acquisition can wait a whole switch interval (5 ms) behind request
        threads; executemany makes one such call per row, a multi-row VALUES
        statement one per chunk.

        Binding a parameter that is not exactly str, int, float or bytearray
        first searches for an adapter, which costs more than the binding
        itself: so the hash goes as a bytearray (stored as the same BLOB) and
        is_bot as 0 or 1 (what SQLAlchemy's Boolean stores on SQLite).
        """
        for start in range(0, len(hits), self.ROWS_PER_STATEMENT):
            chunk = hits[start : start + self.ROWS_PER_STATEMENT]
            values: list[object] = []
            last_ts, text_ts = None, ""
            last_hash, blob = b"", bytearray()
            for h in chunk:
                # A request's events share one timestamp and one hash: converted once.
                if h.ts is not last_ts:
                    last_ts, text_ts = h.ts, _sqlite_ts(h.ts)
                if h.ip_hash is not last_hash:
                    last_hash, blob = h.ip_hash, bytearray(h.ip_hash)
                values += (text_ts, h.site, h.path, h.referrer, blob, h.user_agent,
                           h.browser, h.os, h.device, 1 if h.is_bot else 0)  # fmt: skip
            self._connection.execute(self._insert_sql(len(chunk)), values)

    @classmethod
    @functools.cache
    def _insert_sql(cls, rows: int) -> str:
        return cls.INSERT + (", " + cls.ROW) * (rows - 1)

    def close(self) -> None:
        self._connection.close()
        self._lock_file.close()


def _sqlite_ts(ts: datetime) -> str:
    # The text form SQLAlchemy's SQLite DateTime reads and writes (UTC, microseconds).
    return ts.replace(tzinfo=None).isoformat(" ", "microseconds")


class _SqlAlchemyWriter:
    """PostgreSQL and TimescaleDB: pooled connections, batched inserts."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def write(self, hits: Sequence[NewHit]) -> int:
        with outages_as_unavailable(), self._engine.begin() as connection:
            new_hits: Sequence[NewHit] = hits
            keyed = {h.event_id: h.ts for h in hits if h.event_id is not None}
            if keyed:
                remembered = set(
                    connection.scalars(
                        pg_insert(SeenEvent)
                        .values([{"event_id": k, "ts": ts} for k, ts in keyed.items()])
                        .on_conflict_do_nothing()
                        .returning(SeenEvent.event_id)
                    )
                )
                new_hits = []
                for hit in hits:
                    if hit.event_id is not None:
                        if hit.event_id not in remembered:
                            continue
                        remembered.discard(hit.event_id)  # a repeat inside the group
                    new_hits.append(hit)
            if new_hits:
                connection.execute(
                    insert(Hit), [dict(zip(HIT_COLUMNS, h[:10], strict=True)) for h in new_hits]
                )
            return len(new_hits)

    def close(self) -> None:
        pass
