"""Writes Grafana's provisioning: datasources, the dashboard provider, four
dashboards and the alert rules with their contact point and policy.

    .venv/bin/python -m grafana.build     # rewrites grafana/provisioning and grafana/dashboards

Everything Grafana reads is generated here, so the anomaly band is written once
(`baseline_sql`, with the constants of analytics.baseline) and the panels and the
alert cannot disagree. tests/test_grafana.py checks the committed files are
what this writes, validates them, and runs every query on PostgreSQL and
TimescaleDB.

SQL conventions (every query here follows them):
- Panels read the aggregates (db/aggregates.py), never raw `hits`, except the
  ingestion-stopped alert, which needs the last minutes.
- Time arithmetic is in hours, never days or months on a timestamptz: those
  follow the session's time zone (a "7 days" step across a DST change is 167
  or 169 hours). Calendar months are computed on UTC timestamps.
- A daily (monthly) bucket belongs to a range when it overlaps it, so a range
  of "last 6 hours" still shows today.
- Alert queries use fixed widths and `$__timeTo()` as "now" (in alerts
  `$__interval` is one second); `$__timeTo()` also makes them testable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from analytics.baseline import (
    DEFAULT_MARGIN,
    HIGH_Q,
    LOW_Q,
    MIN_MEDIAN,
    MIN_POOL_DAYS,
    POOL_DAYS,
    WEEKS,
)

ROOT = Path(__file__).resolve().parent
PROVISIONING = ROOT / "provisioning"
DASHBOARDS = ROOT / "dashboards"

# The classic dashboard model of the current Grafana release (13.x: 42).
SCHEMA_VERSION = 42
FOLDER = "Telemetry"
FOLDER_UID = "telemetry"
# Where docker-compose.yml mounts grafana/dashboards inside the Grafana container.
DASHBOARDS_IN_CONTAINER = "/var/lib/grafana-dashboards"

POSTGRES = {"type": "grafana-postgresql-datasource", "uid": "telemetry-timescaledb"}
PROMETHEUS = {"type": "prometheus", "uid": "telemetry-prometheus"}
WEBHOOK = "telemetry-webhook"

# Ingestion stopped: no human hit for this long on a site that usually gets at
# least STOPPED_MIN_USUAL hits in that time (Poisson: P(0 | 10) = 0.005%).
STOPPED_MINUTES = 30
STOPPED_MIN_USUAL = 10
# Ingestion errors: share of events refused or dropped over 5 minutes.
ERROR_SHARE = 0.05
# Consecutive one-minute evaluations an alert condition must hold before it fires.
ANOMALY_EVALUATIONS = 3

HOUR = "interval '1 hour'"
WEEK = "interval '168 hours'"
DAY = "interval '24 hours'"
HISTORY = f"interval '{WEEKS * 168} hours'"  # what an hour's median looks back over
POOL = f"interval '{POOL_DAYS * 24} hours'"
EVALUATION_DELAY = f"interval '{WEEKS * 168 + MIN_POOL_DAYS * 24} hours'"
SITE = "site = '$site'"


# -- SQL ------------------------------------------------------------------------------------


def overlapping(width_hours: int) -> str:
    """Buckets of `width_hours` that overlap the dashboard's time range."""
    return (
        f"bucket > $__timeFrom()::timestamptz - interval '{width_hours} hours' "
        f"AND bucket <= $__timeTo()::timestamptz"
    )


def months_overlapping() -> str:
    """Month buckets that overlap the time range (months differ in length)."""
    return (
        "bucket > (date_trunc('month', $__timeFrom()::timestamptz AT TIME ZONE 'UTC') "
        "- interval '1 month') AT TIME ZONE 'UTC' AND bucket <= $__timeTo()::timestamptz"
    )


def utc_hour(moment: str) -> str:
    return f"date_trunc('hour', {moment}, 'UTC')"


