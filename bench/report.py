"""Report benchmark: the monthly report from the aggregates (analytics.figures.compute)
against the same figures computed the naive way, on every backend.

For each backend it loads the seeded dataset of bench/traffic.py (10 million
hits over 90 days by default; bench/queries.py has the database handling),
refreshes the aggregates, then measures, each in a fresh Python process so
that its peak RSS is its own:

- report: `compute()` for the last full month of the data and its busiest site;
- naive: the month's raw rows of that site (and the timestamps of the four
  weeks before, which the baseline needs) loaded into pandas, and the same
  figures computed there with groupby.

It prints both times, their ratio, the report's time per step, and each
one's peak RSS (VmHWM of the measuring process, which includes the
interpreter and its imports: about 160 MiB), and checks that both ways give
the same headline figures.

    .venv/bin/python bench/report.py                         # 10M hits, all backends
    .venv/bin/python bench/report.py --events 1000000 --backends sqlite,postgresql
    .venv/bin/python bench/report.py --end 2026-12-03 --keep-in /var/tmp/report-bench

Loading 10M hits and refreshing the aggregates takes several minutes per
backend; with --keep-in DIR the loaded databases are kept (the SQLite file in
DIR, a database named after the dataset on each server) and a later run with
the same DIR and dataset measures them again without loading. Give --end too,
or the dataset changes with the date. Drop the server databases by hand when
done (the run prints their names) and delete DIR.

Targets at 10M hits: the report in < 10 s on PostgreSQL/TimescaleDB and < 30 s
on SQLite, peak RSS < 1 GiB. The machine is shared: note its load (uptime).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from analytics import baseline  # noqa: E402
from analytics.figures import TOP_PATHS, TOP_VISITORS, compute  # noqa: E402
from bench.queries import SERVERS, analyze, create_database  # noqa: E402
from bench.traffic import Traffic, TrafficConfig  # noqa: E402
from db import aggregates, migrate  # noqa: E402
from db.bulk import load_hits  # noqa: E402
from db.engine import Backend, make_engine  # noqa: E402
from db.models import UTCDateTime  # noqa: E402

TARGET_SECONDS = {Backend.SQLITE: 30.0, Backend.POSTGRESQL: 10.0, Backend.TIMESCALEDB: 10.0}
TARGET_RSS = 1 << 30


def last_full_month(end: datetime) -> tuple[date, date]:
    """The last calendar month that ends before `end` (midnight UTC)."""
    last_day = (end - timedelta(days=1)).date()
    if (last_day + timedelta(days=1)).day != 1:
        last_day = last_day.replace(day=1) - timedelta(days=1)
    return last_day.replace(day=1), last_day


# -- the two ways, each run in a child process ---------------------------------------------


# Seconds per step of compute() in the last run_report (printed with the results).
STEP_SECONDS: dict[str, float] = {}


def run_report(url: str, site: str, start: date, end: date) -> dict[str, Any]:
    engine = make_engine(url)
    last = time.perf_counter()

    def step(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        STEP_SECONDS[name] = now - last
        last = now

    try:
        data = compute(engine, site, start, end, "UTC", progress=step)
    finally:
        engine.dispose()
    return headline(data)


def headline(data: dict[str, Any]) -> dict[str, Any]:
    """The figures both ways must agree on."""
    return {
        "hits": data["summary"]["hits"],
        "visitors": data["summary"]["visitors"],
        "peak_hour": data["summary"]["peak_hour"],
        "anomalies": data["summary"]["anomalies"],
        "heatmap": data["heatmap"]["hits"],
        "top_paths": [[p["path"], p["hits"], p["visitors"]] for p in data["top_paths"]],
        "top_visitors": [[v["visitor"], v["hits"]] for v in data["top_visitors"]],
        "referrers": [[r["host"], r["hits"]] for r in data["referrers"]],
        "browsers": [[b["name"], b["hits"]] for b in data["browsers"]],
        "affinity": [[p["a"], p["b"], p["visitors"]] for p in data["affinity"]],
    }


def run_naive(url: str, site: str, start: date, end: date) -> dict[str, Any]:
    """The same figures from the month's raw rows in pandas."""
    utc_start = datetime.combine(start, datetime.min.time(), UTC)
    utc_end = datetime.combine(end + timedelta(days=1), datetime.min.time(), UTC)
    engine = make_engine(url)
    binds = (
        sa.bindparam("start", type_=UTCDateTime()),
        sa.bindparam("end", type_=UTCDateTime()),
    )
    rows = sa.text(
        "SELECT ts, path, referrer, ip_hash, browser, os, device FROM hits "
        "WHERE site = :site AND ts >= :start AND ts < :end AND NOT is_bot"
    ).bindparams(*binds)
    history = sa.text(
        "SELECT ts FROM hits WHERE site = :site AND ts >= :start AND ts < :end AND NOT is_bot"
    ).bindparams(*binds)
    first = sa.text("SELECT min(ts) FROM hits WHERE site = :site")
    try:
        with engine.connect() as connection:
            month = pd.read_sql(
                rows, connection, params={"site": site, "start": utc_start, "end": utc_end}
            )
            before = pd.read_sql(
                history,
                connection,
                params={"site": site, "start": utc_start - baseline.HISTORY, "end": utc_start},
            )
            first_ts = connection.execute(first, {"site": site}).scalar()
    finally:
        engine.dispose()

    month["ts"] = pd.to_datetime(month["ts"], utc=True, format="ISO8601")
    month["ip_hash"] = month["ip_hash"].map(bytes)
    month["day"] = month["ts"].dt.floor("D")
    month["hour"] = month["ts"].dt.floor("h")
    hits = len(month)
    visitors = month["ip_hash"].nunique()

    per_hour = month.groupby("hour").size()
    before_hours = pd.to_datetime(before["ts"], utc=True, format="ISO8601").dt.floor("h")
    series = pd.concat([before_hours.value_counts(), per_hour]).groupby(level=0).sum()
    first_hour = pd.Timestamp(first_ts).tz_localize(None).tz_localize("UTC").floor("h")
    judged = baseline.evaluate(series, utc_start, utc_end, first_hour=first_hour)

    heatmap = [[0] * 24 for _ in range(7)]
    for (weekday, hour), n in (
        month.groupby([month["ts"].dt.day_of_week, month["ts"].dt.hour]).size().items()
    ):
        heatmap[weekday][hour] = int(n)
    busiest = (
        per_hour.reset_index(name="n")
        .assign(day=lambda f: f["hour"].dt.floor("D"), h=lambda f: f["hour"].dt.hour)
        .sort_values(["day", "n", "h"], ascending=[True, False, True])
        .drop_duplicates("day")["h"]
        .value_counts()
    )
    peak_hour = int(min(h for h, n in busiest.items() if n == busiest.max()))

    paths = (
        month.groupby("path")
        .agg(hits=("ip_hash", "size"), visitors=("ip_hash", "nunique"))
        .reset_index()
        .sort_values(["hits", "path"], ascending=[False, True])
        .head(TOP_PATHS)
    )
    top = (
        month.groupby("ip_hash")
        .size()
        .reset_index(name="n")
        .sort_values(["n", "ip_hash"], ascending=[False, True])
        .head(TOP_VISITORS)
    )
    hosts = month["referrer"].map(
        lambda r: (urlsplit(r).hostname or r) if isinstance(r, str) and r else "(direct)"
    )
    referrers = hosts.value_counts().reset_index()
    referrers = referrers.sort_values(["count", "referrer"], ascending=[False, True]).head(20)
    browsers = month["browser"].fillna("(unknown)").value_counts().reset_index()
    browsers = browsers.sort_values(["count", "browser"], ascending=[False, True])

    # Affinity: visitor-days of the top paths, paired by a self-merge.
    views = month[month["path"].isin(set(paths["path"]))][["ip_hash", "day", "path"]]
    views = views.drop_duplicates()
    pairs = views.merge(views, on=["ip_hash", "day"])
    pairs = pairs[pairs["path_x"] < pairs["path_y"]]
    together = pairs.groupby(["path_x", "path_y"]).size()
    baskets = month[["ip_hash", "day"]].drop_duplicates().shape[0]
    singles = views.groupby("path").size()
    affinity = sorted(
        (
            (-int(n), -(n * baskets / (singles[a] * singles[b])), a, b)
            for (a, b), n in together.items()
        )
    )[:20]

    return {
        "hits": hits,
        "visitors": int(visitors),
        "peak_hour": peak_hour,
        "anomalies": int(judged["anomaly"].notna().sum()),
        "heatmap": heatmap,
        "top_paths": [[p, int(h), int(v)] for p, h, v in paths.itertuples(index=False)],
        "top_visitors": [[ip.hex()[:8], int(n)] for ip, n in top.itertuples(index=False)],
        "referrers": [[h, int(n)] for h, n in referrers.itertuples(index=False)],
        "browsers": [[b, int(n)] for b, n in browsers.itertuples(index=False)],
        "affinity": [[a, b, -n] for n, _lift, a, b in affinity],
    }


