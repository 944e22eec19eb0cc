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
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"

    def floor(self, ts: datetime) -> datetime:
        """The start of the UTC bucket holding `ts`."""
        ts = ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        if self is Bucket.HOUR:
            return ts
        ts = ts.replace(hour=0)
        return ts if self is Bucket.DAY else ts.replace(day=1)

    def next(self, bucket: datetime) -> datetime:
        """The start of the bucket after the one starting at `bucket`."""
        if self is Bucket.HOUR:
            return bucket + timedelta(hours=1)
        if self is Bucket.DAY:
            return bucket + timedelta(days=1)
        return (bucket + timedelta(days=32)).replace(day=1)

    def ceil(self, ts: datetime) -> datetime:
        floor = self.floor(ts)
        return floor if floor == ts else self.next(floor)

    @property
    def refresh_every(self) -> timedelta:
        """How often the scheduler rematerialises this width. A monthly rollup's
        window is the whole previous month while late events can still land in
        it; the live part of its view shows the current month meanwhile."""
        return timedelta(hours=1) if self is Bucket.MONTH else timedelta(0)


# The bucket of a hit's `ts`, per backend, side by side.
BUCKET_SQL: dict[Backend, dict[Bucket, str]] = {
    # SQLite keeps timestamps as fixed-width UTC text ("2026-12-03 14:05:09.123456"):
    # cutting the text is the bucket, in the very format SQLAlchemy reads back.
    Backend.SQLITE: {
        Bucket.HOUR: "substr(ts, 1, 13) || ':00:00.000000'",
        Bucket.DAY: "substr(ts, 1, 10) || ' 00:00:00.000000'",
        Bucket.MONTH: "substr(ts, 1, 7) || '-01 00:00:00.000000'",
    },
    Backend.POSTGRESQL: {
        Bucket.HOUR: "date_trunc('hour', ts, 'UTC')",
        Bucket.DAY: "date_trunc('day', ts, 'UTC')",
        Bucket.MONTH: "date_trunc('month', ts, 'UTC')",
    },
    # Continuous aggregates require time_bucket; on timestamptz it buckets in UTC.
    Backend.TIMESCALEDB: {
        Bucket.HOUR: "time_bucket(INTERVAL '1 hour', ts)",
        Bucket.DAY: "time_bucket(INTERVAL '1 day', ts)",
        Bucket.MONTH: "time_bucket(INTERVAL '1 month', ts)",
    },
}


# The start of the bucket after the bucket starting at `{b}`, per backend.
_PG_NEXT = "({b} AT TIME ZONE 'UTC' + INTERVAL '1 %s') AT TIME ZONE 'UTC'"
NEXT_BUCKET_SQL: dict[Backend, dict[Bucket, str]] = {
    Backend.SQLITE: {
        bucket: "strftime('%Y-%m-%d %H:%M:%S', {b}, '+1 " + bucket.value + "') || '.000000'"
        for bucket in Bucket
    },
    Backend.POSTGRESQL: {bucket: _PG_NEXT % bucket.value for bucket in Bucket},
    Backend.TIMESCALEDB: {bucket: _PG_NEXT % bucket.value for bucket in Bucket},
}