def baseline_sql(sites: str, first_hour: str, last_hour: str, complete_before: str) -> str:
    """The anomaly baseline of analytics/baseline.py in SQL: one row per site and
    UTC hour from `first_hour` to `last_hour` (SQL timestamptz expressions, both
    hour starts) with `evaluated` (false until the site's first site_hourly row
    is more than WEEKS weeks + MIN_POOL_DAYS days before the hour's UTC day),
    hits, median, low, high, spread (NULL unless evaluated), direction
    ('spike', 'drop' or NULL) and score (band widths beyond the band). Only hours
    ending by `complete_before` can be anomalies. `sites` filters site_hourly.

    `series` reads the rows needed once, as a dense hourly series per site, and
    takes each hour's WEEKS samples with lag() (a join into site_hourly per hour
    and week made the planner compare every pair of rows: seconds on a month);
    `medians` covers the range and the POOL_DAYS days before its first UTC day;
    `pools` takes the percentiles of the deviations once per UTC day
    (percentile_cont is no window function)."""
    medians_from = f"date_trunc('day', {first_hour}, 'UTC') - {POOL}"
    series_from = f"{medians_from} - {HISTORY}"
    samples = ", ".join(f"lag(hits, {168 * week}) OVER past" for week in range(1, WEEKS + 1))
    return f"""WITH sites AS (
  SELECT site, min(bucket) AS first_bucket FROM site_hourly WHERE {sites} GROUP BY site
),
hourly AS (
  SELECT site, bucket, hits FROM site_hourly
  WHERE {sites} AND bucket >= {series_from} AND bucket <= {last_hour}
),
series AS (
  SELECT s.site, s.first_bucket, hour, coalesce(h.hits, 0) AS hits
  FROM sites s
  CROSS JOIN generate_series({series_from}, {last_hour}, {HOUR}) AS hour
  LEFT JOIN hourly h ON h.site = s.site AND h.bucket = hour
),
samples AS (
  SELECT site, first_bucket, hour, hits, ARRAY[{samples}] AS past_weeks
  FROM series
  WINDOW past AS (PARTITION BY site ORDER BY hour)
),
medians AS (
  SELECT site, first_bucket, hour, hits,
    (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY sample) FROM unnest(past_weeks) AS sample)
      AS median
  FROM samples WHERE hour >= {medians_from}
),
deviations AS (
  SELECT site, hour, (hits - median) / sqrt(median + 1) AS deviation
  FROM medians WHERE first_bucket < hour - {HISTORY}
),
pools AS (
  SELECT s.site, day,
    percentile_cont({LOW_Q}) WITHIN GROUP (ORDER BY d.deviation) AS low_q,
    percentile_cont({HIGH_Q}) WITHIN GROUP (ORDER BY d.deviation) AS high_q
  FROM sites s
  CROSS JOIN generate_series(
    date_trunc('day', {first_hour}, 'UTC'), {last_hour}, {DAY}) AS day
  JOIN deviations d ON d.site = s.site AND d.hour >= day - {POOL} AND d.hour < day
  WHERE s.first_bucket < day - {EVALUATION_DELAY}
  GROUP BY s.site, day
),
band AS (
  SELECT m.site, m.hour, p.site IS NOT NULL AS evaluated, m.hits,
    CASE WHEN p.site IS NOT NULL THEN m.median END AS median,
    CASE WHEN p.site IS NOT NULL THEN greatest(m.median + p.low_q * sqrt(m.median + 1), 0)
    END AS low,
    m.median + p.high_q * sqrt(m.median + 1) AS high
  FROM medians m
  LEFT JOIN pools p ON p.site = m.site AND p.day = date_trunc('day', m.hour, 'UTC')
  WHERE m.hour >= {first_hour}
),
judged AS (
  SELECT site, hour, evaluated, hits, median, low, high,
    greatest(high - low, sqrt(median + 1)) AS spread,
    evaluated AND median >= {MIN_MEDIAN} AND hour + {HOUR} <= {complete_before} AS judged
  FROM band
)
SELECT site, hour, evaluated, hits, median, low, high, spread,
  CASE WHEN judged AND hits > high + {DEFAULT_MARGIN} * spread THEN 'spike'
       WHEN judged AND hits < low - {DEFAULT_MARGIN} * spread THEN 'drop' END AS direction,
  CASE WHEN judged AND hits > high + {DEFAULT_MARGIN} * spread THEN (hits - high) / spread
       WHEN judged AND hits < low - {DEFAULT_MARGIN} * spread THEN (low - hits) / spread
  END AS score
FROM judged"""


def baseline_in_range() -> str:
    """The band of every hour of the dashboard's range for the chosen site."""
    return baseline_sql(
        SITE,
        utc_hour("$__timeFrom()::timestamptz"),
        utc_hour("$__timeTo()::timestamptz"),
        utc_hour("now()"),
    )


def last_complete_hour_baseline() -> str:
    """The band of the last complete hour (relative to the evaluation) of every site."""
    last = f"{utc_hour('$__timeTo()::timestamptz')} - {HOUR}"
    return baseline_sql("TRUE", last, last, utc_hour("$__timeTo()::timestamptz"))


# -- panels ---------------------------------------------------------------------------------


def sql_target(sql: str, fmt: str = "table", ref: str = "A") -> dict[str, Any]:
    return {
        "refId": ref,
        "datasource": POSTGRES,
        "editorMode": "code",
        "format": fmt,
        "rawQuery": True,
        "rawSql": sql,
    }


def prom_target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {
        "refId": ref,
        "datasource": PROMETHEUS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": True,
    }


