"""Loading many hits at once: imports, backfills, benchmarks and test datasets.

The hot path of ingestion (`db.hits.HitStore`) writes small groups of rows as
they arrive. This module writes millions: on PostgreSQL and TimescaleDB with
one `COPY hits (...) FROM STDIN`, on SQLite with multi-row INSERTs in big
transactions. The rows stored are exactly those `HitStore.write` would store
for the same hits (no event ids: a bulk load has no idempotency keys).

Hits travel as columns (`HitChunk`), so that a generator can produce them with
numpy and the loader can format a whole chunk with a few vectorised calls
instead of a Python loop per row and field. `format_hits` also takes them as an
Arrow table whose text columns may be dictionary-encoded (`pa.Table`, what
`telemetry import` makes): only the distinct values are formatted then.

Loading does not refresh the aggregates; the caller does that afterwards.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from psycopg.copy import QueuedLibpqWriter
from sqlalchemy import Connection, Engine

from db.engine import configure_sqlite, sqlite_path
from db.hits import HIT_COLUMNS, NewHit, insert_sql, sqlite_write_lock

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

    @classmethod
    def from_arrow(cls, table: pa.Table) -> HitChunk:
        """The columns of a table of hits (see `arrow_copy_text`)."""
        micros = table.column("ts").combine_chunks().cast(pa.int64())
        text = {name: _objects(table.column(name).combine_chunks()) for name in HIT_COLUMNS[1:9]}
        is_bot = table.column("is_bot").combine_chunks().to_numpy(zero_copy_only=False)
        return cls(ts=micros.to_numpy().view("datetime64[us]"), is_bot=is_bot, **text)


def _objects(column: pa.Array) -> Column:
    """An Arrow column as an object array of Python values (None for null);
    a dictionary column converts each distinct value once."""
    if isinstance(column, pa.DictionaryArray):
        values = np.empty(len(column.dictionary) + 1, dtype=object)
        values[:-1] = column.dictionary.to_pylist()  # values[-1]: None, for null codes
        codes = pc.fill_null(column.indices, len(column.dictionary))
        return values[codes.to_numpy(zero_copy_only=False)]
    result = np.empty(len(column), dtype=object)
    result[:] = column.to_pylist()
    return result


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

# SQLite allows 32766 parameters per statement: 3000 rows of 10.
SQLITE_ROWS_PER_STATEMENT = 3000


def sqlite_rows(chunk: HitChunk) -> list[tuple[Any, ...]]:
    """The chunk as the parameter tuples the SQLite writer binds (ts as text)."""
    return list(zip(*_sqlite_columns(chunk), strict=True))


def _sqlite_columns(chunk: HitChunk) -> list[list[Any]]:
    # The same values `HitStore` binds (db/hits.py says why these types): the
    # text of `db.hits._sqlite_ts`, hashes as bytearrays, is_bot as 0 or 1.
    ts = _iso_timestamps(chunk.ts, suffix=b"").astype("U26")
    columns = [ts.tolist(), *(column.tolist() for column in chunk.columns()[1:9])]
    columns[HIT_COLUMNS.index("ip_hash")] = [bytearray(h) for h in chunk.ip_hash.tolist()]
    return [*columns, chunk.is_bot.astype(np.int64).tolist()]


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
    _insert_sqlite_values(connection, _sqlite_values(chunk), len(chunk))


def _sqlite_values(chunk: HitChunk) -> list[Any]:
    """The parameters of the chunk's rows, one after the other."""
    return list(chain.from_iterable(zip(*_sqlite_columns(chunk), strict=True)))


def _insert_sqlite_values(connection: sqlite3.Connection, values: list[Any], rows: int) -> None:
    width = len(HIT_COLUMNS)
    full = rows - rows % SQLITE_ROWS_PER_STATEMENT
    for start in range(0, full, SQLITE_ROWS_PER_STATEMENT):
        stop = start + SQLITE_ROWS_PER_STATEMENT
        connection.execute(insert_sql(stop - start), values[start * width : stop * width])
    # The rest row by row: a statement of as many rows would be compiled anew
    # for each chunk (10-15 ms for 2,000 rows), as its size differs each time.
    rest = values[full * width :]
    connection.executemany(insert_sql(1), [rest[i : i + width] for i in range(0, len(rest), width)])


