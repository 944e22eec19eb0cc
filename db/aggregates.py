"""Aggregates: the relations every dashboard, alert and report reads, by the same
names and with the same figures on every backend.

Each aggregate is one entry of `AGGREGATES`: its name (the public relation),
its bucket width (UTC), the columns of `hits` it groups by and its measures.
From that one entry each mechanism builds the relation:

- `ContinuousAggregates` (TimescaleDB with the full "timescale" license): a
  continuous aggregate of that name, real-time (`materialized_only = false`, so
  the current bucket shows), created WITH NO DATA (a refresh cannot run in the
  migration's transaction), refreshed by a policy and by `telemetry rollup
  refresh`.
- `RollupTables` (SQLite, PostgreSQL and Apache-only TimescaleDB): a table
  `<name>_rollup` the service materialises, its watermark in
  `rollup_watermarks`, and a VIEW of that name: the rollup rows before the
  watermark UNION ALL the raw hits from the watermark on, aggregated live. That
  is what TimescaleDB's real-time aggregation does, so both mechanisms answer
  alike, including that a late event in an already materialised bucket shows
  after the next refresh.

Adding an aggregate: one entry in `AGGREGATES`, then a migration that calls
`create_aggregates(connection, ["<name>"])` on upgrade and `drop_aggregates`
on downgrade. Entries are append-only once released: changing a definition is a
migration that drops and recreates it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, text

from db.engine import Backend, backend_of
from db.hits import writers_lock
from db.models import Hit, RollupWatermark, UTCDateTime
from db.timescaledb import has_full_license

# Events are accepted up to 48 hours after they happened (api/events.py), so a
# refresh re-materialises that far behind the previous watermark.
LATE_EVENTS = timedelta(hours=48)

# A fresh rollup's watermark: nothing materialised, everything aggregated live.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Bucket(enum.Enum):
    HOUR = timedelta(hours=1)
    DAY = timedelta(days=1)

    @property
    def width(self) -> timedelta:
        return self.value

    def floor(self, ts: datetime) -> datetime:
        """The start of the UTC bucket holding `ts`."""
        ts = ts.astimezone(UTC)
        ts = ts.replace(minute=0, second=0, microsecond=0)
        return ts.replace(hour=0) if self is Bucket.DAY else ts

    def ceil(self, ts: datetime) -> datetime:
        floor = self.floor(ts)
        return floor if floor == ts else floor + self.width


# The bucket of a hit's `ts`, per backend, side by side.
BUCKET_SQL: dict[Backend, dict[Bucket, str]] = {
    # SQLite keeps timestamps as fixed-width UTC text ("2026-12-03 14:05:09.123456"):
    # cutting the text is the bucket, in the very format SQLAlchemy reads back.
    Backend.SQLITE: {
        Bucket.HOUR: "substr(ts, 1, 13) || ':00:00.000000'",
        Bucket.DAY: "substr(ts, 1, 10) || ' 00:00:00.000000'",
    },
    Backend.POSTGRESQL: {
        Bucket.HOUR: "date_trunc('hour', ts, 'UTC')",
        Bucket.DAY: "date_trunc('day', ts, 'UTC')",
    },
    # Continuous aggregates require time_bucket; on timestamptz it buckets in UTC.
    Backend.TIMESCALEDB: {
        Bucket.HOUR: "time_bucket(INTERVAL '1 hour', ts)",
        Bucket.DAY: "time_bucket(INTERVAL '1 day', ts)",
    },
}


@dataclass(frozen=True)
class Measure:
    """An aggregate over the hits of one group. The SQL is the same on every
    backend (FILTER is PostgreSQL and SQLite >= 3.30); `is_bot` is a boolean on
    PostgreSQL and 0/1 on SQLite, and NOT works on both."""

    name: str
    sql: str


HITS = Measure("hits", "count(*) FILTER (WHERE NOT is_bot)")
VISITORS = Measure("visitors", "count(DISTINCT ip_hash) FILTER (WHERE NOT is_bot)")
BOT_HITS = Measure("bot_hits", "count(*) FILTER (WHERE is_bot)")


@dataclass(frozen=True)
class Aggregate:
    name: str
    bucket: Bucket
    group_by: tuple[str, ...]  # columns of `hits`
    measures: tuple[Measure, ...]
    help: str

    @property
    def rollup_table(self) -> str:
        return f"{self.name}_rollup"

    @property
    def columns(self) -> list[str]:
        return ["bucket", *self.group_by, *(m.name for m in self.measures)]

    def select_sql(self, backend: Backend, where: str = "") -> str:
        """The aggregation of raw hits, with `bucket` first, then the groups and measures."""
        bucket = BUCKET_SQL[backend][self.bucket]
        groups = ", ".join(self.group_by)
        measures = ", ".join(f"{m.sql} AS {m.name}" for m in self.measures)
        where_clause = f" WHERE {where}" if where else ""
        return (
            f"SELECT {bucket} AS bucket, {groups}, {measures} FROM hits{where_clause} "
            f"GROUP BY {bucket}, {groups}"
        )


# The registry. Counting conventions: `hits` and `visitors` leave bots out;
# `bot_hits` counts them. Visitors are distinct `ip_hash` values, exact within
# one hashing period (README, "Privacy").
AGGREGATES: tuple[Aggregate, ...] = (
    Aggregate(
        "hits_hourly",
        Bucket.HOUR,
        ("site", "path"),
        (HITS, VISITORS, BOT_HITS),
        "Hourly traffic per site and path. Visitors of different hours do not add up: "
        "daily and monthly uniques come from visitors_daily.",
    ),
    Aggregate(
        "visitors_daily",
        Bucket.DAY,
        ("site", "ip_hash"),
        (HITS, BOT_HITS),
        "One row per visitor per site and day with its hit counts. Unique visitors of any "
        "range are the distinct ip_hash values of its rows with hits > 0 (a row with only "
        "bot hits is not a visitor); top visitors sum `hits` per ip_hash.",
    ),
)
BY_NAME = {a.name: a for a in AGGREGATES}
ROLLUP_TABLES = frozenset(a.rollup_table for a in AGGREGATES)


class Mechanism(enum.StrEnum):
    CONTINUOUS_AGGREGATES = "continuous aggregates"
    ROLLUP_TABLES = "service-maintained rollups"


# -- the relations as SQLAlchemy tables, to query -------------------------------------------

_QUERY_METADATA = sa.MetaData()


def _query_table(aggregate: Aggregate) -> sa.Table:
    hits_columns = Hit.__table__.c
    return sa.Table(
        aggregate.name,
        _QUERY_METADATA,
        sa.Column("bucket", UTCDateTime(), nullable=False),
        *(sa.Column(c, hits_columns[c].type) for c in aggregate.group_by),
        *(sa.Column(m.name, sa.BigInteger(), nullable=False) for m in aggregate.measures),
    )


_RELATIONS = {a.name: _query_table(a) for a in AGGREGATES}


def relation(name: str) -> sa.Table:
    """The aggregate `name` as a table to select from (the same on every backend;
    `bucket` comes back as an aware UTC datetime)."""
    return _RELATIONS[name]


# -- rollup tables: SQLite, PostgreSQL, Apache-only TimescaleDB ------------------------------

# Kept apart from db.models' metadata: these tables exist only where this
# mechanism is in use, so db/migrations/env.py keeps them out of `alembic check`.
_ROLLUP_METADATA = sa.MetaData()


def _rollup_table(aggregate: Aggregate) -> sa.Table:
    hits_columns = Hit.__table__.c
    table = sa.Table(
        aggregate.rollup_table,
        _ROLLUP_METADATA,
        sa.Column("bucket", UTCDateTime(), nullable=False),
        *(
            sa.Column(c, hits_columns[c].type, nullable=hits_columns[c].nullable)
            for c in aggregate.group_by
        ),
        *(sa.Column(m.name, sa.BigInteger(), nullable=False) for m in aggregate.measures),
    )
    # Refreshes and retention delete bucket ranges; dashboards read one site's range.
    sa.Index(f"ix_{aggregate.rollup_table}_bucket", table.c.bucket)
    if "site" in aggregate.group_by:
        sa.Index(f"ix_{aggregate.rollup_table}_site_bucket", table.c.site, table.c.bucket)
    return table


_ROLLUPS = {a.name: _rollup_table(a) for a in AGGREGATES}


class RollupTables:
    """The service materialises each aggregate into `<name>_rollup` itself."""

    mechanism = Mechanism.ROLLUP_TABLES

    @staticmethod
    def create(connection: Connection, aggregate: Aggregate, backend: Backend) -> None:
        _ROLLUPS[aggregate.name].create(connection)
        connection.execute(
            sa.insert(RollupWatermark).values(name=aggregate.name, materialized_until=EPOCH)
        )
        watermark = (
            f"(SELECT materialized_until FROM rollup_watermarks WHERE name = '{aggregate.name}')"
        )
        columns = ", ".join(aggregate.columns)
        connection.execute(
            text(
                f"CREATE VIEW {aggregate.name} AS "
                f"SELECT {columns} FROM {aggregate.rollup_table} WHERE bucket < {watermark} "
                f"UNION ALL "
                f"{aggregate.select_sql(backend, where=f'ts >= {watermark}')}"
            )
        )

    @staticmethod
    def drop(connection: Connection, aggregate: Aggregate) -> None:
        connection.execute(text(f"DROP VIEW IF EXISTS {aggregate.name}"))
        _ROLLUPS[aggregate.name].drop(connection, checkfirst=True)
        connection.execute(sa.delete(RollupWatermark).where(RollupWatermark.name == aggregate.name))

    @staticmethod
    def rematerialise(
        connection: Connection,
        aggregate: Aggregate,
        backend: Backend,
        start: datetime,
        end: datetime,
    ) -> None:
        """Recompute the buckets in [start, end) from raw hits (in the caller's transaction)."""
        span = {"start": start, "end": end}
        binds = (
            sa.bindparam("start", type_=UTCDateTime()),
            sa.bindparam("end", type_=UTCDateTime()),
        )
        table = aggregate.rollup_table
        connection.execute(
            text(f"DELETE FROM {table} WHERE bucket >= :start AND bucket < :end").bindparams(
                *binds
            ),
            span,
        )
        select = aggregate.select_sql(backend, where="ts >= :start AND ts < :end")
        connection.execute(
            text(f"INSERT INTO {table} ({', '.join(aggregate.columns)}) {select}").bindparams(
                *binds
            ),
            span,
        )


class ContinuousAggregates:
    """TimescaleDB (full license) materialises and refreshes each aggregate."""

    mechanism = Mechanism.CONTINUOUS_AGGREGATES

    # The refresh policy's window: far enough back to take in late events, up to
    # the last complete bucket; real-time aggregation covers the rest.
    POLICY: ClassVar[dict[Bucket, tuple[str, str, str]]] = {
        Bucket.HOUR: ("3 days", "1 hour", "15 minutes"),
        Bucket.DAY: ("4 days", "1 day", "1 hour"),
    }

    @staticmethod
    def create(connection: Connection, aggregate: Aggregate, backend: Backend) -> None:
        connection.execute(
            text(
                f"CREATE MATERIALIZED VIEW {aggregate.name} WITH "
                f"(timescaledb.continuous, timescaledb.materialized_only = false) AS "
                f"{aggregate.select_sql(backend)} WITH NO DATA"
            )
        )
        start_offset, end_offset, every = ContinuousAggregates.POLICY[aggregate.bucket]
        connection.execute(
            text(
                f"SELECT add_continuous_aggregate_policy('{aggregate.name}', "
                f"start_offset => INTERVAL '{start_offset}', "
                f"end_offset => INTERVAL '{end_offset}', "
                f"schedule_interval => INTERVAL '{every}')"
            )
        )

    @staticmethod
    def drop(connection: Connection, aggregate: Aggregate) -> None:
        connection.execute(text(f"DROP MATERIALIZED VIEW IF EXISTS {aggregate.name}"))

    @staticmethod
    def refresh(
        engine: Engine, aggregate: Aggregate, start: datetime | None, end: datetime
    ) -> None:
        """refresh_continuous_aggregate cannot run inside a transaction: autocommit.
        It recomputes only the invalidated parts of the window, so a window open
        to the past (start None) is cheap after the first time."""
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(
                text(
                    "CALL refresh_continuous_aggregate(CAST(:name AS regclass), "
                    "CAST(:start AS timestamptz), CAST(:end AS timestamptz))"
                ),
                {"name": aggregate.name, "start": start, "end": end},
            )


Builder = type[RollupTables] | type[ContinuousAggregates]


def _builder_for_new(connection: Connection) -> Builder:
    """The mechanism a migration creates aggregates with on this database."""
    if backend_of(connection) is Backend.TIMESCALEDB and has_full_license(connection):
        return ContinuousAggregates
    return RollupTables


def mechanism_of(bind: Engine | Connection) -> Mechanism:
    """The mechanism in use here: continuous aggregates when the aggregates are
    TimescaleDB continuous aggregates, service-maintained rollups otherwise."""
    if isinstance(bind, Engine):
        with bind.connect() as connection:
            return mechanism_of(connection)
    if backend_of(bind) is not Backend.TIMESCALEDB:
        return Mechanism.ROLLUP_TABLES
    found = bind.execute(
        text(
            "SELECT 1 FROM timescaledb_information.continuous_aggregates "
            "WHERE view_schema = current_schema() AND view_name = :name"
        ),
        {"name": AGGREGATES[0].name},
    ).first()
    return Mechanism.CONTINUOUS_AGGREGATES if found else Mechanism.ROLLUP_TABLES


def _builder_in_use(connection: Connection) -> Builder:
    if mechanism_of(connection) is Mechanism.CONTINUOUS_AGGREGATES:
        return ContinuousAggregates
    return RollupTables


def create_aggregates(connection: Connection, names: Iterable[str]) -> None:
    """Create the named aggregates (from a migration, inside its transaction)."""
    builder = _builder_for_new(connection)
    backend = backend_of(connection)
    for name in names:
        builder.create(connection, BY_NAME[name], backend)


def drop_aggregates(connection: Connection, names: Iterable[str]) -> None:
    builder = _builder_in_use(connection)
    for name in reversed(list(names)):
        builder.drop(connection, BY_NAME[name])


# -- refreshing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Refreshed:
    """What one refresh of one aggregate did."""

    name: str
    start: datetime | None  # the buckets recomputed: [start, end); None = open to the past
    end: datetime
    watermark: datetime | None  # materialised before this (rollups only)


def refresh(
    engine: Engine,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    now: datetime | None = None,
    raw_hits_from: datetime | None = None,
    names: Sequence[str] | None = None,
) -> list[Refreshed]:
    """Bring the aggregates up to date.

    Without `start`/`end` (the scheduler's call): rematerialise from the old
    watermark minus the late-event window up to the last complete bucket, and
    advance the watermark there. With them (imports, erasure): recompute the
    buckets overlapping [start, end), never past the watermark. `raw_hits_from`
    is where retention has left raw hits: an explicit range never recomputes
    buckets before it, since that would replace kept rollups with nothing.
    (Retention, for its part, never deletes hits a refresh may still need:
    db/retention.py.)
    """
    now = now or datetime.now(UTC)
    aggregates = [BY_NAME[n] for n in names] if names else list(AGGREGATES)
    if mechanism_of(engine) is Mechanism.CONTINUOUS_AGGREGATES:
        return _refresh_continuous(engine, aggregates, start, end, now, raw_hits_from)
    return [_refresh_rollup(engine, a, start, end, now, raw_hits_from) for a in aggregates]


def _refresh_rollup(
    engine: Engine,
    aggregate: Aggregate,
    start: datetime | None,
    end: datetime | None,
    now: datetime,
    raw_hits_from: datetime | None,
) -> Refreshed:
    backend = backend_of(engine)
    with writers_lock(engine), engine.begin() as connection:
        watermark = connection.execute(
            sa.select(RollupWatermark.materialized_until)
            .where(RollupWatermark.name == aggregate.name)
            .with_for_update()
        ).scalar_one()
        if start is None and end is None:
            new_watermark = max(watermark, aggregate.bucket.floor(now))
            window_start = aggregate.bucket.floor(max(watermark, EPOCH + LATE_EVENTS) - LATE_EVENTS)
            window_end = new_watermark
        else:
            new_watermark = watermark
            window_start = aggregate.bucket.floor(start or EPOCH)
            window_end = min(aggregate.bucket.ceil(end or watermark), watermark)
            if raw_hits_from is not None:
                # An explicit range may reach back past retention: keep those rollups.
                window_start = max(window_start, aggregate.bucket.ceil(raw_hits_from))
        if window_start < window_end:
            RollupTables.rematerialise(connection, aggregate, backend, window_start, window_end)
        if new_watermark != watermark:
            connection.execute(
                sa.update(RollupWatermark)
                .where(RollupWatermark.name == aggregate.name)
                .values(materialized_until=new_watermark)
            )
    return Refreshed(aggregate.name, window_start, max(window_start, window_end), new_watermark)


def _refresh_continuous(
    engine: Engine,
    aggregates: list[Aggregate],
    start: datetime | None,
    end: datetime | None,
    now: datetime,
    raw_hits_from: datetime | None,
) -> list[Refreshed]:
    done = []
    for aggregate in aggregates:
        window_start = aggregate.bucket.floor(start) if start else None
        if raw_hits_from is not None:
            floor = aggregate.bucket.ceil(raw_hits_from)
            window_start = max(window_start, floor) if window_start else floor
        window_end = aggregate.bucket.ceil(end) if end else aggregate.bucket.floor(now)
        ContinuousAggregates.refresh(engine, aggregate, window_start, window_end)
        done.append(Refreshed(aggregate.name, window_start, window_end, None))
    return done


def watermarks(engine: Engine) -> dict[str, datetime | None]:
    """How far each aggregate is materialised (None: not known to the service)."""
    with engine.connect() as connection:
        if mechanism_of(connection) is Mechanism.CONTINUOUS_AGGREGATES:
            return _continuous_watermarks(connection)
        rows = connection.execute(
            sa.select(RollupWatermark.name, RollupWatermark.materialized_until)
        )
        return {name: until for name, until in rows}


def rollup_lag_seconds(engine: Engine, now: datetime | None = None) -> dict[str, float]:
    """How far behind `now` each aggregate's materialised part ends, in seconds."""
    now = now or datetime.now(UTC)
    return {
        name: (now - until).total_seconds()
        for name, until in watermarks(engine).items()
        if until is not None
    }


def _continuous_watermarks(connection: Connection) -> dict[str, datetime | None]:
    found: dict[str, datetime | None] = {}
    for aggregate in AGGREGATES:
        try:
            with connection.begin_nested():
                found[aggregate.name] = connection.execute(
                    text(
                        "SELECT _timescaledb_functions.to_timestamp("
                        "_timescaledb_functions.cagg_watermark(h.id)) "
                        "FROM timescaledb_information.continuous_aggregates c "
                        "JOIN _timescaledb_catalog.hypertable h "
                        "ON h.table_name = c.materialization_hypertable_name "
                        "WHERE c.view_name = :name"
                    ),
                    {"name": aggregate.name},
                ).scalar()
        except sa.exc.DBAPIError:
            found[aggregate.name] = None  # internal functions moved between releases
    return found
