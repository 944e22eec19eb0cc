"""Loading many hits at once: imports, backfills, benchmarks and test datasets.

The hot path of ingestion (`db.hits.HitStore`) writes small groups of rows as
they arrive. This module writes millions: on PostgreSQL and TimescaleDB with
one `COPY hits (...) FROM STDIN`, on SQLite with multi-row INSERTs in big
transactions. The rows stored are exactly those `HitStore.write` would store
for the same hits (no event ids: a bulk load has no idempotency keys).

Hits travel as columns (`HitChunk`), so that a generator can produce them with
numpy and the loader can format a whole chunk with a few vectorised calls
instead of a Python loop per row and field.

Loading does not refresh the aggregates; the caller does that afterwards.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from psycopg.copy import QueuedLibpqWriter
from sqlalchemy import Connection, Engine

from db.engine import configure_sqlite, sqlite_path
from db.hits import HIT_COLUMNS, NewHit, sqlite_write_lock

Column = npt.NDArray[Any]


@dataclass(frozen=True)
class HitChunk:
    """A batch of hits as equally long column arrays, in `HIT_COLUMNS` order.

    `ts` is `datetime64[us]` holding UTC; `is_bot` is bool; the other columns
    are object arrays of `str` (`bytes` for `ip_hash`), with None where the
    column is nullable.
    """

    ts: Column
    site: Column
    path: Column
    referrer: Column
    ip_hash: Column
    user_agent: Column
    browser: Column
    os: Column
    device: Column
    is_bot: Column

    def __len__(self) -> int:
        return len(self.ts)

    def columns(self) -> tuple[Column, ...]:
        return tuple(getattr(self, name) for name in HIT_COLUMNS)

    @classmethod
    def from_hits(cls, hits: Sequence[NewHit]) -> HitChunk:
        """The columns of `hits` (their event ids are ignored)."""
        ts = np.array(
            [h.ts.astimezone(UTC).replace(tzinfo=None) for h in hits], dtype="datetime64[us]"
        )
        text = {}
        for index, name in enumerate(HIT_COLUMNS[1:9], start=1):
            column = np.empty(len(hits), dtype=object)
            column[:] = [h[index] for h in hits]
            text[name] = column
        is_bot = np.array([h.is_bot for h in hits], dtype=bool)
        return cls(ts=ts, is_bot=is_bot, **text)

    def to_hits(self) -> list[NewHit]:
        """The hits as `NewHit`s, with timezone-aware UTC timestamps."""
        ts = [t.replace(tzinfo=UTC) for t in self.ts.astype("datetime64[us]").tolist()]
        rest = [column.tolist() for column in self.columns()[1:]]
        return [NewHit(*row) for row in zip(ts, *rest, strict=True)]

    def take(self, index: npt.NDArray[np.intp] | slice) -> HitChunk:
        """The rows at `index` (an index array or a slice), as a new chunk."""
        return HitChunk(*(column[index] for column in self.columns()))


assert tuple(f.name for f in fields(HitChunk)) == HIT_COLUMNS


def load_hits(engine: Engine, chunks: Iterable[HitChunk]) -> int:
    """Store every hit of `chunks` with the fastest path of `engine`'s backend.

    One transaction per chunk on SQLite (other writers get their turn between
    chunks); one transaction and one COPY on PostgreSQL and TimescaleDB.
    Returns how many hits were stored.
    """
    path = sqlite_path(str(engine.url))
    if path is not None:
        return _load_sqlite(path, chunks)
    return _load_postgresql(engine, chunks)


# --- SQLite ------------------------------------------------------------------

SQLITE_ROW = f"({', '.join('?' * len(HIT_COLUMNS))})"
SQLITE_INSERT = f"INSERT INTO hits ({', '.join(HIT_COLUMNS)}) VALUES "
# SQLite allows 32766 parameters per statement: 3000 rows of 10.
SQLITE_ROWS_PER_STATEMENT = 3000


@functools.cache
def _sqlite_insert_sql(rows: int) -> str:
    return SQLITE_INSERT + ", ".join([SQLITE_ROW] * rows)


def sqlite_rows(chunk: HitChunk) -> list[tuple[Any, ...]]:
    """The chunk as the parameter tuples the SQLite writer binds (ts as text)."""
    return list(zip(*_sqlite_columns(chunk), strict=True))


def _sqlite_columns(chunk: HitChunk) -> list[list[Any]]:
    # The same values `HitStore` binds: the text of `db.hits._sqlite_ts`, and
    # Python bools, which SQLite stores as 1 and 0.
    ts = _iso_timestamps(chunk.ts, suffix=b"").astype("U26")
    return [ts.tolist(), *(column.tolist() for column in chunk.columns()[1:])]


def _load_sqlite(path: Path, chunks: Iterable[HitChunk]) -> int:
    connection = sqlite3.connect(path, isolation_level=None)
    total = 0
    try:
        configure_sqlite(connection, "NORMAL", 5000)
        for chunk in chunks:
            rows = len(chunk)
            if not rows:
                continue
            # Between chunks the service's own writers get their turn.
            with sqlite_write_lock(path):
                connection.execute("BEGIN IMMEDIATE")
                try:
                    _insert_sqlite(connection, chunk)
                    connection.execute("COMMIT")
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
            total += rows
    finally:
        connection.close()
    return total


def _insert_sqlite(connection: sqlite3.Connection, chunk: HitChunk) -> None:
    """Insert `chunk` with multi-row INSERTs, in the caller's transaction."""
    width = len(HIT_COLUMNS)
    rows = len(chunk)
    values = list(chain.from_iterable(zip(*_sqlite_columns(chunk), strict=True)))
    for start in range(0, rows, SQLITE_ROWS_PER_STATEMENT):
        stop = min(start + SQLITE_ROWS_PER_STATEMENT, rows)
        connection.execute(_sqlite_insert_sql(stop - start), values[start * width : stop * width])


