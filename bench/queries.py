"""Query benchmark: bulk load and dashboard queries on every backend.

For each backend (a temporary SQLite file; a fresh database, created and
dropped, on the PostgreSQL server and on the TimescaleDB server) it

1. migrates the database, then compares the bulk loader (`db.bulk.load_hits`)
   with a bare load of the same rows into the same table, side by side in
   alternating rounds: a `COPY` of the rows already formatted in memory on
   PostgreSQL/TimescaleDB, an `executemany` of ready parameter tuples on SQLite;
2. loads the whole generated dataset (bench/traffic.py; by default 10 million
   hits over 90 days) with the bulk loader and refreshes the aggregates;
3. runs the dashboard queries on the aggregates (`site_hourly`, `site_daily`,
   `paths_daily`, `visitors_monthly`) and the same queries on raw `hits`,
   printing p50/p95 per query and backend and the raw/aggregate ratio, and
   checks that both give the same rows, and that every backend gives the same
   figures.

    .venv/bin/python bench/queries.py                      # 10M hits, all backends
    .venv/bin/python bench/queries.py --events 500000 --backends sqlite,postgresql
    .venv/bin/python bench/queries.py --events 1000000 --explain   # and the query plans

Targets at 10M hits: each dashboard query's p95 under 100 ms on PostgreSQL and
TimescaleDB and under 1 s on SQLite; bulk load at least 0.7 of the bare load.
The machine is shared and noisy: ratios measured side by side in one run
matter more than absolute figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.traffic import Traffic, TrafficConfig  # noqa: E402
from db import migrate  # noqa: E402
from db.bulk import COPY_SQL, HitChunk, copy_text, load_hits, sqlite_rows  # noqa: E402
from db.engine import Backend, make_engine  # noqa: E402
from db.hits import HIT_COLUMNS, _sqlite_ts  # noqa: E402

try:  # the aggregates (issue 3): refreshed after loading when present
    from db import aggregates
except ImportError:  # pragma: no cover - before the aggregates existed
    aggregates = None  # type: ignore[assignment]

SERVERS = {
    Backend.POSTGRESQL: ("TELEMETRY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    Backend.TIMESCALEDB: ("TELEMETRY_TEST_TIMESCALE_URL", "postgresql://postgres@127.0.0.1:5433/postgres"),
}  # fmt: skip
TARGET_P95 = {Backend.SQLITE: 1.0, Backend.POSTGRESQL: 0.1, Backend.TIMESCALEDB: 0.1}
TARGET_LOAD_RATIO = 0.7

# -- the dashboard queries, per backend side by side -------------------------------------
#
# Every query reads one site's human hits (bots are left out of statistics).
# Parameters: :site, and :start/:end (a half-open UTC range). On SQLite
# timestamps are fixed-width UTC text, so the range is passed as that text and
# buckets are cut from it; PostgreSQL uses date_trunc, TimescaleDB time_bucket.

HOUR = {
    Backend.SQLITE: "substr(ts, 1, 13) || ':00:00.000000'",
    Backend.POSTGRESQL: "date_trunc('hour', ts, 'UTC')",
    Backend.TIMESCALEDB: "time_bucket(INTERVAL '1 hour', ts)",
}
DAY = {
    Backend.SQLITE: "substr(ts, 1, 10) || ' 00:00:00.000000'",
    Backend.POSTGRESQL: "date_trunc('day', ts, 'UTC')",
    Backend.TIMESCALEDB: "time_bucket(INTERVAL '1 day', ts)",
}
# ISO weekday (1 = Monday) and hour of an hourly bucket `b`, in UTC.
_PG_WEEKDAY_HOUR = (
    "extract(isodow FROM b AT TIME ZONE 'UTC')::int, extract(hour FROM b AT TIME ZONE 'UTC')::int"
)
WEEKDAY_HOUR = {
    Backend.SQLITE: (
        "(CAST(strftime('%w', b) AS INTEGER) + 6) % 7 + 1, CAST(substr(b, 12, 2) AS INTEGER)"
    ),
    Backend.POSTGRESQL: _PG_WEEKDAY_HOUR,
    Backend.TIMESCALEDB: _PG_WEEKDAY_HOUR,
}

RAW_HITS = "FROM hits WHERE site = :site AND ts >= :start AND ts < :end AND NOT is_bot"
AGG_RANGE = "WHERE site = :site AND bucket >= :start AND bucket < :end"


@dataclass(frozen=True)
class DashboardQuery:
    name: str
    days: int | None  # the last `days` days before the end, or None: the last full month
    aggregate: Callable[[Backend], str]
    raw: Callable[[Backend], str]


# The aggregates are the coarse ones (migration 0003): one row per site and hour
# or day, per path and day, per visitor and month, so a dashboard reads a few
# thousand rows whatever the traffic. Ties in the top lists are broken the same
# way in both queries (ip_hash DESC: the visitors_monthly index's own order).
QUERIES = (
    DashboardQuery(
        "hourly traffic, 30 days",
        30,
        lambda b: f"SELECT bucket, hits FROM site_hourly {AGG_RANGE} AND hits > 0 ORDER BY bucket",
        lambda b: f"SELECT {HOUR[b]} AS bucket, count(*) {RAW_HITS} GROUP BY 1 ORDER BY 1",
    ),
    DashboardQuery(
        "daily unique visitors, 90 days",
        90,
        lambda b: (
            f"SELECT bucket, visitors FROM site_daily {AGG_RANGE} AND visitors > 0 ORDER BY bucket"
        ),
        lambda b: (
            f"SELECT {DAY[b]} AS bucket, count(DISTINCT ip_hash) {RAW_HITS} GROUP BY 1 ORDER BY 1"
        ),
    ),
    DashboardQuery(
        "hour x weekday, 30 days",
        30,
        lambda b: (
            f"SELECT {WEEKDAY_HOUR[b]}, sum(h) FROM (SELECT bucket AS b, hits AS h "
            f"FROM site_hourly {AGG_RANGE}) AS per_hour "
            "GROUP BY 1, 2 HAVING sum(h) > 0 ORDER BY 1, 2"
        ),
        lambda b: (
            f"SELECT {WEEKDAY_HOUR[b]}, sum(h) FROM (SELECT {HOUR[b]} AS b, count(*) AS h "
            f"{RAW_HITS} GROUP BY 1) AS per_hour GROUP BY 1, 2 ORDER BY 1, 2"
        ),
    ),
    DashboardQuery(
        "top 20 paths of a month",
        None,
        lambda b: (
            f"SELECT path, sum(hits) AS n FROM paths_daily {AGG_RANGE} "
            "GROUP BY path HAVING sum(hits) > 0 ORDER BY n DESC, path LIMIT 20"
        ),
        lambda b: (
            f"SELECT path, count(*) AS n {RAW_HITS} GROUP BY path ORDER BY n DESC, path LIMIT 20"
        ),
    ),
    DashboardQuery(
        "top 15 visitors of a month",
        None,
        # One row per visitor and month: no grouping, the index gives the order.
        lambda b: (
            "SELECT ip_hash, hits FROM visitors_monthly "
            "WHERE site = :site AND bucket = :start AND hits > 0 "
            "ORDER BY hits DESC, ip_hash DESC LIMIT 15"
        ),
        lambda b: (
            f"SELECT ip_hash, count(*) AS n {RAW_HITS} GROUP BY ip_hash "
            "ORDER BY n DESC, ip_hash DESC LIMIT 15"
        ),
    ),
)


# -- databases -----------------------------------------------------------------------------


@dataclass
class Database:
    backend: Backend
    url: str
    drop: Callable[[], None]


def create_database(backend: Backend, workdir: Path) -> Database:
    """A fresh, migrated database on `backend`, and how to get rid of it."""
    if backend is Backend.SQLITE:
        url = f"sqlite:///{workdir / 'bench.db'}"
        migrate.upgrade(url)
        return Database(backend, url, lambda: None)
    variable, default = SERVERS[backend]
    server = make_url(os.environ.get(variable) or default).set(drivername="postgresql+psycopg")
    name = f"telemetry_bench_{os.getpid()}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    drop()
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = server.set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    return Database(backend, url, drop)


def empty_hits(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.execute(sa.text("DELETE FROM hits"))
        else:
            connection.execute(sa.text("TRUNCATE hits"))


def analyze(engine: sa.Engine) -> None:
    """Fresh planner statistics, as autovacuum would have them in production."""
    if engine.dialect.name == "sqlite":
        with engine.begin() as connection:
            connection.execute(sa.text("ANALYZE"))
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("VACUUM ANALYZE"))


# -- loading -------------------------------------------------------------------------------


def bare_load(engine: sa.Engine, chunks: list[HitChunk]) -> float:
    """Seconds to store `chunks` the barest way, everything prepared beforehand."""
    if engine.dialect.name == "sqlite":
        import sqlite3

        rows = [sqlite_rows(chunk) for chunk in chunks]
        insert = f"INSERT INTO hits ({', '.join(HIT_COLUMNS)}) VALUES ({', '.join('?' * 10)})"
        connection = sqlite3.connect(engine.url.database or "", isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        start = time.perf_counter()
        for chunk_rows in rows:  # one transaction per chunk, as load_hits does
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(insert, chunk_rows)
            connection.execute("COMMIT")
        elapsed = time.perf_counter() - start
        connection.close()
        return elapsed
    data = [copy_text(chunk) for chunk in chunks]
    raw = engine.raw_connection()
    try:
        start = time.perf_counter()
        cursor = raw.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(COPY_SQL) as copy:
            for block in data:
                copy.write(block)
        raw.commit()
        return time.perf_counter() - start
    finally:
        raw.close()


@dataclass
class LoadResult:
    rows: int = 0
    bulk_rates: list[float] = field(default_factory=list)
    bare_rates: list[float] = field(default_factory=list)
    full_rate: float = 0.0
    generate_seconds: float = 0.0
    refresh_seconds: float | None = None

    @property
    def ratios(self) -> list[float]:
        return [bulk / bare for bulk, bare in zip(self.bulk_rates, self.bare_rates, strict=True)]


def compare_loads(
    engine: sa.Engine, sample: list[HitChunk], rounds: int, result: LoadResult
) -> None:
    """Bulk loader vs bare load of the same rows into the same (emptied) table,
    alternating which goes first so that drift on the machine hits both."""
    rows = sum(len(chunk) for chunk in sample)
    for round_ in range(rounds):
        order = ("bulk", "bare") if round_ % 2 == 0 else ("bare", "bulk")
        for kind in order:
            empty_hits(engine)
            if kind == "bulk":
                start = time.perf_counter()
                load_hits(engine, sample)
                result.bulk_rates.append(rows / (time.perf_counter() - start))
            else:
                result.bare_rates.append(rows / bare_load(engine, sample))
        print(
            f"    round {round_ + 1}: bulk {result.bulk_rates[-1]:,.0f} rows/s, "
            f"bare {result.bare_rates[-1]:,.0f} rows/s, ratio {result.ratios[-1]:.2f}",
            flush=True,
        )
    empty_hits(engine)


class Timed:
    """Wraps the generator to tell its time apart from the loader's."""

    def __init__(self, chunks: Iterable[HitChunk]) -> None:
        self._chunks = iter(chunks)
        self.seconds = 0.0

    def __iter__(self) -> Iterator[HitChunk]:
        while True:
            start = time.perf_counter()
            chunk = next(self._chunks, None)
            self.seconds += time.perf_counter() - start
            if chunk is None:
                return
            yield chunk


