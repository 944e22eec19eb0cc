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
        return self.write_batches([self.prepare(hits)])

    def prepare(self, hits: Sequence[NewHit]) -> HitBatch:
        """`hits` made ready for `write_batches`: the work that needs no database,
        done by the caller, so that a writer shared by many threads (a group
        commit) spends its turn on writing alone."""
        return self._writer.prepare(hits)

    def write_batches(self, batches: Sequence[HitBatch]) -> int:
        """Commit every batch in one transaction; return how many hits were new."""
        if not any(batches):
            return 0
        return self._writer.write(batches)

    def close(self) -> None:
        self._writer.close()


class HitBatch:
    """Hits as a writer binds them (see HitStore.prepare); false when empty."""

    __slots__ = ("hits", "keyed", "values")

    def __init__(self, hits: Sequence[NewHit]) -> None:
        self.hits = hits
        # Whether any hit carries an event id (stored once however often it comes).
        self.keyed = any(hit.event_id is not None for hit in hits)
        # The SQLite writer's parameters, row after row (None elsewhere, or when keyed).
        self.values: list[object] | None = None

    def __len__(self) -> int:
        return len(self.hits)


class _SqliteWriter:
    """A dedicated connection per process, bypassing the pool and the ORM.

    Processes serialise their write transactions on a blocking file lock rather
    than on SQLite's busy handler, which polls in millisecond sleeps when two
    processes contend and so wastes most of a group commit's time.
    """

    REMEMBER = "INSERT INTO seen_events (event_id, ts) VALUES (?, ?) ON CONFLICT DO NOTHING"

    def __init__(self, path: Path, synchronous: str, busy_timeout_ms: int) -> None:
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        configure_sqlite(self._connection, synchronous, busy_timeout_ms)
        # Kept open, unlike sqlite_write_lock's: an open() per commit is paid on the hot path.
        self._lock_file = open(write_lock_path(path), "ab")  # noqa: SIM115 - lives with the writer
        self._mutex = threading.Lock()

    def prepare(self, hits: Sequence[NewHit]) -> HitBatch:
        batch = HitBatch(hits)
        if not batch.keyed:  # keyed batches are bound hit by hit, once the new ones are known
            batch.values = self._values(hits)
        return batch

    def write(self, batches: Sequence[HitBatch]) -> int:
        with self._mutex:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                return self._write_locked(batches)
            except sqlite3.Error as exc:
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                # Locked, busy, full, unreadable: worth retrying. Corruption or a
                # refused row is not, and stays a 500 with its traceback logged.
                if isinstance(exc, sqlite3.OperationalError):
                    raise StorageUnavailable(str(exc)) from exc
                raise
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _write_locked(self, batches: Sequence[HitBatch]) -> int:
        connection = self._connection
        if not any(batch.keyed for batch in batches):
            values: list[object] = []
            for batch in batches:
                values += batch.values  # type: ignore[arg-type]  # unkeyed: always set
            chunks = _statement_rows(sum(len(batch) for batch in batches))
            if len(chunks) == 1:
                # One INSERT outside BEGIN/COMMIT is a transaction of its own.
                self._insert(values, chunks)
                return chunks[0]
            connection.execute("BEGIN IMMEDIATE")
            self._insert(values, chunks)
            connection.execute("COMMIT")
            return sum(chunks)
        connection.execute("BEGIN IMMEDIATE")
        new_hits = []
        for batch in batches:
            for hit in batch.hits:
                if hit.event_id is not None:
                    cursor = connection.execute(self.REMEMBER, (hit.event_id, _sqlite_ts(hit.ts)))
                    if cursor.rowcount == 0:
                        continue  # seen before: acknowledged again, stored once
                new_hits.append(hit)
        self._insert(self._values(new_hits), _statement_rows(len(new_hits)))
        connection.execute("COMMIT")
        return len(new_hits)

    @staticmethod
    def _values(hits: Sequence[NewHit]) -> list[object]:
        """The parameters of `hits`, row after row.

        Binding a parameter that is not exactly str, int, float or bytearray
        first searches for an adapter, which costs more than the binding
        itself: so the hash goes as a bytearray (stored as the same BLOB) and
        is_bot as 0 or 1 (what SQLAlchemy's Boolean stores on SQLite).
        """
        values: list[object] = []
        last_ts, text_ts = None, ""
        last_hash, blob = b"", bytearray()
        for h in hits:
            # A request's events share one timestamp and one hash: converted once.
            if h.ts is not last_ts:
                last_ts, text_ts = h.ts, _sqlite_ts(h.ts)
            if h.ip_hash is not last_hash:
                last_hash, blob = h.ip_hash, bytearray(h.ip_hash)
            values += (text_ts, h.site, h.path, h.referrer, blob, h.user_agent,
                       h.browser, h.os, h.device, 1 if h.is_bot else 0)  # fmt: skip
        return values

    def _insert(self, values: list[object], chunks: Sequence[int]) -> None:
        """Insert `values`, row after row, in statements of `chunks` rows each
        (see _statement_rows): a multi-row VALUES statement makes one call into
        SQLite where executemany would make one per row, and every call releases
        and re-acquires the GIL, which under load can wait a whole switch
        interval (5 ms) behind request threads."""
        if len(chunks) == 1:
            self._connection.execute(insert_sql(chunks[0]), values)
            return
        # (no chunks: every hit of a keyed group was a repeat)
        width = len(HIT_COLUMNS)
        start = 0
        for rows in chunks:
            end = start + rows * width
            self._connection.execute(insert_sql(rows), values[start:end])
            start = end

    def close(self) -> None:
        self._connection.close()
        self._lock_file.close()


# Row counts up to this many get an INSERT statement of their own; larger ones
# are split into powers of two (at most 2048 rows, 20,480 parameters: SQLite
# allows 32,766) and an exact rest. SQLite keeps each distinct statement
# prepared, at about 0.9 KB a row (128 statements of 2,000 rows: 229 MB), so
# their shapes must be few: at most 70 here, about 6 MB.
EXACT_ROWS = 64
MAX_ROWS_PER_STATEMENT = 2048


def _statement_rows(rows: int) -> list[int]:
    """How many rows each INSERT of a group of `rows` carries."""
    chunks = []
    while rows > EXACT_ROWS:
        chunk = min(MAX_ROWS_PER_STATEMENT, 1 << (rows.bit_length() - 1))
        chunks.append(chunk)
        rows -= chunk
    if rows:
        chunks.append(rows)
    return chunks


_ROW = f"({', '.join('?' * len(HIT_COLUMNS))})"


@functools.cache
def insert_sql(rows: int) -> str:
    """A SQLite INSERT of `rows` rows of hits (the writer's and the bulk loader's)."""
    return f"INSERT INTO hits ({', '.join(HIT_COLUMNS)}) VALUES " + ", ".join([_ROW] * rows)


def _sqlite_ts(ts: datetime) -> str:
    # The text form SQLAlchemy's SQLite DateTime reads and writes (UTC, microseconds).
    return ts.replace(tzinfo=None).isoformat(" ", "microseconds")


class _SqlAlchemyWriter:
    """PostgreSQL and TimescaleDB: pooled connections, batched inserts."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def prepare(self, hits: Sequence[NewHit]) -> HitBatch:
        return HitBatch(hits)

    def write(self, batches: Sequence[HitBatch]) -> int:
        hits = [hit for batch in batches for hit in batch.hits]
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
