"""Every figure of a report, computed from the aggregates: `compute()` returns
the analytics JSON (notes/analytics-contract.md) that `telemetry report`,
`GET /api/stats` and the HTML report consume.

Where each figure comes from (db/aggregates.py has the relations):

- hits, bot hits, the hourly series and its baseline, the daily and monthly
  hits, the hour x weekday matrix and the peak hour: `site_hourly`, re-bucketed
  into the operator's time zone, so they are exact per local hour, day and
  month;
- unique visitors: exact distinct `ip_hash`, from `site_daily` / `site_monthly`
  for one site's human visitors, else counted from `visitors_daily` /
  `visitors_monthly` (all sites together, or with bots). The hashing key
  changes every UTC month by default and visitors are only countable per UTC
  day or month, so these figures (and top visitors, paths, referrers and
  agents, which come from the daily aggregates) cover the UTC days of the
  range's dates, also when the time zone is not UTC;
- top visitors: `visitors_monthly` when the range is whole months (an indexed
  read), `visitors_daily` otherwise;
- top paths, referrers (grouped by host), browsers, operating systems and
  devices: `paths_daily`, `referrers_daily`, `agents_daily`;
- path affinity and the exact visitors of each top path: one SQL aggregation
  over raw `hits` in the database, restricted to the top paths (see
  `_Query.path_views`); nothing but the final counts leaves the database.

The result holds plain ints, floats, strings and None (JSON-ready).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd
import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from analytics import baseline
from analytics.errors import BadRange, UnknownSite
from db.aggregates import BUCKET_SQL, Bucket, relation
from db.engine import Backend, backend_of
from db.models import UTCDateTime

TOP_VISITORS = 15
TOP_PATHS = 20
TOP_REFERRERS = 20
TOP_PAIRS = 20
# The monthly figures show the range's months and this many before them.
MONTHS_BEFORE = 2
# A longer range is refused: it is not a report any more, it is an export.
MAX_DAYS = 366
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
DIRECT = "(direct)"
UNKNOWN = "(unknown)"

# The steps of compute(), in order; `progress` is called after each.
STEPS = ("hours", "visitors", "top visitors", "paths", "referrers", "agents", "affinity")

Progress = Callable[[str], None]


# -- input -----------------------------------------------------------------------------------

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_MONTH = re.compile(r"(\d{4})-(\d{2})")


def parse_day(text: str) -> date:
    """A YYYY-MM-DD date, or BadRange saying what is wrong with it."""
    if not _DAY.fullmatch(text):
        raise BadRange(f"{text!r} is not a date of the form YYYY-MM-DD")
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise BadRange(f"{text!r} is not a date: {exc}") from None


def month_range(text: str) -> tuple[date, date]:
    """The first and last day of the month YYYY-MM."""
    match = _MONTH.fullmatch(text)
    if not match or not 1 <= int(match[2]) <= 12 or int(match[1]) < 1:
        raise BadRange(f"{text!r} is not a month of the form YYYY-MM")
    first = date(int(match[1]), int(match[2]), 1)
    return first, _add_months(first, 1) - timedelta(days=1)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadRange(f"{name!r} is not a time zone (e.g. UTC, Europe/Paris)") from None


def _add_months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


# -- the figures -----------------------------------------------------------------------------


def compute(
    engine: Engine,
    site: str | None,
    start: date,
    end: date,
    tz: str,
    include_bots: bool = False,
    margin: float = baseline.DEFAULT_MARGIN,
    *,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """All figures for `site` (None: all sites together) from `start` to `end`
    (both included, local dates in `tz`).

    Bots are left out of every figure unless `include_bots`; the hourly
    baseline and its anomalies always judge human hits (the one definition
    Grafana's alert shares). Hours are listed up to the last complete one
    before `now`. Raises UnknownSite for a site that never had a hit and
    BadRange for reversed, overlong or future ranges.
    """
    now = now or datetime.now(UTC)
    tzinfo = zone(tz)
    if start > end:
        raise BadRange(f"the range starts ({start}) after it ends ({end})")
    if (end - start).days + 1 > MAX_DAYS:
        raise BadRange(f"a range covers at most {MAX_DAYS} days")
    today = now.astimezone(tzinfo).date()
    if start > today:
        raise BadRange(f"the range starts after today ({today})")
    step = progress or (lambda _name: None)
    period = _Period(start, end, tzinfo, now)
    with engine.connect() as connection:
        query = _Query(connection, site, include_bots)
        if site is not None and not query.site_exists():
            raise UnknownSite(f"no hits were ever recorded for site {site!r}")

        hours = query.hours(period.load_start, period.utc_end)
        first_hour = query.first_hour()
        step("hours")
        visitors = query.visitors(period)
        step("visitors")
        top_visitors = query.top_visitors(period)
        step("top visitors")
        paths = query.top_paths(period)
        step("paths")
        referrers = query.referrers(period)
        step("referrers")
        agents = query.agents(period)
        step("agents")
        views = query.path_views(period, [p for p, _hits in paths])
        step("affinity")

    counted = hours["hits"] + (hours["bot_hits"] if include_bots else 0)
    in_range = (hours.index >= period.utc_start) & (hours.index < period.utc_end)
    judged = baseline.evaluate(
        hours["hits"],
        period.utc_start,
        period.baseline_end,
        first_hour=first_hour,
        margin=margin,
    )
    hits_total = int(counted[in_range].sum())
    bot_hits = int(hours["bot_hits"][in_range].sum())
    human_hits = int(hours["hits"][in_range].sum())
    anomalies = _anomalies(judged, tzinfo)
    visitors_total = visitors["range"]

    return {
        "site": site,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "timezone": tz,
        "include_bots": include_bots,
        "summary": {
            "hits": hits_total,
            "visitors": visitors_total,
            "hits_per_visitor": _ratio(hits_total, visitors_total),
            "bot_hits": bot_hits,
            "bot_share": _ratio(bot_hits, human_hits + bot_hits),
            "peak_hour": _peak_hour(counted[in_range], tzinfo),
            "anomalies": len(anomalies),
        },
        "daily": _daily(counted[in_range], visitors["daily"], period, tzinfo),
        "monthly": _monthly(counted, visitors["monthly"], period, tzinfo),
        "hourly": _hourly(judged, tzinfo),
        "anomalies": anomalies,
        "heatmap": _heatmap(counted[in_range], tzinfo),
        "top_visitors": [
            {"visitor": ip_hash.hex()[:8], "hits": n, "share": _ratio(n, visitors["range_hits"])}
            for ip_hash, n in top_visitors
        ],
        "top_paths": [
            {"path": path, "hits": n, "visitors": views.visitors.get(path, 0)} for path, n in paths
        ],
        "referrers": _referrer_hosts(referrers),
        **_agents(agents),
        "affinity": views.affinity(visitors["visitor_days"]),
    }


class _Period:
    """The range in each of the clocks the figures need."""

    def __init__(self, start: date, end: date, tz: ZoneInfo, now: datetime) -> None:
        self.start, self.end = start, end
        # Local midnights, as UTC instants: exact hits per local day.
        self.utc_start = _local_midnight(start, tz)
        self.utc_end = _local_midnight(end + timedelta(days=1), tz)
        # The UTC days of the same dates: what the per-day aggregates can tell.
        self.day_start = datetime.combine(start, time(), UTC)
        self.day_end = datetime.combine(end + timedelta(days=1), time(), UTC)
        # Months: the range's, MONTHS_BEFORE before them, and one more for their growth.
        self.first_month = _add_months(start.replace(day=1), -MONTHS_BEFORE - 1)
        self.after_last_month = _add_months(end.replace(day=1), 1)
        self.load_start = min(
            _local_midnight(self.first_month, tz), self.utc_start - baseline.HISTORY
        )
        complete = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        self.baseline_end = max(self.utc_start, min(self.utc_end, complete))

    @property
    def whole_months(self) -> bool:
        return self.start.day == 1 and (self.end + timedelta(days=1)).day == 1


def _local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, time(), tz).astimezone(UTC)


# -- SQL -------------------------------------------------------------------------------------


class _Query:
    """The queries behind the figures, for one site (or all) on one connection."""

    def __init__(self, connection: Connection, site: str | None, include_bots: bool) -> None:
        self.connection = connection
        self.site = site
        self.include_bots = include_bots

    def _where(self, table: sa.Table, start: datetime, end: datetime) -> list[Any]:
        where = [table.c.bucket >= start, table.c.bucket < end]
        if self.site is not None:
            where.append(table.c.site == self.site)
        return where

    def _counted(self, table: sa.Table) -> Any:
        """The hits a figure counts: human, or human and bot."""
        return table.c.hits + table.c.bot_hits if self.include_bots else table.c.hits

    def _sum(self, expression: Any) -> Any:
        # sum(bigint) is numeric on PostgreSQL: back to an integer.
        return sa.cast(sa.func.sum(expression), sa.BigInteger)

    def site_exists(self) -> bool:
        monthly = relation("site_monthly")
        query = sa.select(sa.literal(1)).where(monthly.c.site == self.site).limit(1)
        return self.connection.execute(query).first() is not None

    def first_hour(self) -> datetime | None:
        hourly = relation("site_hourly")
        query = sa.select(sa.func.min(hourly.c.bucket))
        if self.site is not None:
            query = query.where(hourly.c.site == self.site)
        first: datetime | None = self.connection.execute(query).scalar()
        return first

    def hours(self, start: datetime, end: datetime) -> pd.DataFrame:
        """Human and bot hits of every UTC hour in [start, end), zeros included."""
        hourly = relation("site_hourly")
        query = (
            sa.select(hourly.c.bucket, self._sum(hourly.c.hits), self._sum(hourly.c.bot_hits))
            .where(*self._where(hourly, start, end))
            .group_by(hourly.c.bucket)
        )
        rows = self.connection.execute(query).all()
        span = pd.date_range(start, end, freq="h", inclusive="left", tz="UTC")
        if not rows:
            return pd.DataFrame({"hits": 0, "bot_hits": 0}, index=span, dtype="int64")
        frame = pd.DataFrame(
            [(h, b) for _bucket, h, b in rows],
            columns=["hits", "bot_hits"],
            index=pd.DatetimeIndex([bucket for bucket, _h, _b in rows]),
            dtype="int64",
        )
        frame.index = frame.index.tz_convert("UTC")
        return frame.reindex(span, fill_value=0)

    def visitors(self, period: _Period) -> dict[str, Any]:
        """Unique visitors per UTC day and month, of the whole range, and the
        hits and visitor-days behind them."""
        if self.site is not None and not self.include_bots:
            # Counted when the aggregate was built: nothing to count here.
            daily = self._per_bucket_visitors(
                relation("site_daily"), period.day_start, period.day_end
            )
            monthly = self._per_bucket_visitors(
                relation("site_monthly"), _utc(period.first_month), _utc(period.after_last_month)
            )
        else:
            daily = self._distinct_visitors(
                relation("visitors_daily"), period.day_start, period.day_end
            )
            monthly = self._distinct_visitors(
                relation("visitors_monthly"),
                _utc(period.first_month),
                _utc(period.after_last_month),
            )
        table = self._visitor_relation(period)
        active = self._active(table)
        count, hits = self.connection.execute(
            sa.select(
                sa.func.count(sa.distinct(table.c.ip_hash)), self._sum(self._counted(table))
            ).where(*self._where(table, period.day_start, period.day_end), active)
        ).one()
        if self.site is not None and not self.include_bots:
            # A visitor-day is a visitor with hits on a site and UTC day: one
            # site's human ones are its daily visitors, added up (counting the
            # month's visitors_daily rows instead takes about a second at 10M hits).
            visitor_days = sum(daily.values())
        else:
            days_table = relation("visitors_daily")
            visitor_days = self.connection.execute(
                sa.select(sa.func.count()).where(
                    *self._where(days_table, period.day_start, period.day_end),
                    self._active(days_table),
                )
            ).scalar_one()
        return {
            "daily": daily,
            "monthly": monthly,
            "range": int(count),
            "range_hits": int(hits or 0),
            "visitor_days": int(visitor_days),
        }

    def _per_bucket_visitors(
        self, table: sa.Table, start: datetime, end: datetime
    ) -> dict[datetime, int]:
        query = (
            sa.select(table.c.bucket, self._sum(table.c.visitors))
            .where(*self._where(table, start, end))
            .group_by(table.c.bucket)
        )
        return {bucket: int(n) for bucket, n in self.connection.execute(query)}

    def _distinct_visitors(
        self, table: sa.Table, start: datetime, end: datetime
    ) -> dict[datetime, int]:
        query = (
            sa.select(table.c.bucket, sa.func.count(sa.distinct(table.c.ip_hash)))
            .where(*self._where(table, start, end), self._active(table))
            .group_by(table.c.bucket)
        )
        return {bucket: int(n) for bucket, n in self.connection.execute(query)}

    def _active(self, table: sa.Table) -> Any:
        """A visitor row that counts: one with hits (human, or any with bots)."""
        return self._counted(table) > 0

    def _visitor_relation(self, period: _Period) -> sa.Table:
        # One row per visitor and month reads far fewer rows than one per day.
        return relation("visitors_monthly" if period.whole_months else "visitors_daily")

    def top_visitors(self, period: _Period) -> list[tuple[bytes, int]]:
        table = self._visitor_relation(period)
        hits = self._sum(self._counted(table)).label("n")
        query = (
            sa.select(table.c.ip_hash, hits)
            .where(*self._where(table, period.day_start, period.day_end), self._active(table))
            .group_by(table.c.ip_hash)
            .order_by(hits.desc(), table.c.ip_hash)
            .limit(TOP_VISITORS)
        )
        return [(bytes(ip), int(n)) for ip, n in self.connection.execute(query)]

    def top_paths(self, period: _Period) -> list[tuple[str, int]]:
        rows = self._totals(relation("paths_daily"), ("path",), period, limit=TOP_PATHS)
        return [(path, n) for (path,), n in rows]

    def referrers(self, period: _Period) -> list[tuple[str | None, int]]:
        rows = self._totals(relation("referrers_daily"), ("referrer",), period)
        return [(referrer, n) for (referrer,), n in rows]

    def agents(self, period: _Period) -> list[tuple[tuple[str | None, ...], int]]:
        return self._totals(relation("agents_daily"), ("browser", "os", "device"), period)

    def _totals(
        self, table: sa.Table, columns: Sequence[str], period: _Period, limit: int | None = None
    ) -> list[tuple[tuple[Any, ...], int]]:
        """Hits per group over the range's days, most first (groups without hits left out)."""
        hits = self._sum(self._counted(table)).label("n")
        keys = [table.c[name] for name in columns]
        query = (
            sa.select(*keys, hits)
            .where(*self._where(table, period.day_start, period.day_end))
            .group_by(*keys)
            .having(hits > 0)
            .order_by(hits.desc(), *keys)
        )
        if limit is not None:
            query = query.limit(limit)
        return [(tuple(row[:-1]), int(row[-1])) for row in self.connection.execute(query)]

    def path_views(self, period: _Period, paths: list[str]) -> _PathViews:
        """Which of `paths` each visitor viewed on each UTC day, counted in the
        database: how many visitor-days viewed each combination of them, and
        how many distinct visitors viewed each.

        Affinity needs visitor x day x path, which no aggregate keeps (it would
        be nearly as big as raw hits), so this reads raw hits, but only those
        of the top paths, in one scan, and only counts come back. Each
        visitor-day's set of paths is a bit mask (path i is bit i), so pairing
        is a GROUP BY in the database and a loop over the few distinct masks
        here, instead of a self-join, which SQLite runs as a nested loop. The
        visitors of each path come from the same baskets (see _path_visitors).
        """
        if not paths:
            return _PathViews({}, {}, {})
        backend = backend_of(self.connection)
        conditions = ["ts >= :start", "ts < :end", "path IN :paths"]
        if self.site is not None:
            conditions.append("site = :site")
        if not self.include_bots:
            conditions.append("NOT is_bot")
        cases = " ".join(f"WHEN :path_{i} THEN {1 << i}" for i in range(len(paths)))
        bit = f"CASE path {cases} END"
        statement = sa.text(
            f"WITH baskets AS MATERIALIZED ("
            f"SELECT ip_hash, {_OR_OF_BITS[backend].format(bit)} AS mask FROM hits "
            f"WHERE {' AND '.join(conditions)} "
            f"GROUP BY site, ip_hash, {_DAY_KEY[backend]}) "
            f"SELECT 0, mask, count(*) FROM baskets GROUP BY mask "
            f"UNION ALL {_path_visitors(backend, len(paths))}"
        ).bindparams(
            sa.bindparam("start", type_=UTCDateTime()),
            sa.bindparam("end", type_=UTCDateTime()),
            sa.bindparam("paths", expanding=True),
        )
        params: dict[str, Any] = {"start": period.day_start, "end": period.day_end, "paths": paths}
        if self.site is not None:
            params["site"] = self.site
        params.update({f"path_{i}": path for i, path in enumerate(paths)})

        days = dict.fromkeys(paths, 0)
        visitors: dict[str, int] = {}
        pairs: dict[tuple[str, str], int] = {}
        for kind, mask, count in self.connection.execute(statement, params):
            viewed = [path for i, path in enumerate(paths) if int(mask) >> i & 1]
            if kind == 1:  # `count` visitors, each counted for every path in `mask`
                for path in viewed:
                    visitors[path] = visitors.get(path, 0) + count
                continue
            for a_index, a in enumerate(viewed):
                days[a] += count
                for b in viewed[a_index + 1 :]:
                    # Ordered here, not by a database collation: the same on every backend.
                    pair = (a, b) if a < b else (b, a)
                    pairs[pair] = pairs.get(pair, 0) + count
        return _PathViews(days, visitors, pairs)


# How path_views ORs the bits of a visitor-day's hits, per backend. PostgreSQL's
# bit_or is a plain aggregate, which parallel workers compute in parts; a
# DISTINCT aggregate cannot be split and sorts its input (measured: README,
# Benchmarks). SQLite has no bit_or, but a sum of distinct single bits is their OR.
_OR_OF_BITS: dict[Backend, str] = {
    Backend.SQLITE: "sum(DISTINCT {})",
    Backend.POSTGRESQL: "bit_or({})",
    Backend.TIMESCALEDB: "bit_or({})",
}


def _path_visitors(backend: Backend, bits: int) -> str:
    """Rows (1, mask, visitors) from path_views' baskets: each visitor of a path
    is counted once in a row whose mask has the path's bit.

    PostgreSQL: one row per visitor mask, the OR of each visitor's baskets (hash
    aggregates only). SQLite: one row per path, its count(DISTINCT ip_hash); ORing
    masks there takes a max() per bit, which measured slower at 10M hits.
    """
    if backend is Backend.SQLITE:
        values = ", ".join(f"({1 << i})" for i in range(bits))
        return (
            f"SELECT 1, bits.column1, count(DISTINCT ip_hash) FROM baskets "
            f"JOIN (VALUES {values}) AS bits ON (mask & bits.column1) <> 0 GROUP BY bits.column1"
        )
    return (
        "SELECT 1, mask, count(*) FROM ("
        "SELECT bit_or(mask) AS mask FROM baskets GROUP BY ip_hash"
        ") AS visitors GROUP BY mask"
    )


# The UTC day of a hit, only to group by: SQLite's is the date part of the
# stored text, without the bucket's time suffix that BUCKET_SQL appends.
_DAY_KEY: dict[Backend, str] = {
    Backend.SQLITE: "substr(ts, 1, 10)",
    Backend.POSTGRESQL: BUCKET_SQL[Backend.POSTGRESQL][Bucket.DAY],
    Backend.TIMESCALEDB: BUCKET_SQL[Backend.TIMESCALEDB][Bucket.DAY],
}


class _PathViews:
    def __init__(
        self, days: dict[str, int], visitors: dict[str, int], pairs: dict[tuple[str, str], int]
    ) -> None:
        self.days = days  # visitor-days with the path
        self.visitors = visitors  # distinct visitors of the path over the range
        self.pairs = pairs  # visitor-days with both paths

    def affinity(self, visitor_days: int) -> list[dict[str, Any]]:
        """Pairs of paths viewed by the same visitor on the same day.

        A visitor-day is one visitor's views of one site on one UTC day (the
        "basket"). support = the share of all visitor-days with both paths;
        lift = support / (support(a) * support(b)): 1 when the two paths are
        viewed together as often as chance would have it, above 1 when more.
        """
        if not visitor_days:
            return []
        found: list[dict[str, Any]] = []
        for (a, b), together in self.pairs.items():
            lift = together * visitor_days / (self.days[a] * self.days[b])
            found.append(
                {
                    "a": a,
                    "b": b,
                    "visitors": together,
                    "support": together / visitor_days,
                    "lift": lift,
                }
            )
        found.sort(key=lambda pair: (-pair["visitors"], -pair["lift"], pair["a"], pair["b"]))
        return found[:TOP_PAIRS]


def _utc(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


# -- shaping ---------------------------------------------------------------------------------


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _local_hour(ts: pd.Timestamp, tz: ZoneInfo) -> str:
    return ts.tz_convert(tz).isoformat()


def _daily(
    hits: pd.Series, visitors: dict[datetime, int], period: _Period, tz: ZoneInfo
) -> list[dict[str, Any]]:
    per_day = hits.groupby(hits.index.tz_convert(tz).date).sum()
    days = []
    day = period.start
    while day <= period.end:
        n = int(per_day.get(day, 0))
        v = visitors.get(_utc(day), 0)
        days.append(
            {"date": day.isoformat(), "hits": n, "visitors": v, "hits_per_visitor": _ratio(n, v)}
        )
        day += timedelta(days=1)
    return days


def _monthly(
    hits: pd.Series, visitors: dict[datetime, int], period: _Period, tz: ZoneInfo
) -> list[dict[str, Any]]:
    local = hits.index.tz_convert(tz)
    per_month = hits.groupby([local.year, local.month]).sum()
    months: list[dict[str, Any]] = []
    month = period.first_month
    while month < period.after_last_month:
        n = int(per_month.get((month.year, month.month), 0))
        v = visitors.get(_utc(month), 0)
        months.append({"month": month.strftime("%Y-%m"), "hits": n, "visitors": v})
        month = _add_months(month, 1)
    shown = []
    for previous, current in itertools.pairwise(months):
        shown.append(
            {
                **current,
                "hits_per_visitor": _ratio(current["hits"], current["visitors"]),
                "hits_growth": _growth(previous["hits"], current["hits"]),
                "visitors_growth": _growth(previous["visitors"], current["visitors"]),
            }
        )
    return shown


def _growth(previous: int, current: int) -> float | None:
    return (current - previous) / previous if previous else None


def _hourly(judged: pd.DataFrame, tz: ZoneInfo) -> list[dict[str, Any]]:
    return [
        {
            "hour": _local_hour(ts, tz),
            "hits": int(row.hits),
            "median": _number(row.median),
            "low": _number(row.low),
            "high": _number(row.high),
            # pandas may hold "no anomaly" as NaN rather than None.
            "anomaly": row.anomaly if isinstance(row.anomaly, str) else None,
            "score": _number(row.score),
        }
        for ts, row in zip(judged.index, judged.itertuples(index=False), strict=True)
    ]


def _anomalies(judged: pd.DataFrame, tz: ZoneInfo) -> list[dict[str, Any]]:
    flagged = judged[judged["anomaly"].notna()]
    return [
        {
            "hour": _local_hour(ts, tz),
            "hits": int(row.hits),
            "median": float(row.median),
            "low": float(row.low),
            "high": float(row.high),
            "direction": row.anomaly,
            "score": float(row.score),
        }
        for ts, row in zip(flagged.index, flagged.itertuples(index=False), strict=True)
    ]


def _heatmap(hits: pd.Series, tz: ZoneInfo) -> dict[str, Any]:
    local = hits.index.tz_convert(tz)
    matrix = [[0] * 24 for _ in WEEKDAYS]
    grouped = hits.groupby([local.day_of_week, local.hour]).sum()
    for (weekday, hour), n in grouped.items():
        matrix[weekday][hour] = int(n)
    return {"weekdays": list(WEEKDAYS), "hours": list(range(24)), "hits": matrix}


def _peak_hour(hits: pd.Series, tz: ZoneInfo) -> int | None:
    """The hour of day that is most often the day's busiest (ties: the earlier)."""
    local = hits.index.tz_convert(tz)
    frame = pd.DataFrame({"hits": hits.to_numpy(), "day": local.date, "hour": local.hour})
    frame = frame[frame["hits"] > 0]
    if frame.empty:
        return None
    # Per day the first of its busiest hours, then the most frequent of those.
    busiest = frame.sort_values(["day", "hits", "hour"], ascending=[True, False, True])
    per_day = busiest.drop_duplicates("day")["hour"]
    counts = per_day.value_counts()
    return int(min(h for h, n in counts.items() if n == counts.max()))


def _referrer_hosts(referrers: list[tuple[str | None, int]]) -> list[dict[str, Any]]:
    hosts: dict[str, int] = {}
    for referrer, n in referrers:
        host = (urlsplit(referrer).hostname or referrer) if referrer else DIRECT
        hosts[host] = hosts.get(host, 0) + n
    ranked = sorted(hosts.items(), key=lambda item: (-item[1], item[0]))
    return [{"host": host, "hits": n} for host, n in ranked[:TOP_REFERRERS]]


def _agents(agents: list[tuple[tuple[str | None, ...], int]]) -> dict[str, list[dict[str, Any]]]:
    result = {}
    for position, key in enumerate(("browsers", "os", "devices")):
        totals: dict[str, int] = {}
        for names, n in agents:
            name = names[position] or UNKNOWN
            totals[name] = totals.get(name, 0) + n
        ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
        result[key] = [{"name": name, "hits": n} for name, n in ranked]
    return result
