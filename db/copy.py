"""Copying a whole database to another backend (`telemetry copy`), e.g. from
SQLite to TimescaleDB when a site outgrows one machine.

Hashing keys and idempotency keys are copied first (idempotently), then the
hits in batches in the order of their ids, each batch one transaction on the
target, ids kept. The target's highest id is the watermark: a copy that was
interrupted (or stopped after `max_batches`) resumes after it when run again.
At the end the hits per day of both sides are compared and the target's
aggregates are rebuilt from its hits.

The source may keep receiving hits meanwhile: the copy takes what is there
when each batch is read, and the comparison covers the ids copied. Aggregate
rows whose raw hits the source's retention already deleted are not carried
over (the target's aggregates are rebuilt from hits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from db import aggregates
from db.aggregates import BUCKET_SQL, Bucket
from db.engine import backend_of
from db.hits import writers_lock
from db.models import HashSalt, Hit, SeenEvent

BATCH_ROWS = 20_000
HIT_FIELDS = ("id", "ts", "site", "path", "referrer", "ip_hash", "user_agent", "browser", "os",
              "device", "is_bot")  # fmt: skip


class CopyError(Exception):
    """The copy cannot go on; nothing of the failing batch was written."""


@dataclass
class CopyResult:
    salts: int = 0
    seen_events: int = 0
    hits_copied: int = 0
    resumed_after: int = 0  # the id the copy went on from (0: from the start)
    finished: bool = False
    days_checked: int = 0
    day_mismatches: dict[str, tuple[int, int]] = field(default_factory=dict)  # day: (src, dst)
    refreshed: list[aggregates.Refreshed] = field(default_factory=list)


def _insert_ignoring_conflicts(engine: Engine, model: type[HashSalt | SeenEvent]) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING, which both dialects spell alike."""
    dialect_insert = sqlite_insert if engine.dialect.name == "sqlite" else pg_insert
    return dialect_insert(model).on_conflict_do_nothing()


def copy_salts(source: Engine, target: Engine) -> int:
    """Every hashing key; a period the target already holds another key for is an error
    (its hashes would no longer match the copied ones)."""
    with source.connect() as connection:
        salts = connection.execute(sa.select(HashSalt)).mappings().all()
    with writers_lock(target), target.begin() as connection:
        for salt in salts:
            connection.execute(_insert_ignoring_conflicts(target, HashSalt), dict(salt))
        held = dict(connection.execute(sa.select(HashSalt.period, HashSalt.salt)).all())
        for salt in salts:
            if held[salt["period"]] != salt["salt"]:
                raise CopyError(
                    f"the target holds another hashing key for period {salt['period']}: "
                    "copy into a database of its own"
                )
    return len(salts)


def copy_seen_events(source: Engine, target: Engine, batch_rows: int) -> int:
    copied, after = 0, ""
    while True:
        with source.connect() as connection:
            rows = (
                connection.execute(
                    sa.select(SeenEvent)
                    .where(SeenEvent.event_id > after)
                    .order_by(SeenEvent.event_id)
                    .limit(batch_rows)
                )
                .mappings()
                .all()
            )
        if not rows:
            return copied
        with writers_lock(target), target.begin() as connection:
            connection.execute(
                _insert_ignoring_conflicts(target, SeenEvent), [dict(r) for r in rows]
            )
        copied += len(rows)
        after = rows[-1]["event_id"]


def resume_point(source: Engine, target: Engine) -> int:
    """The id to copy on from: the target's highest, once it is sure the target
    holds exactly the source's hits up to there (an earlier copy's)."""
    with target.connect() as connection:
        last_id, count = connection.execute(
            sa.select(sa.func.max(Hit.id), sa.func.count()).select_from(Hit)
        ).one()
        if last_id is None:
            return 0
        last = connection.execute(
            sa.select(Hit.ts, Hit.ip_hash, Hit.path).where(Hit.id == last_id)
        ).one()
    with source.connect() as connection:
        source_count = connection.execute(
            sa.select(sa.func.count()).select_from(Hit).where(Hit.id <= last_id)
        ).scalar_one()
        same = connection.execute(
            sa.select(Hit.ts, Hit.ip_hash, Hit.path).where(Hit.id == last_id)
        ).first()
    if source_count != count or same is None or tuple(same) != tuple(last):
        raise CopyError(
            f"the target already holds {count} hits that are not a copy of the source's; "
            "copy into an empty database"
        )
    return int(last_id)