# -- queries -------------------------------------------------------------------------------


def query_range(query: DashboardQuery, end: datetime) -> tuple[datetime, datetime]:
    if query.days is not None:
        return end - timedelta(days=query.days), end
    # The last full calendar month before the end (the current one if the data ends on its 1st).
    last = end - timedelta(microseconds=1)
    month_start = last.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if end - month_start < timedelta(days=28):
        previous = month_start - timedelta(days=1)
        return previous.replace(day=1), month_start
    return month_start, end


def bind(backend: Backend, site: str, start: datetime, end: datetime) -> dict[str, Any]:
    if backend is Backend.SQLITE:
        return {"site": site, "start": _sqlite_ts(start), "end": _sqlite_ts(end)}
    return {"site": site, "start": start, "end": end}


def normalised(rows: list[Any]) -> list[tuple[Any, ...]]:
    """Rows in a form comparable across backends."""

    def value(v: Any) -> Any:
        if isinstance(v, datetime):
            return v.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
        if isinstance(v, memoryview | bytes):
            return bytes(v).hex()
        if isinstance(v, float | int) or hasattr(v, "as_integer_ratio"):
            return int(v)
        return v

    return [tuple(value(v) for v in row) for row in rows]


def time_query(
    engine: sa.Engine, sql: str, params: dict[str, Any], repeat: int
) -> tuple[list[float], list[Any]]:
    statement = sa.text(sql)
    timings = []
    rows: list[Any] = []
    with engine.connect() as connection:
        connection.execute(statement, params).fetchall()  # warm-up: caches and plans
        for _ in range(repeat):
            start = time.perf_counter()
            rows = list(connection.execute(statement, params).fetchall())
            timings.append(time.perf_counter() - start)
    return timings, rows


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@dataclass
class QueryResult:
    backend: Backend
    query: str
    aggregate: list[float] | None
    raw: list[float]
    same_rows: bool | None
    rows: list[tuple[Any, ...]]


