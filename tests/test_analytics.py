"""The report figures, on every backend, from small hand-built months whose
every expected figure is worked out by hand below."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import write_hits

from analytics.errors import BadRange, UnknownSite
from analytics.figures import TOP_PAIRS, compute
from api.cli import main
from bench.report import headline, run_naive
from bench.traffic import Traffic, TrafficConfig
from db import NewHit
from db.aggregates import refresh
from db.bulk import load_hits

SITE = "a.example"
OCTOBER = (date(2026, 10, 1), date(2026, 10, 31))
# Everything below is in the past of this (and of the real clock).
NOW = datetime(2026, 11, 20, tzinfo=UTC)

A, B, C, ROBOT = (bytes([n]) * 16 for n in (0xAA, 0xBB, 0xCC, 0xDD))
CHROME = ("Chrome", "Windows", "desktop")
FIREFOX = ("Firefox", "Linux", "desktop")
SAFARI = ("Mobile Safari", "iOS", "mobile")
GOOGLEBOT = ("Googlebot", None, "bot")


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def hit(
    ts: str,
    who: bytes,
    path: str,
    agent: tuple[str | None, str | None, str] = CHROME,
    referrer: str | None = None,
    site: str = SITE,
) -> NewHit:
    browser, os_name, device = agent
    is_bot = device == "bot"
    return NewHit(t(ts), site, path, referrer, who, "test agent", browser, os_name, device, is_bot)


# The month worked out by hand (UTC):
#   Mon Oct 5  10:05 A /         from Google         Chrome, Windows, desktop
#              10:10 A /pricing  from a.example/
#              10:20 A /docs     from a.example/pricing
#              10:30 robot /     Googlebot
#              11:30 B /         direct              Firefox, Linux, desktop
#              11:40 B /pricing  from a.example/
#   Tue Oct 6  03:00 robot /robots.txt
#              10:15 A /         direct
#              14:00 C /docs     from Hacker News    Mobile Safari, iOS, mobile
# and in September A and B viewed / once each; b.example had one hit in October.
MONTH = [
    hit("2026-09-15 12:00", A, "/"),
    hit("2026-09-15 12:30", B, "/", FIREFOX),
    hit("2026-10-05 10:05", A, "/", referrer="https://www.google.com/search"),
    hit("2026-10-05 10:10", A, "/pricing", referrer="https://a.example/"),
    hit("2026-10-05 10:20", A, "/docs", referrer="https://a.example/pricing"),
    hit("2026-10-05 10:30", ROBOT, "/", GOOGLEBOT),
    hit("2026-10-05 11:30", B, "/", FIREFOX),
    hit("2026-10-05 11:40", B, "/pricing", FIREFOX, referrer="https://a.example/"),
    hit("2026-10-06 03:00", ROBOT, "/robots.txt", GOOGLEBOT),
    hit("2026-10-06 10:15", A, "/"),
    hit("2026-10-06 14:00", C, "/docs", SAFARI, referrer="https://news.ycombinator.com/item"),
    hit("2026-10-05 12:00", A, "/", site="b.example"),
]


def store(engine: sa.Engine, hits: list[NewHit]) -> None:
    write_hits(engine, hits)
    refresh(engine, now=NOW)


@pytest.fixture
def month(engine: sa.Engine) -> sa.Engine:
    store(engine, MONTH)
    return engine


def october(engine: sa.Engine, **options) -> dict:
    return compute(engine, SITE, *OCTOBER, options.pop("tz", "UTC"), now=NOW, **options)


def test_summary_daily_and_monthly_figures(month):
    data = october(month)

    assert data["summary"] == {
        "hits": 7,
        "visitors": 3,
        "hits_per_visitor": pytest.approx(7 / 3),
        "bot_hits": 2,
        "bot_share": pytest.approx(2 / 9),
        "peak_hour": 10,  # Oct 5: 10 h (3 hits); Oct 6: 10 h and 14 h tie, the earlier
        "anomalies": 0,
    }
    assert len(data["daily"]) == 31
    busy = [day for day in data["daily"] if day["hits"]]
    assert busy == [
        {"date": "2026-10-05", "hits": 5, "visitors": 2, "hits_per_visitor": 2.5},
        {"date": "2026-10-06", "hits": 2, "visitors": 2, "hits_per_visitor": 1.0},
    ]
    assert data["daily"][0] == {
        "date": "2026-10-01", "hits": 0, "visitors": 0, "hits_per_visitor": None
    }  # fmt: skip
    assert data["monthly"] == [
        {"month": "2026-08", "hits": 0, "visitors": 0, "hits_per_visitor": None,
         "hits_growth": None, "visitors_growth": None},
        {"month": "2026-09", "hits": 2, "visitors": 2, "hits_per_visitor": 1.0,
         "hits_growth": None, "visitors_growth": None},
        {"month": "2026-10", "hits": 7, "visitors": 3, "hits_per_visitor": pytest.approx(7 / 3),
         "hits_growth": 2.5, "visitors_growth": 0.5},
    ]  # fmt: skip


def test_heatmap_and_hourly_series_in_utc(month):
    data = october(month)

    cells = {
        (weekday, hour): n
        for weekday, row in enumerate(data["heatmap"]["hits"])
        for hour, n in enumerate(row)
        if n
    }
    assert cells == {(0, 10): 3, (0, 11): 2, (1, 10): 1, (1, 14): 1}
    assert data["heatmap"]["weekdays"] == ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    assert data["heatmap"]["hours"] == list(range(24))
    assert len(data["hourly"]) == 31 * 24
    by_hour = {h["hour"]: h["hits"] for h in data["hourly"] if h["hits"]}
    assert by_hour == {
        "2026-10-05T10:00:00+00:00": 3,
        "2026-10-05T11:00:00+00:00": 2,
        "2026-10-06T10:00:00+00:00": 1,
        "2026-10-06T14:00:00+00:00": 1,
    }


def test_a_time_zone_moves_hours_days_and_the_heatmap(month):
    data = october(month, tz="Asia/Tokyo")  # UTC+9, no daylight saving

    cells = {
        (weekday, hour): n
        for weekday, row in enumerate(data["heatmap"]["hits"])
        for hour, n in enumerate(row)
        if n
    }
    assert cells == {(0, 19): 3, (0, 20): 2, (1, 19): 1, (1, 23): 1}
    assert data["summary"]["peak_hour"] == 19
    assert data["timezone"] == "Asia/Tokyo"
    assert data["hourly"][0]["hour"] == "2026-10-01T00:00:00+09:00"
    by_hour = {h["hour"]: h["hits"] for h in data["hourly"] if h["hits"]}
    assert by_hour["2026-10-05T19:00:00+09:00"] == 3
    assert by_hour["2026-10-06T23:00:00+09:00"] == 1
    # New York (UTC-4 in October): Oct 6 03:00 UTC is still Oct 5 there; bots only
    # show with include_bots, so count them in to see the day move.
    new_york = october(month, tz="America/New_York", include_bots=True)
    daily = {d["date"]: d["hits"] for d in new_york["daily"] if d["hits"]}
    assert daily == {"2026-10-05": 7, "2026-10-06": 2}
    # Paris leaves summer time on Oct 25: that local day has 25 hours.
    paris = october(month, tz="Europe/Paris")
    assert len(paris["hourly"]) == 31 * 24 + 1
    assert paris["hourly"][0]["hour"] == "2026-10-01T00:00:00+02:00"
    assert paris["hourly"][-1]["hour"] == "2026-10-31T23:00:00+01:00"


def test_top_visitors_paths_referrers_and_agents(month):
    data = october(month)

    assert data["top_visitors"] == [
        {"visitor": "aaaaaaaa", "hits": 4, "share": pytest.approx(4 / 7)},
        {"visitor": "bbbbbbbb", "hits": 2, "share": pytest.approx(2 / 7)},
        {"visitor": "cccccccc", "hits": 1, "share": pytest.approx(1 / 7)},
    ]
    assert data["top_paths"] == [
        {"path": "/", "hits": 3, "visitors": 2},
        {"path": "/docs", "hits": 2, "visitors": 2},
        {"path": "/pricing", "hits": 2, "visitors": 2},
    ]
    assert data["referrers"] == [
        {"host": "a.example", "hits": 3},
        {"host": "(direct)", "hits": 2},
        {"host": "news.ycombinator.com", "hits": 1},
        {"host": "www.google.com", "hits": 1},
    ]
    assert data["browsers"] == [
        {"name": "Chrome", "hits": 4},
        {"name": "Firefox", "hits": 2},
        {"name": "Mobile Safari", "hits": 1},
    ]
    assert data["os"] == [
        {"name": "Windows", "hits": 4},
        {"name": "Linux", "hits": 2},
        {"name": "iOS", "hits": 1},
    ]
    assert data["devices"] == [{"name": "desktop", "hits": 6}, {"name": "mobile", "hits": 1}]


def test_top_visitors_of_part_of_a_month(month):
    """Not whole months: read from the daily rows, same figures for the days."""
    data = compute(month, SITE, date(2026, 10, 6), date(2026, 10, 6), "UTC", now=NOW)

    assert data["summary"]["hits"] == 2
    assert data["summary"]["visitors"] == 2
    assert data["top_visitors"] == [
        {"visitor": "aaaaaaaa", "hits": 1, "share": 0.5},
        {"visitor": "cccccccc", "hits": 1, "share": 0.5},
    ]


def test_path_affinity_support_and_lift(month):
    # Visitor-days: A Oct 5 {/, /pricing, /docs}, B Oct 5 {/, /pricing},
    # A Oct 6 {/}, C Oct 6 {/docs}: 4 baskets; / in 3, /pricing in 2, /docs in 2.
    data = october(month)

    assert data["affinity"] == [
        # 2 baskets of 4 with both; lift 2/4 / (3/4 * 2/4) = 4/3
        {"a": "/", "b": "/pricing", "visitors": 2, "support": 0.5,
         "lift": pytest.approx(4 / 3)},
        # 1 basket: 1/4 / (2/4 * 2/4) = 1
        {"a": "/docs", "b": "/pricing", "visitors": 1, "support": 0.25,
         "lift": pytest.approx(1.0)},
        # 1 basket: 1/4 / (3/4 * 2/4) = 2/3
        {"a": "/", "b": "/docs", "visitors": 1, "support": 0.25,
         "lift": pytest.approx(2 / 3)},
    ]  # fmt: skip


def test_bots_are_left_out_unless_asked_for(month):
    data = october(month, include_bots=True)

    assert data["include_bots"] is True
    assert data["summary"]["hits"] == 9
    assert data["summary"]["visitors"] == 4
    assert data["summary"]["bot_hits"] == 2
    assert data["top_paths"][0] == {"path": "/", "hits": 4, "visitors": 3}
    assert {"path": "/robots.txt", "hits": 1, "visitors": 1} in data["top_paths"]
    assert {"name": "bot", "hits": 2} in data["devices"]
    assert data["heatmap"]["hits"][0][10] == 4  # Monday 10 h: A's three and the robot
    assert data["top_visitors"][2] == {
        "visitor": "dddddddd", "hits": 2, "share": pytest.approx(2 / 9)
    }  # fmt: skip
    # The baseline always judges human hits (Grafana's alert does the same).
    assert max(h["hits"] for h in data["hourly"]) == 3


def test_all_sites_together(month):
    data = compute(month, None, *OCTOBER, "UTC", now=NOW)

    assert data["site"] is None
    assert data["summary"]["hits"] == 8
    # A visited both sites: one visitor (the hash does not depend on the site).
    assert data["summary"]["visitors"] == 3
    assert data["top_visitors"][0] == {
        "visitor": "aaaaaaaa", "hits": 5, "share": pytest.approx(5 / 8)
    }  # fmt: skip
    assert {d["date"]: d["visitors"] for d in data["daily"] if d["hits"]} == {
        "2026-10-05": 2,
        "2026-10-06": 2,
    }


def test_path_visitors_and_affinity_of_all_sites(month):
    # Visitor-days are per site: A's view of / on b.example on Oct 5 is a fifth
    # basket, {/}, beside the four of a.example. A is still one visitor of /.
    data = compute(month, None, *OCTOBER, "UTC", now=NOW)

    assert data["top_paths"] == [
        {"path": "/", "hits": 4, "visitors": 2},
        {"path": "/docs", "hits": 2, "visitors": 2},
        {"path": "/pricing", "hits": 2, "visitors": 2},
    ]
    # / in 4 baskets of 5, /pricing and /docs in 2 each.
    assert data["affinity"] == [
        {"a": "/", "b": "/pricing", "visitors": 2, "support": 0.4,
         "lift": pytest.approx(2 * 5 / (4 * 2))},
        {"a": "/docs", "b": "/pricing", "visitors": 1, "support": 0.2,
         "lift": pytest.approx(1 * 5 / (2 * 2))},
        {"a": "/", "b": "/docs", "visitors": 1, "support": 0.2,
         "lift": pytest.approx(1 * 5 / (4 * 2))},
    ]  # fmt: skip


def test_figures_match_pandas_over_the_raw_hits_of_a_seeded_month(engine, database_url):
    """Generated traffic (many paths, visitors and visitor-days): the headline
    figures, top path visitors and affinity included, equal bench/report.py's
    naive computation from the month's raw rows in pandas."""
    config = TrafficConfig(events=30_000, days=45, end=date(2026, 11, 3))
    load_hits(engine, Traffic(config).chunks())
    refresh(engine, now=config.end_time)
    site = config.sites[0]

    data = compute(engine, site, *OCTOBER, "UTC", now=config.end_time)

    assert len(data["affinity"]) == TOP_PAIRS
    assert headline(data) == run_naive(database_url, site, *OCTOBER)