def measure(way: str, url: str, site: str, start: date, end: date) -> dict[str, Any]:
    """Run one way in a fresh process; its time, peak RSS and figures."""
    command = [sys.executable, __file__, "--measure", way, "--url", url, "--site", site,
               "--month", start.strftime("%Y-%m")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{way} failed:\n{done.stderr}")
    output = done.stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def child(way: str, url: str, site: str, month: str) -> int:
    start = date.fromisoformat(month + "-01")
    end = (start + timedelta(days=32)).replace(day=1) - timedelta(days=1)
    before = peak_rss()
    began = time.perf_counter()
    figures = (run_report if way == "report" else run_naive)(url, site, start, end)
    seconds = time.perf_counter() - began
    result = {"seconds": seconds, "rss": peak_rss(), "rss_before": before, "figures": figures}
    print(json.dumps({**result, "steps": STEP_SECONDS}))
    return 0


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and
    exec, so a child would report its parent's peak (the loader's) instead.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the databases -------------------------------------------------------------------------


@dataclass
class BenchDatabase:
    """A database to measure on: a throwaway one (bench/queries.py's, dropped
    after the run), or a kept one (`loaded_marker` set), reused once that
    marker file exists: it is written after a complete load."""

    name: str
    url: str
    drop: Callable[[], None] = lambda: None
    loaded_marker: Path | None = None