@dataclass(frozen=True)
class FormattedHits:
    """Hits already in the form one backend's insert takes: the COPY text on
    PostgreSQL and TimescaleDB, the parameters of the INSERTs on SQLite. Made
    by `format_hits` before the write transaction, so that a writer thread
    spends its time in the database (`telemetry import` formats a batch while
    the previous one is stored)."""

    rows: int
    copy_text: memoryview | bytes = b""
    sqlite_values: list[Any] = field(default_factory=list)


def format_hits(engine: Engine, hits: HitChunk | pa.Table) -> FormattedHits:
    """`hits` (a chunk, or an Arrow table: see `arrow_copy_text`) formatted for
    `engine`'s backend."""
    if engine.dialect.name == "sqlite":
        chunk = hits if isinstance(hits, HitChunk) else HitChunk.from_arrow(hits)
        return FormattedHits(len(chunk), sqlite_values=_sqlite_values(chunk))
    if isinstance(hits, HitChunk):
        return FormattedHits(len(hits), copy_text=copy_text(hits))
    return FormattedHits(hits.num_rows, copy_text=arrow_copy_text(hits))


def insert_chunk(connection: Connection, chunk: HitChunk | FormattedHits) -> None:
    """Insert `chunk` inside the caller's transaction on `connection`, with the
    same fast path as `load_hits` (for writes that must commit together with
    other rows, such as an import's batch and its idempotency key)."""
    if isinstance(chunk, HitChunk):
        chunk = format_hits(connection.engine, chunk)
    if not chunk.rows:
        return
    driver = connection.connection.driver_connection
    if connection.dialect.name == "sqlite":
        assert isinstance(driver, sqlite3.Connection)
        _insert_sqlite_values(driver, chunk.sqlite_values, chunk.rows)
        return
    cursor = driver.cursor()  # type: ignore[union-attr]
    with cursor.copy(COPY_SQL) as copy:
        copy.write(chunk.copy_text)


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


def arrow_copy_text(table: pa.Table) -> memoryview:
    """`copy_text` of an Arrow table of hits, formatted by Arrow's kernels.

    The table has the `HIT_COLUMNS`: `ts` a timestamp (UTC) or int64 of
    microseconds, `is_bot` bool, the others string (binary for `ip_hash`),
    plain or dictionary-encoded. A dictionary column's distinct values are
    formatted once and spread to the rows with a `take`; each line is put
    together by one `binary_join_element_wise`, whose result is already the
    whole COPY text. No Python object is made per row.
    """
    rows = table.num_rows
    if not rows:
        return memoryview(b"")
    micros = table.column("ts").combine_chunks().cast(pa.int64()).to_numpy()
    parts = [_binary_rows(_iso_timestamps(micros.view("datetime64[us]"), suffix=b"+00"))]
    for name in HIT_COLUMNS[1:9]:
        parts.append(_copy_texts(table.column(name).combine_chunks()))
    # The line ends with is_bot: its text carries the newline.
    is_bot = table.column("is_bot").combine_chunks().cast(pa.int8())
    parts.append(pa.array([b"f\n", b"t\n"], pa.binary()).take(is_bot))
    lines = pc.binary_join_element_wise(*parts, b"\t")
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset :][: rows + 1]
    return memoryview(lines.buffers()[2])[offsets[0] : offsets[-1]]


def _copy_texts(column: pa.Array) -> pa.Array:
    """The COPY text of each value of a string or binary column (\\N for null)."""
    if isinstance(column, pa.DictionaryArray):
        texts = _copy_texts(column.dictionary).take(column.indices)
        return pc.fill_null(texts, pa.scalar(b"\\N", pa.binary()))
    if pa.types.is_binary(column.type) or pa.types.is_fixed_size_binary(column.type):
        values = column.to_pylist()
        if column.null_count:
            texts = [None if v is None else _copy_value(v) for v in values]
            return pa.array(texts, pa.binary()).fill_null(b"\\N")
        return pa.array(_copy_bytea(np.array(values, dtype=object)), pa.binary())
    if pc.any(pc.match_substring_regex(column, r"[\\\t\n\r]")).as_py():
        for special, escaped in (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r")):
            column = pc.replace_substring(column, special, escaped)
    return column.cast(pa.binary()).fill_null(b"\\N")


def _binary_rows(matrix: npt.NDArray[Any]) -> pa.Array:
    """A binary Arrow array of fixed-width byte strings (`S<n>`), without copying."""
    width = matrix.dtype.itemsize
    offsets = np.arange(0, width * (len(matrix) + 1), width, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.binary(), len(matrix), [None, pa.py_buffer(offsets), pa.py_buffer(matrix)]
    )


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