def insert_chunk(connection: Connection, chunk: HitChunk) -> None:
    """Insert `chunk` inside the caller's transaction on `connection`, with the
    same fast path as `load_hits` (for writes that must commit together with
    other rows, such as an import's batch and its idempotency key)."""
    if not len(chunk):
        return
    driver = connection.connection.driver_connection
    if connection.dialect.name == "sqlite":
        assert isinstance(driver, sqlite3.Connection)
        _insert_sqlite(driver, chunk)
        return
    cursor = driver.cursor()  # type: ignore[union-attr]
    with cursor.copy(COPY_SQL) as copy:
        copy.write(copy_text(chunk))


# --- PostgreSQL and TimescaleDB ----------------------------------------------

COPY_SQL = f"COPY hits ({', '.join(HIT_COLUMNS)}) FROM STDIN"


def _load_postgresql(engine: Engine, chunks: Iterable[HitChunk]) -> int:
    total = 0
    with engine.begin() as connection:
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        # The queued writer sends from a thread of its own, so the server
        # stores one chunk while this thread formats the next.
        with cursor.copy(COPY_SQL, writer=QueuedLibpqWriter(cursor)) as copy:
            for chunk in chunks:
                if len(chunk):
                    copy.write(copy_text(chunk))
                    total += len(chunk)
    return total


def copy_text(chunk: HitChunk) -> bytes:
    """The chunk in PostgreSQL's COPY text format, one line per hit.

    Formatted here, a whole column at a time, rather than row by row with
    `Copy.write_row` (text or binary), which bench/queries.py measured slower:
    timestamps and hashes with numpy, and columns whose values repeat (site
    and path, the user agent and what was parsed from it) once per distinct
    combination. Only the final join runs per row, and it runs in C.
    """
    parts = [
        _iso_timestamps(chunk.ts, suffix=b"+00").tolist(),
        _copy_group(chunk.site, chunk.path),
        _copy_group(chunk.referrer),
        _copy_bytea(chunk.ip_hash),
        _copy_group(chunk.user_agent, chunk.browser, chunk.os, chunk.device, chunk.is_bot),
    ]
    return b"\n".join(map(b"\t".join, zip(*parts, strict=True))) + b"\n"


