"""Exporting raw hits (`telemetry export`) as CSV or Parquet, streamed.

Rows come from a server-side cursor (PostgreSQL) or SQLite's lazy cursor, a
batch at a time, and each batch is written before the next is read: memory
stays the same whatever the range. Hashes are written as hex; there are no
addresses to write. The file appears under its name only once complete.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy import Engine

from db.models import Hit

FORMATS = ("csv", "parquet")
COLUMNS = ("ts", "site", "path", "referrer", "ip_hash", "user_agent", "browser", "os", "device",
           "is_bot")  # fmt: skip
PARQUET_SCHEMA = pa.schema(
    [
        ("ts", pa.timestamp("us", tz="UTC")),
        ("site", pa.string()),
        ("path", pa.string()),
        ("referrer", pa.string()),
        ("ip_hash", pa.string()),  # hex
        ("user_agent", pa.string()),
        ("browser", pa.string()),
        ("os", pa.string()),
        ("device", pa.string()),
        ("is_bot", pa.bool_()),
    ]
)
# Rows fetched and written at a time (and one Parquet row group each).
BATCH_ROWS = 10_000


def _batches(
    engine: Engine, start: datetime, end: datetime, site: str | None, batch_rows: int
) -> Iterator[Sequence[sa.Row[Any]]]:
    query = sa.select(*(Hit.__table__.c[name] for name in COLUMNS)).where(
        Hit.ts >= start, Hit.ts < end
    )
    if site is not None:
        query = query.where(Hit.site == site)
    query = query.order_by(Hit.ts, Hit.id)
    with engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=batch_rows).execute(
            query
        )
        yield from result.partitions()


def export_hits(
    engine: Engine,
    out: Path,
    start: datetime,
    end: datetime,
    *,
    site: str | None = None,
    file_format: str = "csv",
    batch_rows: int = BATCH_ROWS,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Write the hits of [start, end) (of `site`, if given) to `out`; return how many."""
    if file_format not in FORMATS:
        raise ValueError(f"unknown export format {file_format!r}")
    partial = out.with_name(f".{out.name}.partial")
    batches = _batches(engine, start, end, site, batch_rows)
    try:
        written = (_write_csv if file_format == "csv" else _write_parquet)(
            partial, batches, on_batch
        )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return written


def _write_csv(
    path: Path,
    batches: Iterator[Sequence[sa.Row[Any]]],
    on_batch: Callable[[int], None] | None,
) -> int:
    written = 0
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(COLUMNS)
        for rows in batches:
            writer.writerows(
                (
                    row.ts.isoformat(),
                    row.site,
                    row.path,
                    row.referrer,
                    row.ip_hash.hex(),
                    row.user_agent,
                    row.browser,
                    row.os,
                    row.device,
                    "true" if row.is_bot else "false",
                )
                for row in rows
            )
            written += len(rows)
            if on_batch is not None:
                on_batch(len(rows))
    return written


def _write_parquet(
    path: Path,
    batches: Iterator[Sequence[sa.Row[Any]]],
    on_batch: Callable[[int], None] | None,
) -> int:
    written = 0
    with pq.ParquetWriter(path, PARQUET_SCHEMA) as writer:
        for rows in batches:
            columns = [list(column) for column in zip(*rows, strict=True)]
            columns[COLUMNS.index("ip_hash")] = [h.hex() for h in columns[COLUMNS.index("ip_hash")]]
            writer.write_table(pa.table(columns, schema=PARQUET_SCHEMA))
            written += len(rows)
            if on_batch is not None:
                on_batch(len(rows))
    return written