def panel(
    kind: str,
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    width: int,
    height: int,
    unit: str | None = None,
    options: dict[str, Any] | None = None,
    custom: dict[str, Any] | None = None,
    overrides: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A panel without id and position (`dashboard` assigns them). `width` and
    `height` are grid units (24 columns)."""
    defaults: dict[str, Any] = {}
    if unit:
        defaults["unit"] = unit
    if custom:
        defaults["custom"] = custom
    datasource = targets[0]["datasource"]
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": datasource,
        "gridPos": {"h": height, "w": width, "x": 0, "y": 0},
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": options or {},
        **extra,
    }


def stat(title: str, description: str, sql: str, unit: str = "short", width: int = 6) -> dict:
    return panel(
        "stat",
        title,
        description,
        [sql_target(sql)],
        width=width,
        height=4,
        unit=unit,
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "none",
            "graphMode": "none",
            "textMode": "value_and_name",
        },
    )


def timeseries(title: str, description: str, targets: list[dict], **kwargs: Any) -> dict:
    kwargs.setdefault("custom", {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10})
    kwargs.setdefault("options", {"legend": {"displayMode": "list", "placement": "bottom"}})
    return panel("timeseries", title, description, targets, **kwargs)


def table(title: str, description: str, sql: str, width: int, height: int, **kwargs: Any) -> dict:
    targets = [sql_target(sql)]
    return panel("table", title, description, targets, width=width, height=height, **kwargs)


def pie(title: str, description: str, sql: str, width: int, height: int = 9) -> dict:
    return panel(
        "piechart",
        title,
        description,
        [sql_target(sql)],
        width=width,
        height=height,
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": True},
            "pieType": "pie",
            "legend": {"displayMode": "table", "placement": "right", "values": ["value"]},
        },
    )


def by_name(name: str, **properties: Any) -> dict[str, Any]:
    """A field override for the column `name`."""
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": key.replace("__", "."), "value": v} for key, v in properties.items()],
    }


# The band drawn around the hits: low and high dashed, the area between filled.
BAND_OVERRIDES = [
    by_name("high", custom__fillBelowTo="low", custom__lineStyle={"fill": "dash", "dash": [4, 4]},
            color={"mode": "fixed", "fixedColor": "green"}),
    by_name("low", custom__lineStyle={"fill": "dash", "dash": [4, 4]},
            color={"mode": "fixed", "fixedColor": "green"}),
    by_name("median", custom__lineStyle={"fill": "dot", "dash": [0, 6]},
            color={"mode": "fixed", "fixedColor": "dark-green"}),
    by_name("hits", custom__lineWidth=2, color={"mode": "fixed", "fixedColor": "blue"},
            custom__fillOpacity=0),
]  # fmt: skip


def site_variable() -> dict[str, Any]:
    return {
        "type": "query",
        "name": "site",
        "label": "Site",
        "datasource": POSTGRES,
        "query": (
            f"SELECT site FROM site_daily WHERE {overlapping(24)} GROUP BY site ORDER BY site"
        ),
        "refresh": 2,
        "sort": 0,
        "multi": False,
        "includeAll": False,
    }


def path_variable() -> dict[str, Any]:
    return {
        "type": "query",
        "name": "path",
        "label": "Path",
        "description": "The site's 100 most visited paths in the time range.",
        "datasource": POSTGRES,
        "query": (
            f"SELECT path FROM paths_daily WHERE {SITE} AND {overlapping(24)} "
            "GROUP BY path ORDER BY sum(hits) DESC LIMIT 100"
        ),
        "refresh": 2,
        "sort": 0,
        "multi": False,
        "includeAll": False,
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    rows: list[list[dict[str, Any]]],
    variables: list[dict[str, Any]],
    time_from: str = "now-7d",
) -> dict[str, Any]:
    """Lays `rows` out left to right, top to bottom, and numbers the panels."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row in rows:
        x = 0
        for item in row:
            grid = item["gridPos"]
            item["gridPos"] = {"h": grid["h"], "w": grid["w"], "x": x, "y": y}
            item["id"] = len(panels) + 1
            panels.append(item)
            x += grid["w"]
        y += max(item["gridPos"]["h"] for item in row)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["telemetry"],
        "timezone": "utc",
        "editable": False,
        "graphTooltip": 1,
        "time": {"from": time_from, "to": "now"},
        "refresh": "5m",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "links": [
            {
                "title": "Telemetry dashboards",
                "type": "dashboards",
                "icon": "external link",
                "tooltip": "",
                "tags": ["telemetry"],
                "asDropdown": True,
                "targetBlank": False,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "annotations": {"list": []},
        "templating": {"list": variables},
        "panels": panels,
    }


def traffic_overview() -> dict[str, Any]:
    today = baseline_sql(
        SITE,
        "date_trunc('day', $__timeTo()::timestamptz, 'UTC')",
        utc_hour("$__timeTo()::timestamptz"),
        utc_hour("now()"),
    )
    growth = """WITH last_month AS (
  SELECT (date_trunc('month', $__timeTo()::timestamptz AT TIME ZONE 'UTC') - interval '1 month')
    AT TIME ZONE 'UTC' AS month
),
months AS (
  SELECT sum(hits) FILTER (WHERE bucket = l.month) AS hits,
    sum(hits) FILTER (WHERE bucket < l.month) AS hits_before,
    sum(visitors) FILTER (WHERE bucket = l.month) AS visitors,
    sum(visitors) FILTER (WHERE bucket < l.month) AS visitors_before
  FROM site_monthly, last_month l
  WHERE site = '$site' AND bucket <= l.month
    AND bucket >= (l.month AT TIME ZONE 'UTC' - interval '1 month') AT TIME ZONE 'UTC'
)
SELECT (hits - hits_before)::float8 / nullif(hits_before, 0) AS "hits",
  (visitors - visitors_before)::float8 / nullif(visitors_before, 0) AS "visitors"
FROM months"""
    referrers = f"""WITH referrers AS (
  SELECT coalesce(substring(referrer FROM '^[a-zA-Z][a-zA-Z0-9+.-]*://([^/?#:]+)'), '(direct)')
    AS referrer, hits
  FROM referrers_daily WHERE {SITE} AND {overlapping(24)}
)
SELECT referrer, sum(hits) AS hits FROM referrers
WHERE referrer <> '$site' GROUP BY referrer HAVING sum(hits) > 0
ORDER BY hits DESC LIMIT 20"""
    rows = [
        [
            stat("Hits", "Human hits in the time range (bots left out), from site_hourly.",
                 f"SELECT sum(hits) AS hits FROM site_hourly WHERE {SITE} AND {overlapping(1)}"),
            stat("Unique visitors",
                 "Distinct visitors of the UTC days the range overlaps (visitors_daily). A "
                 "visitor's hash changes each month, so over a month boundary one person "
                 "counts once per month.",
                 f"SELECT count(DISTINCT ip_hash) AS visitors FROM visitors_daily "
                 f"WHERE {SITE} AND {overlapping(24)} AND hits > 0"),
            stat("Month-over-month growth",
                 "The last complete UTC month before the end of the range against the month "
                 "before it (site_monthly): +0.25 is 25% more.",
                 growth, unit="percentunit", width=12),
        ],
        [
            timeseries(
                "Hits per hour",
                "Human and bot hits per hour (site_hourly), summed to the panel's interval.",
                [sql_target(
                    "SELECT $__timeGroupAlias(bucket, $__interval), sum(hits) AS hits, "
                    f"sum(bot_hits) AS bot_hits FROM site_hourly WHERE {SITE} AND "
                    "$__timeFilter(bucket) GROUP BY 1 ORDER BY 1",
                    fmt="time_series",
                )],
                width=24, height=8, interval="1h", unit="short",
            ),
        ],
        [
            timeseries(
                "Unique visitors per day",
                "Exact distinct visitors and human hits of each UTC day (site_daily).",
                [sql_target(
                    f"SELECT bucket AS time, visitors, hits FROM site_daily WHERE {SITE} AND "
                    f"{overlapping(24)} ORDER BY 1",
                    fmt="time_series",
                )],
                width=12, height=8, interval="1d",
                custom={"drawStyle": "bars", "fillOpacity": 60, "lineWidth": 1},
            ),
            timeseries(
                "Today against the usual range",
                "Today's hits per UTC hour against their usual range: the median of the same "
                f"hour of the week in the previous {WEEKS} weeks, and the "
                f"{LOW_Q:.0%}-{HIGH_Q:.0%} percentile band of the previous {POOL_DAYS} days' "
                "deviations (the band of the Anomalies dashboard and the traffic-anomaly "
                "alert).",
                [sql_target(
                    f"SELECT hour AS time, hits, median, low, high FROM ({today}) AS band "
                    "ORDER BY 1",
                    fmt="time_series",
                )],
                width=12, height=8, timeFrom="now/d", overrides=BAND_OVERRIDES,
            ),
        ],
        [
            table("Top paths", "The 20 most visited paths in the range (paths_daily).",
                  f"SELECT path, sum(hits) AS hits FROM paths_daily WHERE {SITE} AND "
                  f"{overlapping(24)} GROUP BY path HAVING sum(hits) > 0 "
                  "ORDER BY hits DESC LIMIT 20",
                  width=12, height=10),
            table("Top referrers",
                  "Where visits came from, by host (referrers_daily); (direct) is no "
                  "referrer. Links between the site's own pages are left out.",
                  referrers, width=12, height=10),
        ],
        [
            timeseries(
                "Daily hits of $path",
                "Human hits and visitors of the path chosen above, per UTC day (paths_daily).",
                [sql_target(
                    f"SELECT bucket AS time, hits, visitors FROM paths_daily WHERE {SITE} "
                    f"AND path = '$path' AND {overlapping(24)} ORDER BY 1",
                    fmt="time_series",
                )],
                width=24, height=8, interval="1d",
            ),
        ],
    ]  # fmt: skip
    return dashboard(
        "telemetry-traffic",
        "Traffic overview",
        "Hits, visitors, growth, top paths and referrers of one site, from the aggregates.",
        rows,
        [site_variable(), path_variable()],
    )


def visitors() -> dict[str, Any]:
    weekdays = ", ".join(
        f"sum(s.hits) FILTER (WHERE extract(isodow FROM s.bucket AT TIME ZONE 'UTC') = {day})"
        f' AS "{name}"'
        for day, name in enumerate(("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"), start=1)
    )
    heatmap = (
        f"SELECT hours.hour, {weekdays}\n"
        "FROM generate_series(0, 23) AS hours(hour)\n"
        f"LEFT JOIN site_hourly s ON s.site = '$site' AND $__timeFilter(s.bucket)\n"
        "  AND extract(hour FROM s.bucket AT TIME ZONE 'UTC') = hours.hour\n"
        "GROUP BY hours.hour ORDER BY hours.hour"
    )
    top_visitors = (
        "SELECT encode(substring(ip_hash FROM 1 FOR 4), 'hex') AS visitor, sum(hits) AS hits,\n"
        "  sum(hits)::float8 / sum(sum(hits)) OVER () AS share\n"
        f"FROM visitors_monthly WHERE {SITE} AND {months_overlapping()} AND hits > 0\n"
        "GROUP BY ip_hash ORDER BY hits DESC LIMIT 15"
    )
    top_visitors_pie = (
        "SELECT encode(substring(ip_hash FROM 1 FOR 4), 'hex') AS visitor, sum(hits) AS hits\n"
        f"FROM visitors_monthly WHERE {SITE} AND {months_overlapping()} AND hits > 0\n"
        "GROUP BY ip_hash ORDER BY hits DESC LIMIT 15"
    )

    def agents(column: str) -> str:
        return (
            f"SELECT coalesce({column}, '(unknown)') AS {column}, sum(hits) AS hits "
            f"FROM agents_daily WHERE {SITE} AND {overlapping(24)} "
            f"GROUP BY 1 HAVING sum(hits) > 0 ORDER BY hits DESC LIMIT 10"
        )

    rows = [
        [
            stat("Bot share", "Share of all hits made by bots (site_daily).",
                 "SELECT sum(bot_hits)::float8 / nullif(sum(hits) + sum(bot_hits), 0) "
                 f"AS bot_share FROM site_daily WHERE {SITE} AND {overlapping(24)}",
                 unit="percentunit"),
            stat("Hits per visitor",
                 "Human hits per distinct visitor over the UTC days the range overlaps.",
                 "SELECT sum(hits)::float8 / nullif(count(DISTINCT ip_hash), 0) AS "
                 f"hits_per_visitor FROM visitors_daily WHERE {SITE} AND "
                 f"{overlapping(24)} AND hits > 0"),
            timeseries(
                "Bot share per day", "Share of each UTC day's hits made by bots (site_daily).",
                [sql_target(
                    "SELECT bucket AS time, bot_hits::float8 / nullif(hits + bot_hits, 0) "
                    f"AS bot_share FROM site_daily WHERE {SITE} AND {overlapping(24)} "
                    "ORDER BY 1",
                    fmt="time_series",
                )],
                width=12, height=4, unit="percentunit", interval="1d",
            ),
        ],
        [
            table(
                "Hour x weekday",
                "Human hits per UTC hour of the day (rows) and weekday (columns) in the "
                "range (site_hourly): when the site is visited.",
                heatmap, width=24, height=13,
                custom={"cellOptions": {"type": "color-background"}},
                overrides=[by_name("hour", custom__cellOptions={"type": "auto"})],
                options={"showHeader": True, "cellHeight": "sm"},
            ),
        ],
        [
            table(
                "Top 15 visitors",
                "The visitors with the most hits in the months the range overlaps "
                "(visitors_monthly): the first 8 hex digits of the address hash, hits and "
                "share of all human hits. Hashes change every month.",
                top_visitors, width=12, height=10,
                overrides=[by_name("share", unit="percentunit")],
            ),
            pie("Top 15 visitors (share)", "The same visitors as parts of their hits.",
                top_visitors_pie, width=12, height=10),
        ],
        [
            pie("Browsers", "Human hits by browser (agents_daily).", agents("browser"), 8),
            pie("Operating systems", "Human hits by operating system (agents_daily).",
                agents("os"), 8),
            pie("Devices", "Human hits by device class (agents_daily).", agents("device"), 8),
        ],
    ]  # fmt: skip
    return dashboard(
        "telemetry-visitors",
        "Visitors",
        "When and how the site is visited: hour x weekday, top visitors, browsers, devices, bots.",
        rows,
        [site_variable()],
    )


def anomalies() -> dict[str, Any]:
    band = baseline_in_range()
    rows = [
        [
            timeseries(
                "Hits against the usual range",
                "Human hits per UTC hour (blue) against their usual range: the median "
                f"(dotted) of the same hour of the week in the previous {WEEKS} weeks, and a "
                "band (green) from the median by the "
                f"{LOW_Q:.0%} and {HIGH_Q:.0%} percentiles of how far every hour of the "
                f"previous {POOL_DAYS} days was from its own median (in units of "
                "sqrt(median + 1), learned once a UTC day). An hour is an anomaly when it is "
                f"more than {DEFAULT_MARGIN:g} x the band's width outside the band; hours "
                f"with a median under {MIN_MEDIAN:g} never are. No band before the site has "
                f"{WEEKS} weeks + {MIN_POOL_DAYS} days of history.",
                [sql_target(
                    f"SELECT hour AS time, hits, median, low, high FROM ({band}) AS band "
                    "ORDER BY 1",
                    fmt="time_series",
                )],
                width=24, height=10, overrides=BAND_OVERRIDES,
            ),
        ],
        [
            stat("Anomalies in range",
                 "Complete hours in the range outside the band: spikes and drops.",
                 "SELECT count(*) FILTER (WHERE direction = 'spike') AS spikes, "
                 "count(*) FILTER (WHERE direction = 'drop') AS drops "
                 f"FROM ({band}) AS band",
                 width=6),
            table(
                "Anomalous hours",
                "Every anomalous hour in the range, newest first; score is how many band "
                "widths beyond the band.",
                f"SELECT hour AS time, direction, hits, round(median::numeric, 1) AS median, "
                f"round(low::numeric, 1) AS low, round(high::numeric, 1) AS high, "
                f"round(score::numeric, 2) AS score FROM ({band}) AS band "
                "WHERE direction IS NOT NULL ORDER BY hour DESC",
                width=18, height=8,
            ),
        ],
    ]  # fmt: skip
    return dashboard(
        "telemetry-anomalies",
        "Anomalies",
        "Hourly traffic against its usual range for that hour of the week, and the hours "
        "outside it (the traffic-anomaly alert's definition).",
        rows,
        [site_variable()],
    )


RATE = "[$__rate_interval]"
REFUSED = 'telemetry_events_rejected_total{reason!="do_not_track"}'


def service_health() -> dict[str, Any]:
    commit_buckets = f"sum by (le) (rate(telemetry_commit_seconds_bucket{RATE}))"
    rows = [
        [
            timeseries(
                "Ingestion rate",
                "Events acknowledged (committed) and refused per second, all workers.",
                [
                    prom_target(f"sum(rate(telemetry_events_accepted_total{RATE}))", "accepted"),
                    prom_target(f"sum(rate({REFUSED}{RATE}))", "refused", ref="B"),
                ],
                width=12, height=8, unit="ops",
            ),
            timeseries(
                "Rejections by reason",
                "Events refused or dropped per second by reason (the error code of the "
                "answer; do_not_track: dropped on the visitor's request).",
                [prom_target(
                    f"sum by (reason) (rate(telemetry_events_rejected_total{RATE}))", "{{reason}}"
                )],
                width=12, height=8, unit="ops",
            ),
        ],
        [
            timeseries(
                "Commit latency",
                "Duration of one group commit (one transaction): median and 99th percentile.",
                [
                    prom_target(f"histogram_quantile(0.5, {commit_buckets})", "p50"),
                    prom_target(f"histogram_quantile(0.99, {commit_buckets})", "p99", ref="B"),
                ],
                width=12, height=8, unit="s",
            ),
            timeseries(
                "Rate-limited requests",
                "Requests answered 429 per second, by the limit they hit (client, site, "
                "reports), and requests whose limit storage was unreachable.",
                [
                    prom_target(
                        f"sum by (scope) (rate(telemetry_rate_limited_requests_total{RATE}))",
                        "{{scope}}",
                    ),
                    prom_target(
                        "sum by (outcome) "
                        f"(rate(telemetry_ratelimit_storage_errors_total{RATE}))",
                        "storage unreachable: {{outcome}}",
                        ref="B",
                    ),
                ],
                width=12, height=8, unit="reqps",
            ),
        ],
        [
            timeseries(
                "Answers by status",
                "HTTP answers per second by status code; database errors are the requests "
                "answered 503 because the database could not be written.",
                [
                    prom_target(
                        f"sum by (status) (rate(telemetry_http_requests_total{RATE}))",
                        "{{status}}",
                    ),
                    prom_target(
                        f"sum(rate(telemetry_database_errors_total{RATE}))",
                        "database errors",
                        ref="B",
                    ),
                ],
                width=12, height=8, unit="reqps",
            ),
            timeseries(
                "Rollup lag",
                "How far each aggregate is behind the newest raw hits: dashboards and "
                "alerts read the aggregates.",
                [prom_target("max by (rollup) (telemetry_rollup_lag_seconds)", "{{rollup}}")],
                width=12, height=8, unit="s",
            ),
        ],
    ]  # fmt: skip
    return dashboard(
        "telemetry-service",
        "Service health",
        "The ingestion service's own metrics, from Prometheus.",
        rows,
        [],
        time_from="now-6h",
    )


DASHBOARD_BUILDERS = {
    "traffic-overview.json": traffic_overview,
    "visitors.json": visitors,
    "anomalies.json": anomalies,
    "service-health.json": service_health,
}


# -- alerting -------------------------------------------------------------------------------


def sql_query(ref: str, sql: str) -> dict[str, Any]:
    return {
        "refId": ref,
        "relativeTimeRange": {"from": 600, "to": 0},
        "datasourceUid": POSTGRES["uid"],
        "model": {**sql_target(sql, ref=ref), "intervalMs": 1000, "maxDataPoints": 43200},
    }


def prom_query(ref: str, expr: str) -> dict[str, Any]:
    return {
        "refId": ref,
        "relativeTimeRange": {"from": 600, "to": 0},
        "datasourceUid": PROMETHEUS["uid"],
        "model": {
            "refId": ref,
            "datasource": PROMETHEUS,
            "expr": expr,
            "instant": True,
            "range": False,
            "intervalMs": 1000,
            "maxDataPoints": 43200,
        },
    }


def threshold(ref: str, on: str, kind: str, params: list[float]) -> dict[str, Any]:
    """A server-side threshold expression: `kind` is gt, lt, within_range or outside_range."""
    return {
        "refId": ref,
        "relativeTimeRange": {"from": 0, "to": 0},
        "datasourceUid": "__expr__",
        "model": {
            "refId": ref,
            "datasource": {"type": "__expr__", "uid": "__expr__"},
            "type": "threshold",
            "expression": on,
            "conditions": [{"evaluator": {"type": kind, "params": params}}],
        },
    }


def rule(
    uid: str,
    title: str,
    data: list[dict[str, Any]],
    condition: str,
    severity: str,
    summary: str,
    description: str,
    *,
    pending: str,
    no_data: str = "OK",
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "condition": condition,
        "data": data,
        "noDataState": no_data,
        "execErrState": "Error",
        "for": pending,
        "labels": {"severity": severity, "service": "telemetry"},
        "annotations": {"summary": summary, "description": description},
        "isPaused": False,
    }


def traffic_anomaly_rule() -> dict[str, Any]:
    band = last_complete_hour_baseline()
    evaluated = f"FROM ({band}) AS band WHERE evaluated"
    signed_score = "CASE direction WHEN 'spike' THEN score WHEN 'drop' THEN -score ELSE 0 END"
    return rule(
        "telemetry-traffic-anomaly",
        "Traffic anomaly",
        [
            sql_query("HITS", f"SELECT site, hits::float8 AS hits {evaluated}"),
            sql_query("LOW", f"SELECT site, low {evaluated}"),
            sql_query("HIGH", f"SELECT site, high {evaluated}"),
            sql_query("SCORE", f"SELECT site, {signed_score} AS score {evaluated}"),
            threshold("ANOMALY", "$SCORE", "outside_range", [0, 0]),
        ],
        "ANOMALY",
        "warning",
        "{{ $labels.site }}: a traffic {{ if gt $values.SCORE.Value 0.0 }}spike{{ else }}"
        "drop{{ end }} in the last complete hour",
        '{{ $labels.site }} had {{ printf "%.0f" $values.HITS.Value }} human hits in the '
        'last complete UTC hour; expected {{ printf "%.0f" $values.LOW.Value }} to '
        '{{ printf "%.0f" $values.HIGH.Value }} (the '
        f"usual range: the median of the same hour in the previous {WEEKS} weeks, "
        f"widened by the {LOW_Q:.0%}-{HIGH_Q:.0%} percentiles of the previous {POOL_DAYS} "
        f'days\' deviations). Score {{{{ printf "%.1f" $values.SCORE.Value }}}}: range '
        "widths beyond the range (negative: below it).",
        pending=f"{ANOMALY_EVALUATIONS - 1}m",
    )


def ingestion_stopped_rule() -> dict[str, Any]:
    now = "$__timeTo()::timestamptz"
    sql = f"""WITH usual AS (
  SELECT s.site,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY coalesce(past.hits, 0)) AS hits_per_hour
  FROM (
    SELECT site FROM site_hourly
    WHERE bucket >= {utc_hour(now)} - {HISTORY} AND bucket < {utc_hour(now)}
    GROUP BY site
  ) AS s
  CROSS JOIN generate_series(1, {WEEKS}) AS week
  LEFT JOIN site_hourly past ON past.site = s.site AND past.bucket = {utc_hour(now)} - week * {WEEK}
  GROUP BY s.site
)
SELECT u.site, (
  SELECT count(*) FROM hits h
  WHERE h.site = u.site AND NOT h.is_bot
    AND h.ts > {now} - interval '{STOPPED_MINUTES} minutes' AND h.ts <= {now}
) AS recent_hits
FROM usual u
WHERE u.hits_per_hour * {STOPPED_MINUTES} / 60.0 >= {STOPPED_MIN_USUAL}"""
    return rule(
        "telemetry-ingestion-stopped",
        "Ingestion stopped",
        [
            sql_query("RECENT", sql),
            threshold("STOPPED", "$RECENT", "lt", [1]),
        ],
        "STOPPED",
        "critical",
        "{{ $labels.site }}: no hits for " + str(STOPPED_MINUTES) + " minutes",
        f"No human hit from {{{{ $labels.site }}}} in the last {STOPPED_MINUTES} minutes, "
        f"though this hour of the week usually brings at least {STOPPED_MIN_USUAL} in that "
        "time (median of the previous weeks). Check the tracking snippet, /track and the "
        "Service health dashboard.",
        pending="5m",
    )


def ingestion_errors_rule() -> dict[str, Any]:
    refused = f"sum(rate({REFUSED}[5m]))"
    accepted = "sum(rate(telemetry_events_accepted_total[5m]))"
    share = f"({refused} or vector(0)) / clamp_min(({accepted} or vector(0)) + ({refused} or vector(0)), 1e-9)"  # noqa: E501
    return rule(
        "telemetry-ingestion-errors",
        "Ingestion errors",
        [
            prom_query("REFUSED_SHARE", share),
            threshold("ERRORS", "$REFUSED_SHARE", "gt", [ERROR_SHARE]),
        ],
        "ERRORS",
        "critical",
        "{{ humanizePercentage $values.REFUSED_SHARE.Value }} of events refused",
        "Over the last 5 minutes {{ humanizePercentage $values.REFUSED_SHARE.Value }} of the "
        f"events sent to /track were refused or dropped (more than {ERROR_SHARE:.0%}; "
        "do_not_track drops left out): bad input, rate limits or database errors. "
        "The Service health dashboard shows them by reason.",
        pending="5m",
    )


def alert_rules() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": "traffic",
                "folder": FOLDER,
                "interval": "1m",
                "rules": [traffic_anomaly_rule(), ingestion_stopped_rule()],
            },
            {
                "orgId": 1,
                "name": "service",
                "folder": FOLDER,
                "interval": "1m",
                "rules": [ingestion_errors_rule()],
            },
        ],
    }