def test_a_month_without_hits_has_every_key_and_no_figures(month):
    data = compute(month, SITE, date(2026, 7, 1), date(2026, 7, 31), "UTC", now=NOW)

    assert data["summary"] == {
        "hits": 0, "visitors": 0, "hits_per_visitor": None, "bot_hits": 0,
        "bot_share": None, "peak_hour": None, "anomalies": 0,
    }  # fmt: skip
    assert [d["hits"] for d in data["daily"]] == [0] * 31
    assert data["heatmap"]["hits"] == [[0] * 24] * 7
    for key in ("anomalies", "top_visitors", "top_paths", "referrers", "browsers", "os",
                "devices", "affinity"):  # fmt: skip
        assert data[key] == [], key
    json.dumps(data)  # JSON-ready


def test_unknown_site_and_bad_ranges_are_refused(month):
    with pytest.raises(UnknownSite, match=r"nope\.example"):
        compute(month, "nope.example", *OCTOBER, "UTC", now=NOW)
    with pytest.raises(BadRange, match="after it ends"):
        compute(month, SITE, date(2026, 10, 31), date(2026, 10, 1), "UTC", now=NOW)
    with pytest.raises(BadRange, match="after today"):
        compute(month, SITE, date(2026, 12, 1), date(2026, 12, 31), "UTC", now=NOW)
    with pytest.raises(BadRange, match="time zone"):
        compute(month, SITE, *OCTOBER, "Mars/Olympus", now=NOW)