def print_plan(engine: sa.Engine, sql: str, params: dict[str, Any]) -> None:
    """The plan of an aggregate query, to see which rows it reads."""
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN ANALYZE "
    with engine.connect() as connection:
        for row in connection.execute(sa.text(prefix + sql), params):
            print("      " + " ".join(str(v) for v in row[-1:]), flush=True)


def run_queries(
    engine: sa.Engine,
    backend: Backend,
    site: str,
    end: datetime,
    repeat: int,
    raw_repeat: int,
    with_aggregates: bool,
    explain: bool = False,
) -> list[QueryResult]:
    results = []
    for query in QUERIES:
        start, stop = query_range(query, end)
        params = bind(backend, site, start, stop)
        raw_times, raw_rows = time_query(engine, query.raw(backend), params, raw_repeat)
        agg_times: list[float] | None = None
        same: bool | None = None
        rows = normalised(raw_rows)
        if with_aggregates:
            agg_times, agg_rows = time_query(engine, query.aggregate(backend), params, repeat)
            same = normalised(agg_rows) == rows
            if explain:
                print_plan(engine, query.aggregate(backend), params)
        results.append(QueryResult(backend, query.name, agg_times, raw_times, same, rows))
        print(f"    {query.name}: done", flush=True)
    return results


# -- the run -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000_000, help="hits to generate")
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--end",
        type=date.fromisoformat,
        default=None,
        help="the day after the last day of data (default: today, UTC)",
    )
    parser.add_argument("--backends", default="sqlite,postgresql,timescaledb")
    parser.add_argument(
        "--compare-events",
        type=int,
        default=1_000_000,
        help="rows of the bulk-vs-bare comparison (at most --events)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of bulk vs bare")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per aggregate query")
    parser.add_argument("--raw-repeat", type=int, default=5, help="timed runs per raw query")
    parser.add_argument("--explain", action="store_true", help="print the aggregate queries' plans")
    args = parser.parse_args(argv)  # fmt: skip

    end_day = args.end or datetime.now(UTC).date()
    config = TrafficConfig(events=args.events, days=args.days, seed=args.seed, end=end_day)
    end = config.end_time
    site = config.sites[0]
    backends = [Backend(name.strip()) for name in args.backends.split(",") if name.strip()]
    print(
        f"Dataset: {config.events:,} hits over {config.days} days ending {end:%Y-%m-%d}, "
        f"seed {config.seed}; queries on site {site!r}",
        flush=True,
    )

    start = time.perf_counter()
    generated = sum(len(chunk) for chunk in Traffic(config).chunks())
    generate_seconds = time.perf_counter() - start
    print(f"Generator alone: {generated:,} hits in {generate_seconds:.1f} s "
          f"({generated / generate_seconds:,.0f} hits/s)", flush=True)  # fmt: skip

    compare_rows = min(args.compare_events, args.events)
    sample_config = TrafficConfig(events=compare_rows, days=args.days, seed=args.seed, end=end_day)
    sample = list(Traffic(sample_config).chunks())

    loads: dict[Backend, LoadResult] = {}
    queries: list[QueryResult] = []
    with tempfile.TemporaryDirectory(prefix="telemetry-bench-") as workdir:
        for backend in backends:
            print(f"\n== {backend.value}", flush=True)
            database = create_database(backend, Path(workdir))
            engine = make_engine(database.url)
            try:
                result = loads[backend] = LoadResult()
                print(
                    f"  bulk vs bare load, {compare_rows:,} rows x {args.rounds} rounds", flush=True
                )
                compare_loads(engine, sample, args.rounds, result)

                print(f"  loading {config.events:,} hits ...", flush=True)
                chunks = Timed(Traffic(config).chunks())
                start = time.perf_counter()
                result.rows = load_hits(engine, chunks)
                elapsed = time.perf_counter() - start
                result.generate_seconds = chunks.seconds
                result.full_rate = result.rows / (elapsed - chunks.seconds)
                print(f"  loaded in {elapsed:.1f} s ({chunks.seconds:.1f} s of it generating): "
                      f"{result.full_rate:,.0f} rows/s", flush=True)  # fmt: skip

                with_aggregates = aggregates is not None
                if with_aggregates:
                    start = time.perf_counter()
                    aggregates.refresh(engine, now=end)
                    result.refresh_seconds = time.perf_counter() - start
                    print(f"  aggregates refreshed in {result.refresh_seconds:.1f} s", flush=True)
                else:
                    print("  no db.aggregates yet: raw queries only", flush=True)
                analyze(engine)
                done = run_queries(
                    engine,
                    backend,
                    site,
                    end,
                    args.repeat,
                    args.raw_repeat,
                    with_aggregates,
                    explain=args.explain,
                )
                print_query_rows(done)  # already now, in case a later backend fails
                queries += done
            finally:
                engine.dispose()
                database.drop()

    report(config, loads, queries, args)
    return 0