def contact_points() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "contactPoints": [
            {
                "orgId": 1,
                "name": WEBHOOK,
                "receivers": [
                    {
                        "uid": WEBHOOK,
                        "type": "webhook",
                        "settings": {"url": "$TELEMETRY_ALERT_WEBHOOK_URL", "httpMethod": "POST"},
                        "disableResolveMessage": False,
                    }
                ],
            }
        ],
    }


def notification_policies() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "policies": [
            {
                "orgId": 1,
                "receiver": WEBHOOK,
                "group_by": ["grafana_folder", "alertname", "site"],
                "group_wait": "30s",
                "group_interval": "5m",
                "repeat_interval": "4h",
            }
        ],
    }


# -- datasources and the dashboard provider -------------------------------------------------


def datasources() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "TimescaleDB",
                "uid": POSTGRES["uid"],
                "type": POSTGRES["type"],
                "access": "proxy",
                "url": "$TELEMETRY_DB_HOST",
                "user": "$TELEMETRY_DB_USER",
                "isDefault": True,
                "editable": False,
                "jsonData": {
                    "database": "$TELEMETRY_DB_NAME",
                    "sslmode": "disable",
                    "postgresVersion": 1600,
                    "timescaledb": True,
                },
                "secureJsonData": {"password": "$TELEMETRY_DB_PASSWORD"},
            },
            {
                "name": "Prometheus",
                "uid": PROMETHEUS["uid"],
                "type": PROMETHEUS["type"],
                "access": "proxy",
                "url": "$PROMETHEUS_URL",
                "editable": False,
                "jsonData": {"httpMethod": "POST", "timeInterval": "15s"},
            },
        ],
    }