def _copy_group(*columns: Column) -> list[bytes]:
    """The tab-joined COPY text of `columns`, formatted once per distinct row."""
    key: npt.NDArray[np.intp] | None = None
    column_codes = []
    column_texts = []
    for column in columns:
        codes, uniques = pd.factorize(column, use_na_sentinel=True)
        codes[codes < 0] = len(uniques)  # None, formatted as \N
        column_codes.append(codes)
        column_texts.append([*map(_copy_value, uniques), b"\\N"])
        combined = codes if key is None else key * (len(uniques) + 1) + codes
        key = pd.factorize(combined)[0]  # keeps the next product small
    assert key is not None
    # factorize numbers combinations 0, 1, ... in order of appearance.
    _, first = np.unique(key, return_index=True)
    texts = np.empty(len(first), dtype=object)
    texts[:] = [
        b"\t".join(column_texts[j][column_codes[j][row]] for j in range(len(columns)))
        for row in first.tolist()
    ]
    result: list[bytes] = texts[key].tolist()
    return result


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_value(value: object) -> bytes:
    """One non-NULL value in COPY text format."""
    if isinstance(value, bool | np.bool_):
        return b"t" if value else b"f"
    if isinstance(value, bytes):
        return b"\\\\x" + value.hex().encode()
    return str(value).translate(_COPY_ESCAPES).encode()


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _copy_bytea(column: Column) -> list[bytes]:
    # bytea's text form is \x<hex>, and COPY doubles the backslash.
    joined = b"".join(column.tolist())
    if len(joined) != 16 * len(column):  # not all 16 bytes: the general, slower way
        return [b"\\\\x" + value.hex().encode() for value in column.tolist()]
    raw = np.frombuffer(joined, dtype=np.uint8).reshape(-1, 16)
    text = np.empty((len(column), 35), dtype=np.uint8)
    text[:, 0:3] = np.frombuffer(b"\\\\x", dtype=np.uint8)
    text[:, 3::2] = _HEX[raw >> 4]
    text[:, 4::2] = _HEX[raw & 15]
    result: list[bytes] = text.view("S35").ravel().tolist()
    return result


_FIRST_YEAR = np.datetime64("1000-01-01", "us")
_AFTER_LAST_YEAR = np.datetime64("10000-01-01", "us")
_ISO_TEMPLATE = np.frombuffer(b"0000-00-00 00:00:00.000000", dtype=np.uint8)


def _iso_timestamps(ts: Column, *, suffix: bytes) -> npt.NDArray[np.bytes_]:
    """`YYYY-MM-DD HH:MM:SS.ffffff` + suffix for each UTC timestamp, as bytes.

    Without a suffix this is exactly `db.hits._sqlite_ts`. Digits are computed
    with integer arithmetic on whole columns: ten times faster than
    `np.datetime_as_string`, which was the most expensive step of a load.
    """
    ts = ts.astype("datetime64[us]")
    if len(ts) and (ts.min() < _FIRST_YEAR or ts.max() >= _AFTER_LAST_YEAR):
        raise ValueError("timestamps must fall in the years 1000 to 9999")
    months = ts.astype("datetime64[M]")
    days = ts.astype("datetime64[D]")
    fields: list[tuple[int, int, npt.NDArray[np.int64]]] = [
        (0, 4, months.astype("datetime64[Y]").astype(np.int64) + 1970),
        (5, 2, months.astype(np.int64) % 12 + 1),
        (8, 2, (days - months).astype(np.int64) + 1),
    ]
    micros = (ts - days).astype(np.int64)
    seconds = micros // 1_000_000
    fields += [
        (11, 2, seconds // 3600),
        (14, 2, seconds // 60 % 60),
        (17, 2, seconds % 60),
        (20, 6, micros % 1_000_000),
    ]
    width = 26 + len(suffix)
    text = np.empty((len(ts), width), dtype=np.uint8)
    text[:, :26] = _ISO_TEMPLATE
    text[:, 26:] = np.frombuffer(suffix, dtype=np.uint8)
    for start, digits, value in fields:
        for position in range(start + digits - 1, start - 1, -1):
            text[:, position] = 48 + value % 10
            value = value // 10
    return text.view(f"S{width}").ravel()