def report(
    config: TrafficConfig,
    loads: dict[Backend, LoadResult],
    queries: list[QueryResult],
    args: argparse.Namespace,
) -> None:
    compare_rows = min(args.compare_events, args.events)
    print(f"\n## Results: {config.events:,} hits over {config.days} days, seed {config.seed}\n")
    print(
        "Load (bulk = db.bulk.load_hits; bare = COPY of preformatted rows / plain executemany; "
        f"median of {args.rounds} alternating rounds of {compare_rows:,} rows)\n"
    )
    print("| backend | bulk rows/s | bare rows/s | bulk/bare | full load rows/s | refresh s |")
    print("|---|---:|---:|---:|---:|---:|")
    for backend, r in loads.items():
        ratio = statistics.median(r.ratios)
        flag = "" if ratio >= TARGET_LOAD_RATIO else " (below 0.7)"
        refresh = f"{r.refresh_seconds:.1f}" if r.refresh_seconds is not None else "-"
        print(f"| {backend.value} | {statistics.median(r.bulk_rates):,.0f} | "
              f"{statistics.median(r.bare_rates):,.0f} | {ratio:.2f}{flag} | "
              f"{r.full_rate:,.0f} | {refresh} |")  # fmt: skip

    print(f"\nDashboard queries (ms; aggregate: {args.repeat} runs, raw: {args.raw_repeat} runs, "
          "after one warm-up each)\n")  # fmt: skip
    print_query_rows(queries)

    backends = list(dict.fromkeys(q.backend for q in queries))
    if len(backends) > 1:
        print("\nParity across backends (same figures for the same dataset):")
        for name in dict.fromkeys(q.query for q in queries):
            answers = {q.backend: q.rows for q in queries if q.query == name}
            reference = answers[backends[0]]
            differing = [b.value for b, rows in answers.items() if rows != reference]
            print(
                f"  {name}: "
                + ("identical" if not differing else "DIFFERS on " + ", ".join(differing))
            )


def print_query_rows(queries: list[QueryResult]) -> None:
    print("| backend | query | agg p50 | agg p95 | raw p50 | raw p95 | raw/agg p50 | target "
          "| same rows |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---|---|", flush=True)
    for q in queries:
        raw50, raw95 = percentile(q.raw, 50) * 1000, percentile(q.raw, 95) * 1000
        if q.aggregate is None:
            print(
                f"| {q.backend.value} | {q.query} | - | - | {raw50:.1f} | {raw95:.1f} | - | - | - |"
            )
            continue
        agg50, agg95 = percentile(q.aggregate, 50) * 1000, percentile(q.aggregate, 95) * 1000
        target = TARGET_P95[q.backend] * 1000
        same = "yes" if q.same_rows else "NO"
        met = "ok" if agg95 < target else f"MISSED (< {target:.0f})"
        print(f"| {q.backend.value} | {q.query} | {agg50:.1f} | {agg95:.1f} | {raw50:.1f} | "
              f"{raw95:.1f} | {raw50 / agg50:.1f}x | {met} | {same} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