def dashboard_provider() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "telemetry",
                "orgId": 1,
                "folder": FOLDER,
                "folderUid": FOLDER_UID,
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 60,
                "options": {"path": DASHBOARDS_IN_CONTAINER},
            }
        ],
    }


# -- files ----------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so the SQL reads as SQL; no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)

HEADER = "# Generated by grafana/build.py (python -m grafana.build): edit that, not this file.\n"


def to_yaml(document: dict[str, Any]) -> str:
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=4096)


def to_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def files() -> dict[Path, str]:
    """Every generated file (path relative to grafana/) and its content."""
    generated = {
        Path("provisioning/datasources/telemetry.yaml"): to_yaml(datasources()),
        Path("provisioning/dashboards/telemetry.yaml"): to_yaml(dashboard_provider()),
        Path("provisioning/alerting/rules.yaml"): to_yaml(alert_rules()),
        Path("provisioning/alerting/contact-points.yaml"): to_yaml(contact_points()),
        Path("provisioning/alerting/policies.yaml"): to_yaml(notification_policies()),
    }
    for name, build in DASHBOARD_BUILDERS.items():
        generated[Path("dashboards") / name] = to_json(build())
    return generated


def main() -> None:
    for path, content in files().items():
        target = ROOT / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
        print(f"wrote grafana/{path}", file=sys.stderr)


if __name__ == "__main__":
    main()