# -- the baseline ----------------------------------------------------------------------------


def hour_of_hits(ts: str, count: int, site: str = "c.example") -> list[NewHit]:
    start = t(ts)
    return [
        NewHit(start + timedelta(seconds=n), site, "/", None, bytes([n]) * 16,
               "test agent", *CHROME, False)
        for n in range(count)
    ]  # fmt: skip


def test_baseline_flags_a_spike_and_a_drop(engine):
    # The site's first row: history from here; its band starts the first UTC day more
    # than 35 days later (four weeks for the medians, a week of their deviations): Oct 7.
    hits = hour_of_hits("2026-09-01 09:00", 1)
    # Mondays 10 h: 10 a week, 12 on Oct 5, 8 on Oct 12, then 40 on Oct 26.
    mondays = ["09-07", "09-14", "09-21", "09-28", "10-05", "10-12", "10-19", "10-26"]
    for day, n in zip(mondays, [10, 10, 10, 10, 12, 8, 10, 40], strict=True):
        hits += hour_of_hits(f"2026-{day} 10:00", n)
    # Tuesdays 10 h: 20 a week, 22 on Oct 6, 18 on Oct 13, then 2 on Oct 27.
    tuesdays = ["09-08", "09-15", "09-22", "09-29", "10-06", "10-13", "10-20", "10-27"]
    for day, n in zip(tuesdays, [20, 20, 20, 20, 22, 18, 20, 2], strict=True):
        hits += hour_of_hits(f"2026-{day} 10:00", n)
    store(engine, hits)

    data = compute(engine, "c.example", *OCTOBER, "UTC", margin=1.0, now=NOW)

    # Nearly every hour of the 30-day pools is quiet (median 0, deviation 0), so both
    # percentiles are 0 and the band is the median itself, spread sqrt(median + 1).
    # Spike: samples 10, 8, 12, 10: median 10; 40 > 10 + sqrt(11); score 30 / sqrt(11).
    # Drop: samples 20, 18, 22, 20: median 20; 2 < 20 - sqrt(21); score 18 / sqrt(21).
    assert data["anomalies"] == [
        {"hour": "2026-10-26T10:00:00+00:00", "hits": 40, "median": 10.0,
         "low": 10.0, "high": 10.0, "direction": "spike",
         "score": pytest.approx(30 / 11**0.5)},
        {"hour": "2026-10-27T10:00:00+00:00", "hits": 2, "median": 20.0,
         "low": 20.0, "high": 20.0, "direction": "drop",
         "score": pytest.approx(18 / 21**0.5)},
    ]  # fmt: skip
    assert data["summary"]["anomalies"] == 2
    hourly = {h["hour"]: h for h in data["hourly"]}
    assert hourly["2026-10-26T10:00:00+00:00"]["anomaly"] == "spike"
    # Oct 6 is before the band starts: not judged; Oct 7 is.
    assert hourly["2026-10-06T10:00:00+00:00"]["median"] is None
    assert hourly["2026-10-07T00:00:00+00:00"]["median"] == 0.0
    # A quiet hour (all four samples 0) is judged, and never an anomaly below MIN_MEDIAN.
    quiet = hourly["2026-10-28T10:00:00+00:00"]
    assert quiet["median"] == 0.0 and quiet["anomaly"] is None
    # Ten spreads out is further than either went.
    wide = compute(engine, "c.example", *OCTOBER, "UTC", margin=10.0, now=NOW)
    assert wide["anomalies"] == []


