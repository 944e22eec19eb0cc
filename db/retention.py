"""Retention: deleting raw hits and aggregate rows past their keep-by date.

Cut-offs fall on UTC midnight, so every hourly and daily bucket is either whole
or gone. Raw hits go by `drop_chunks` on TimescaleDB (whole chunks, then a
DELETE for the rest of the one chunk the cut-off falls in) and by DELETE
elsewhere; idempotency keys go with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, text

from db.aggregates import (
    AGGREGATES,
    Bucket,
    ContinuousAggregates,
    Mechanism,
    mechanism_of,
    raw_hits_needed_from,
)
from db.engine import Backend, backend_of
from db.hits import writers_lock
from db.models import Hit, SeenEvent, UTCDateTime


@dataclass(frozen=True)
class RetentionPolicy:
    """Days to keep raw hits and aggregates; 0 keeps them forever."""

    raw_days: int = 0
    aggregate_days: int = 0

    def raw_cutoff(self, now: datetime) -> datetime | None:
        """Raw hits before this are deleted (and never re-aggregated)."""
        return _cutoff(now, self.raw_days)

    def aggregate_cutoff(self, now: datetime) -> datetime | None:
        return _cutoff(now, self.aggregate_days)


def _cutoff(now: datetime, days: int) -> datetime | None:
    return Bucket.DAY.floor(now - timedelta(days=days)) if days else None


@dataclass
class RetentionResult:
    raw_cutoff: datetime | None = None
    aggregate_cutoff: datetime | None = None
    chunks_dropped: int = 0
    hits_deleted: int = 0
    seen_events_deleted: int = 0
    aggregate_rows_deleted: dict[str, int] = field(default_factory=dict)


def apply_retention(
    engine: Engine, policy: RetentionPolicy, now: datetime | None = None
) -> RetentionResult:
    now = now or datetime.now(UTC)
    raw_cutoff = policy.raw_cutoff(now)
    if raw_cutoff is not None:
        raw_cutoff = min(raw_cutoff, _still_needed_from(engine, now))
    result = RetentionResult(raw_cutoff, policy.aggregate_cutoff(now))
    backend = backend_of(engine)
    if result.raw_cutoff is not None:
        if backend is Backend.TIMESCALEDB:
            with engine.begin() as connection:
                result.chunks_dropped = _drop_chunks(connection, "hits", result.raw_cutoff)
        with writers_lock(engine), engine.begin() as connection:
            result.hits_deleted = _delete_before(connection, Hit, result.raw_cutoff)
            result.seen_events_deleted = _delete_before(connection, SeenEvent, result.raw_cutoff)
    if result.aggregate_cutoff is not None:
        result.aggregate_rows_deleted = _expire_aggregates(engine, result.aggregate_cutoff)
    return result


def _still_needed_from(engine: Engine, now: datetime) -> datetime:
    """The oldest raw hit an aggregate refresh may still read. Rollups: where
    the next scheduled refresh of each starts (a monthly one reads its whole
    current month, and the month before while late events may land in it; a
    rollup never refreshed has materialised nothing yet). Continuous
    aggregates: the start of the oldest bucket a refresh policy's window
    touches, since a refresh recomputes whole buckets from what raw hits are left."""
    if mechanism_of(engine) is Mechanism.CONTINUOUS_AGGREGATES:
        policy_starts = (
            a.bucket.floor(now - ContinuousAggregates.policy_lookback(a)) for a in AGGREGATES
        )
        return min(policy_starts)
    return raw_hits_needed_from(engine)


def _delete_before(connection: Connection, model: type[Hit | SeenEvent], cutoff: datetime) -> int:
    return connection.execute(sa.delete(model).where(model.ts < cutoff)).rowcount


def _drop_chunks(connection: Connection, relation_name: str, cutoff: datetime) -> int:
    """TimescaleDB: drop the chunks of `relation_name` wholly before `cutoff`."""
    dropped = connection.execute(
        text("SELECT drop_chunks(CAST(:relation AS regclass), older_than => :cutoff)"),
        {"relation": relation_name, "cutoff": cutoff},
    )
    return len(dropped.all())


# The aggregates' rows, per mechanism, side by side.
def _expire_aggregates(engine: Engine, cutoff: datetime) -> dict[str, int]:
    if mechanism_of(engine) is Mechanism.CONTINUOUS_AGGREGATES:
        return _expire_continuous_aggregates(engine, cutoff)
    return _expire_rollup_rows(engine, cutoff)


def _expire_continuous_aggregates(engine: Engine, cutoff: datetime) -> dict[str, int]:
    """drop_chunks works on continuous aggregates too; it counts chunks, not rows."""
    with engine.begin() as connection:
        return {a.name: _drop_chunks(connection, a.name, cutoff) for a in AGGREGATES}


def _expire_rollup_rows(engine: Engine, cutoff: datetime) -> dict[str, int]:
    deleted = {}
    with writers_lock(engine), engine.begin() as connection:
        for aggregate in AGGREGATES:
            rollup = aggregate.rollup_table
            # Whole buckets only: a month partly after the cut-off stays.
            deleted[aggregate.name] = connection.execute(
                text(f"DELETE FROM {rollup} WHERE bucket < :cutoff").bindparams(
                    sa.bindparam("cutoff", type_=UTCDateTime())
                ),
                {"cutoff": aggregate.bucket.floor(cutoff)},
            ).rowcount
    return deleted