def create_throwaway(backend: Backend, workdir: Path) -> BenchDatabase:
    database = create_database(backend, workdir)
    return BenchDatabase(database.url, database.url, database.drop)


def kept_database(backend: Backend, directory: Path, config: TrafficConfig) -> BenchDatabase:
    """The database of this dataset on `backend`, kept between runs: created
    (empty, migrated) unless a complete earlier load is marked in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    name = (f"telemetry_bench_report_{config.events}_{config.days}_{config.seed}_"
            f"{config.end_time:%Y%m%d}")  # fmt: skip
    marker = directory / f"{name}.{backend.value}.loaded"
    if backend is Backend.SQLITE:
        path = directory / f"{name}.db"
        if not marker.exists():
            path.unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    else:
        variable, default = SERVERS[backend]
        server = make_url(os.environ.get(variable) or default).set(drivername="postgresql+psycopg")
        admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        with admin.connect() as connection:
            exists = connection.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).first()
            if exists and not marker.exists():  # an interrupted load: start again
                connection.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            if not exists or not marker.exists():
                connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = server.set(database=name).render_as_string(hide_password=False)
    # Also on a reused database: migrations added since it was loaded apply.
    migrate.upgrade(url)
    return BenchDatabase(name, url, loaded_marker=marker)


def load_dataset(engine: sa.Engine, config: TrafficConfig) -> None:
    began = time.perf_counter()
    rows = load_hits(engine, Traffic(config).chunks())
    print(f"  loaded {rows:,} hits in {time.perf_counter() - began:.1f} s", flush=True)
    began = time.perf_counter()
    aggregates.refresh(engine, now=config.end_time)
    print(f"  aggregates refreshed in {time.perf_counter() - began:.1f} s", flush=True)
    analyze(engine)


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
        "--keep-in",
        type=Path,
        metavar="DIR",
        help="keep the loaded databases (SQLite file and load markers in DIR) and reuse them",
    )
    parser.add_argument("--measure", choices=["report", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--site", help=argparse.SUPPRESS)
    parser.add_argument("--month", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        return child(args.measure, args.url, args.site, args.month)

    end_day = args.end or datetime.now(UTC).date()
    config = TrafficConfig(events=args.events, days=args.days, seed=args.seed, end=end_day)
    site = config.sites[0]
    start, end = last_full_month(config.end_time)
    backends = [Backend(name.strip()) for name in args.backends.split(",") if name.strip()]
    print(f"Dataset: {config.events:,} hits over {config.days} days ending "
          f"{config.end_time:%Y-%m-%d}, seed {config.seed}; report on {site!r} for "
          f"{start:%Y-%m}", flush=True)  # fmt: skip
    print(f"Machine load at start: {os.getloadavg()[0]:.2f} (1 min)", flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="telemetry-bench-") as workdir:
        for backend in backends:
            print(f"\n== {backend.value}", flush=True)
            if args.keep_in:
                database = kept_database(backend, args.keep_in, config)
            else:
                database = create_throwaway(backend, Path(workdir))
            engine = make_engine(database.url)
            try:
                if database.loaded_marker is None or not database.loaded_marker.exists():
                    load_dataset(engine, config)
                    if database.loaded_marker is not None:
                        database.loaded_marker.write_text(database.url + "\n")
                        print(f"  kept as {database.name}", flush=True)
                else:
                    print(f"  reusing the loaded database {database.name}", flush=True)
                load = os.getloadavg()[0]
                report = measure("report", database.url, site, start, end)
                naive = measure("naive", database.url, site, start, end)
                steps = ", ".join(f"{k} {v:.2f}" for k, v in report["steps"].items())
                print(f"  report {report['seconds']:.2f} s ({steps}), naive "
                      f"{naive['seconds']:.2f} s (load {load:.2f})", flush=True)  # fmt: skip
                results.append((backend, report, naive, load))
            finally:
                engine.dispose()
                if database.loaded_marker is None:
                    database.drop()

    month_rows = "a month of one site"
    print(f"\n## Results: {config.events:,} hits over {config.days} days, seed {config.seed}; "
          f"{month_rows} ({start:%Y-%m}, {site})\n")  # fmt: skip
    print("| backend | report s | naive s | naive/report | report peak RSS | naive peak RSS "
          "| target | same figures | load (1 min) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---|---|---:|")
    for backend, report, naive, load in results:
        met = report["seconds"] < TARGET_SECONDS[backend] and report["rss"] < TARGET_RSS
        target = f"< {TARGET_SECONDS[backend]:.0f} s, < 1 GiB"
        print(f"| {backend.value} | {report['seconds']:.2f} | {naive['seconds']:.2f} | "
              f"{naive['seconds'] / report['seconds']:.1f}x | {_mib(report['rss'])} | "
              f"{_mib(naive['rss'])} | {'ok' if met else 'MISSED'} ({target}) | "
              f"{_same(report['figures'], naive['figures'])} | {load:.2f} |")  # fmt: skip
    return 0


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def _same(a: dict[str, Any], b: dict[str, Any]) -> str:
    differing = [key for key in a if a[key] != b.get(key)]
    return "yes" if not differing else "NO: " + ", ".join(differing)


if __name__ == "__main__":
    sys.exit(main())