# -- the command -----------------------------------------------------------------------------


def report(database_url: str, *args: str, **env: str):
    return CliRunner().invoke(
        main, ["report", *args], env={"TELEMETRY_DATABASE_URL": database_url, **env}
    )


def test_report_command_prints_the_json(month, database_url):
    result = report(database_url, "--month", "2026-10", "--site", SITE, "--format", "json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["summary"]["hits"] == 7
    assert data["from"] == "2026-10-01" and data["to"] == "2026-10-31"
    assert "report 2026-10" in result.stderr  # the progress bar


def test_report_command_writes_json_to_a_file_in_the_time_zone(month, database_url, tmp_path):
    out = tmp_path / "october.json"
    result = report(
        database_url, "--month", "2026-10", "--site", SITE, "--format", "json", "--out", str(out),
        TELEMETRY_TIMEZONE="Asia/Tokyo",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["timezone"] == "Asia/Tokyo"
    assert data["heatmap"]["hits"][0][19] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--month", "2026-13"], "is not a month"),
        (["--month", "October"], "is not a month"),
        (["--month", "2026-10", "--site", "nope.example"], "no hits were ever recorded"),
        (["--month", "2099-01"], "after today"),
    ],
)
def test_report_command_refuses_bad_input(month, database_url, tmp_path, args, message):
    out = tmp_path / "report.json"
    result = report(database_url, *args, "--format", "json", "--out", str(out))

    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_report_command_writes_the_html_report(month, database_url, tmp_path):
    out = tmp_path / "october.html"
    result = report(database_url, "--month", "2026-10", "--site", SITE, "--out", str(out))

    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") or page.lower().startswith("<!doctype html>")
    assert "a.example" in page