def copy_hits(
    source: Engine,
    target: Engine,
    after: int,
    batch_rows: int,
    max_batches: int | None,
    on_batch: Callable[[int], None] | None,
) -> tuple[int, int, bool]:
    """Copy the hits with ids above `after`; (rows copied, last id, finished)."""
    copied, batches = 0, 0
    columns = [Hit.__table__.c[name] for name in HIT_FIELDS]
    while max_batches is None or batches < max_batches:
        with source.connect() as connection:
            rows = (
                connection.execute(
                    sa.select(*columns).where(Hit.id > after).order_by(Hit.id).limit(batch_rows)
                )
                .mappings()
                .all()
            )
        if not rows:
            return copied, after, True
        with writers_lock(target), target.begin() as connection:
            connection.execute(sa.insert(Hit), [dict(r) for r in rows])
        copied += len(rows)
        batches += 1
        after = rows[-1]["id"]
        if on_batch is not None:
            on_batch(len(rows))
    return copied, after, False


def _restart_id_sequence(target: Engine) -> None:
    """PostgreSQL: new hits on the target must get ids after the copied ones."""
    if target.dialect.name == "sqlite":
        return  # SQLite takes the next rowid after the largest
    with target.begin() as connection:
        connection.execute(
            text(
                "SELECT setval(pg_get_serial_sequence('hits', 'id'), "
                "(SELECT coalesce(max(id), 0) + 1 FROM hits), false)"
            )
        )


def hits_per_day(bind: Engine | Connection, up_to_id: int) -> dict[str, int]:
    """Hits per UTC day (YYYY-MM-DD) among ids up to `up_to_id`."""
    backend = backend_of(bind)
    day = BUCKET_SQL[backend][Bucket.DAY]
    query = text(f"SELECT {day} AS day, count(*) FROM hits WHERE id <= :id GROUP BY {day}")
    if isinstance(bind, Engine):
        with bind.connect() as connection:
            rows = connection.execute(query, {"id": up_to_id}).all()
    else:
        rows = bind.execute(query, {"id": up_to_id}).all()
    return {str(day)[:10]: count for day, count in rows}


def copy_database(
    source: Engine,
    target: Engine,
    *,
    batch_rows: int = BATCH_ROWS,
    max_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    now: datetime | None = None,
    raw_hits_from: datetime | None = None,
) -> CopyResult:
    """Copy `source` into `target` (both migrated to the newest revision)."""
    result = CopyResult()
    result.salts = copy_salts(source, target)
    result.seen_events = copy_seen_events(source, target, batch_rows)
    result.resumed_after = resume_point(source, target)
    copied, last_id, result.finished = copy_hits(
        source, target, result.resumed_after, batch_rows, max_batches, on_batch
    )
    result.hits_copied = copied
    _restart_id_sequence(target)
    if not result.finished:
        return result
    expected, found = hits_per_day(source, last_id), hits_per_day(target, last_id)
    result.days_checked = len(expected)
    result.day_mismatches = {
        day: (expected.get(day, 0), found.get(day, 0))
        for day in sorted(expected.keys() | found.keys())
        if expected.get(day, 0) != found.get(day, 0)
    }
    result.refreshed = rebuild_aggregates(target, now=now, raw_hits_from=raw_hits_from)
    return result


def rebuild_aggregates(
    target: Engine, *, now: datetime | None = None, raw_hits_from: datetime | None = None
) -> list[aggregates.Refreshed]:
    """Materialise the target's aggregates over all its hits."""
    now = now or datetime.now(UTC)
    with target.connect() as connection:
        first, last = connection.execute(sa.select(sa.func.min(Hit.ts), sa.func.max(Hit.ts))).one()
    # Advance the watermarks to now first (a fresh target's are at the epoch),
    # then recompute the whole range before them.
    done = aggregates.refresh(target, now=now, raw_hits_from=raw_hits_from)
    if first is not None:
        done += aggregates.refresh(
            target, first, last + timedelta(microseconds=1), now=now, raw_hits_from=raw_hits_from
        )
    return done