# How a rollup view's live part joins raw hits to its series of buckets, per
# backend. SQLite's planner, once ANALYZE has run, would rather scan all hits
# (or build an automatic index over them) than probe the ts index bucket by
# bucket: CROSS JOIN fixes the loop order, INDEXED BY the index.
LIVE_JOIN: dict[Backend, str] = {
    Backend.SQLITE: "CROSS JOIN hits INDEXED BY ix_hits_ts",
    Backend.POSTGRESQL: "JOIN hits",
    Backend.TIMESCALEDB: "JOIN hits",
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
    # Extra indexes on the rollup table, beyond (bucket) and (site, bucket).
    indexes: tuple[tuple[str, ...], ...] = ()

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
    # Coarser aggregates (migration 0003), so that a dashboard reads a few
    # thousand rows, not a million, at any traffic: per site, not per path.
    Aggregate(
        "site_hourly",
        Bucket.HOUR,
        ("site",),
        (HITS, VISITORS, BOT_HITS),
        "Hourly traffic per site: time series, hour x weekday, the anomaly baseline.",
    ),
    Aggregate(
        "site_daily",
        Bucket.DAY,
        ("site",),
        (HITS, VISITORS, BOT_HITS),
        "Daily traffic per site with exact daily unique visitors.",
    ),
    Aggregate(
        "site_monthly",
        Bucket.MONTH,
        ("site",),
        (HITS, VISITORS, BOT_HITS),
        "Monthly traffic per site with exact monthly unique visitors.",
    ),
    Aggregate(
        "paths_daily",
        Bucket.DAY,
        ("site", "path"),
        (HITS, VISITORS, BOT_HITS),
        "Daily traffic per site and path: top paths of any range of days.",
        # Covers the top-paths query: an index-only scan, no table rows read.
        indexes=(("site", "bucket", "path", "hits"),),
    ),
    Aggregate(
        "referrers_daily",
        Bucket.DAY,
        ("site", "referrer"),
        (HITS, VISITORS, BOT_HITS),
        "Daily traffic per site and referrer (the full address; NULL: none).",
    ),
    Aggregate(
        "agents_daily",
        Bucket.DAY,
        ("site", "browser", "os", "device"),
        (HITS, VISITORS, BOT_HITS),
        "Daily traffic per site and browser, operating system and device class.",
    ),
    Aggregate(
        "visitors_monthly",
        Bucket.MONTH,
        ("site", "ip_hash"),
        (HITS, BOT_HITS),
        "One row per visitor per site and month: monthly uniques and the top visitors "
        "of a month (ORDER BY hits DESC, ip_hash DESC LIMIT n reads n index entries, no "
        "grouping needed: a visitor has one row per month).",
        indexes=(("site", "bucket", "hits", "ip_hash"),),
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
    for columns in aggregate.indexes:
        name = f"ix_{aggregate.rollup_table}_{'_'.join(columns)}"
        sa.Index(name, *(table.c[c] for c in columns))
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
        RollupTables.create_view(connection, aggregate, backend)

    @staticmethod
    def create_view(connection: Connection, aggregate: Aggregate, backend: Backend) -> None:
        """The view `<name>`: rollup rows before the watermark, then raw hits aggregated live.

        The rollup table holds only buckets before the watermark (a refresh
        writes them and moves the watermark in one transaction), so its part
        needs no filter; that keeps it a plain table scan, which PostgreSQL can
        read in index order for an ORDER BY ... LIMIT (the top visitors) instead
        of sorting all of a month's rows.

        The live part joins raw hits to the series of buckets from the watermark
        to the newest hit, rather than filtering `ts >= watermark`: a query's
        range on `bucket` then filters that short series first, so a query of
        materialised buckets reads no raw hits at all (a monthly rollup's live
        part is the whole current month, which a filter on a computed bucket
        expression cannot skip).
        """
        watermark = (
            f"(SELECT materialized_until FROM rollup_watermarks WHERE name = '{aggregate.name}')"
        )
        first = BUCKET_SQL[backend][aggregate.bucket]  # of `ts`: here the oldest live hit
        after = NEXT_BUCKET_SQL[backend][aggregate.bucket]
        series = (
            f"WITH RECURSIVE series(bucket, bucket_end) AS ("
            f"SELECT bucket, {after.format(b='bucket')} FROM ("
            f"SELECT {first} AS bucket FROM (SELECT min(ts) AS ts FROM hits "
            f"WHERE ts >= {watermark}) AS oldest) AS first_bucket WHERE bucket IS NOT NULL "
            f"UNION ALL "
            f"SELECT bucket_end, {after.format(b='bucket_end')} FROM series "
            f"WHERE bucket_end <= (SELECT max(ts) FROM hits)) "
            f"SELECT bucket, bucket_end FROM series"
        )
        groups = ", ".join(f"hits.{c}" for c in aggregate.group_by)
        measures = ", ".join(f"{m.sql} AS {m.name}" for m in aggregate.measures)
        # The series sits in a subquery, not in a WITH of the view: PostgreSQL
        # flattens only a plain UNION ALL (see above).
        connection.execute(
            text(
                f"CREATE VIEW {aggregate.name} AS "
                f"SELECT {', '.join(aggregate.columns)} FROM {aggregate.rollup_table} "
                f"UNION ALL "
                f"SELECT live.bucket, {groups}, {measures} FROM ({series}) AS live "
                f"{LIVE_JOIN[backend]} "
                f"ON hits.ts >= live.bucket AND hits.ts < live.bucket_end "
                # Always true; it tells PostgreSQL's planner that a bucket holds
                # few hits, so that it reads the rollup's index in order for an
                # ORDER BY ... LIMIT rather than sort all of a month's rows.
                f"AND {first} = live.bucket "
                f"GROUP BY live.bucket, {groups}"
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
        # Two buckets at least (TimescaleDB's rule for a policy window). Untested
        # here (Apache-only build): with it, raw retention below 62 days would let
        # the policy rematerialise a month from partly deleted hits.
        Bucket.MONTH: ("62 days", "1 day", "1 hour"),
    }

    @staticmethod
    def policy_lookback(aggregate: Aggregate) -> timedelta:
        """How far back from now the refresh policy's window starts."""
        days, unit = ContinuousAggregates.POLICY[aggregate.bucket][0].split()
        return timedelta(**{unit: int(days)})

    @staticmethod
    def create(connection: Connection, aggregate: Aggregate, backend: Backend) -> None:
        connection.execute(
            text(
                f"CREATE MATERIALIZED VIEW {aggregate.name} WITH "
                f"(timescaledb.continuous, timescaledb.materialized_only = false) AS "
                f"{aggregate.select_sql(backend)} WITH NO DATA"
            )
        )
        for columns in aggregate.indexes:
            name = f"ix_{aggregate.name}_{'_'.join(columns)}"
            connection.execute(
                text(f"CREATE INDEX {name} ON {aggregate.name} ({', '.join(columns)})")
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


def recreate_rollup_views(connection: Connection, names: Iterable[str]) -> None:
    """Rebuild the named rollups' views as `RollupTables.create_view` makes them
    now (the same rows; a faster shape). Continuous aggregates stay as they are."""
    if _builder_in_use(connection) is not RollupTables:
        return
    backend = backend_of(connection)
    for name in names:
        connection.execute(text(f"DROP VIEW {name}"))
        RollupTables.create_view(connection, BY_NAME[name], backend)


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
    scheduled: bool = False,
) -> list[Refreshed]:
    """Bring the aggregates up to date.

    Without `start`/`end` (the scheduler's call): rematerialise from where late
    events may have landed since the last such refresh (`next_window_start`)
    up to the last complete bucket, and advance the watermark there. With them
    (imports, erasure): recompute the buckets overlapping [start, end), never
    past the watermark. `raw_hits_from` is where retention has left raw hits:
    an explicit range never recomputes buckets before it, since that would
    replace kept rollups with nothing. (Retention, for its part, never deletes
    hits a refresh may still need: db/retention.py.) `scheduled` skips the
    aggregates refreshed more recently than their bucket's `refresh_every`.
    """
    now = now or datetime.now(UTC)
    aggregates = [BY_NAME[n] for n in names] if names else list(AGGREGATES)
    if mechanism_of(engine) is Mechanism.CONTINUOUS_AGGREGATES:
        return _refresh_continuous(engine, aggregates, start, end, now, raw_hits_from)
    done = []
    for aggregate in aggregates:
        refreshed = _refresh_rollup(engine, aggregate, start, end, now, raw_hits_from, scheduled)
        if refreshed is not None:
            done.append(refreshed)
    return done


def next_window_start(
    aggregate: Aggregate, watermark: datetime, refreshed_at: datetime | None
) -> datetime:
    """Where the next scheduled refresh of a rollup starts: at the watermark, or
    earlier where an event accepted since the last refresh may have landed (up
    to LATE_EVENTS before that refresh)."""
    late_from = (refreshed_at or watermark) - LATE_EVENTS
    return aggregate.bucket.floor(max(min(watermark, late_from), EPOCH))


def _refresh_rollup(
    engine: Engine,
    aggregate: Aggregate,
    start: datetime | None,
    end: datetime | None,
    now: datetime,
    raw_hits_from: datetime | None,
    scheduled: bool,
) -> Refreshed | None:
    backend = backend_of(engine)
    with writers_lock(engine), engine.begin() as connection:
        watermark, refreshed_at = connection.execute(
            sa.select(RollupWatermark.materialized_until, RollupWatermark.refreshed_at)
            .where(RollupWatermark.name == aggregate.name)
            .with_for_update()
        ).one()
        if start is None and end is None:
            if scheduled and refreshed_at and now < refreshed_at + aggregate.bucket.refresh_every:
                return None
            new_watermark = max(watermark, aggregate.bucket.floor(now))
            window_start = next_window_start(aggregate, watermark, refreshed_at)
            window_end = new_watermark
            refreshed_at = now
        else:
            new_watermark = watermark
            window_start = aggregate.bucket.floor(start or EPOCH)
            window_end = min(aggregate.bucket.ceil(end or watermark), watermark)
            if raw_hits_from is not None:
                # An explicit range may reach back past retention: keep those rollups.
                window_start = max(window_start, aggregate.bucket.ceil(raw_hits_from))
        if window_start < window_end:
            RollupTables.rematerialise(connection, aggregate, backend, window_start, window_end)
        connection.execute(
            sa.update(RollupWatermark)
            .where(RollupWatermark.name == aggregate.name)
            .values(materialized_until=new_watermark, refreshed_at=refreshed_at)
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


def raw_hits_needed_from(engine: Engine) -> datetime:
    """The oldest raw hit a scheduled rollup refresh may still read (retention
    keeps everything from here on)."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(
                RollupWatermark.name,
                RollupWatermark.materialized_until,
                RollupWatermark.refreshed_at,
            )
        ).all()
    starts = [
        next_window_start(BY_NAME[name], watermark, refreshed_at)
        for name, watermark, refreshed_at in rows
        if name in BY_NAME
    ]
    return min(starts, default=EPOCH)


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
