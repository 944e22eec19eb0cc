"""The macro expander of tests/grafana_macros.py gives exactly the SQL Grafana gives.

The cases are transcribed as data (no code) from Grafana's own tests in
grafana/grafana: pkg/tsdb/grafana-postgresql-datasource/macros_test.go
(TestMacroEngine, commit 446b3e1f13300e6160905e8e1c7c39fcab9aa084) and
pkg/tsdb/grafana-postgresql-datasource/sqleng/sql_engine_test.go ("Handle
interpolating $__interval and $__interval_ms" and the $__unixEpochFrom/To
cases, commit 062e76e4c44d38ac9d2b426d266c92e9ec776341). Each case: input SQL,
time range, interval, TimescaleDB on or off, and Grafana's expected output.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from grafana_macros import MacroError, expand, format_interval, parse_interval, rfc3339

APRIL_FROM = datetime(2018, 4, 12, 18, 0, tzinfo=UTC)
APRIL_TO = APRIL_FROM + timedelta(minutes=5)
SIXTIES_FROM = datetime(1960, 2, 1, 7, 0, tzinfo=UTC)
SIXTIES_TO = datetime(1965, 2, 3, 8, 0, tzinfo=UTC)
EIGHTIES_TO = datetime(1980, 2, 3, 8, 0, tzinfo=UTC)
HALF_SECOND = timedelta(milliseconds=500)

# (sql, from, to, timescaledb, expected), from macros_test.go. Where Grafana writes the
# expectation as from.Unix() / to.Unix(), the number is written out (date -u -d ... +%s).
MACRO_CASES = [
    ("select $__time(time_column)", APRIL_FROM, APRIL_TO, False, 'select time_column AS "time"'),
    ("select min($__time(time_column))", APRIL_FROM, APRIL_TO, False,
     'select min(time_column AS "time")'),
    ("WHERE $__timeFilter(time_column)", APRIL_FROM, APRIL_TO, False,
     "WHERE time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'"),
    ("select $__timeFrom()", APRIL_FROM, APRIL_TO, False, "select '2018-04-12T18:00:00Z'"),
    ("select $__timeTo()", APRIL_FROM, APRIL_TO, False, "select '2018-04-12T18:05:00Z'"),
    # pre-5.3 compatibility: a comma right after $__timeGroup adds the alias
    ("SELECT $__timeGroup(time_column,'5m'), value", APRIL_FROM, APRIL_TO, False,
     'SELECT floor(extract(epoch from time_column)/300)*300 AS "time", value'),
    ("SELECT $__timeGroup(time_column,'5m') as time, value", APRIL_FROM, APRIL_TO, False,
     "SELECT floor(extract(epoch from time_column)/300)*300 as time, value"),
    ("SELECT $__timeGroup(time_column,'5m')", APRIL_FROM, APRIL_TO, False,
     "SELECT floor(extract(epoch from time_column)/300)*300"),
    ("SELECT $__timeGroupAlias(time_column,'5m')", APRIL_FROM, APRIL_TO, False,
     'SELECT floor(extract(epoch from time_column)/300)*300 AS "time"'),
    ("$__timeGroup(time_column , '5m')", APRIL_FROM, APRIL_TO, False,
     "floor(extract(epoch from time_column)/300)*300"),
    ("$__timeGroupAlias(time_column , '5m')", APRIL_FROM, APRIL_TO, False,
     'floor(extract(epoch from time_column)/300)*300 AS "time"'),
    ("GROUP BY $__timeGroup(time_column,'5m')", APRIL_FROM, APRIL_TO, True,
     "GROUP BY time_bucket('300.000s',time_column)"),
    ("GROUP BY $__timeGroup(time_column , '5m')", APRIL_FROM, APRIL_TO, True,
     "GROUP BY time_bucket('300.000s',time_column)"),
    ("GROUP BY $__timeGroup(time_column , '12d')", APRIL_FROM, APRIL_TO, True,
     "GROUP BY time_bucket('1036800.000s',time_column)"),
    ("GROUP BY $__timeGroup(time_column , '20ms')", APRIL_FROM, APRIL_TO, True,
     "GROUP BY time_bucket('0.020s',time_column)"),
    ("select $__unixEpochFilter(time)", APRIL_FROM, APRIL_TO, False,
     "select time >= 1523556000 AND time <= 1523556300"),
    ("WHERE $__timeFilter(time_column)", SIXTIES_FROM, SIXTIES_TO, False,
     "WHERE time_column BETWEEN '1960-02-01T07:00:00Z' AND '1965-02-03T08:00:00Z'"),
    ("select $__unixEpochFilter(time)", SIXTIES_FROM, SIXTIES_TO, False,
     "select time >= -312915600 AND time <= -154886400"),
    ("WHERE $__timeFilter(time_column)", SIXTIES_FROM, EIGHTIES_TO, False,
     "WHERE time_column BETWEEN '1960-02-01T07:00:00Z' AND '1980-02-03T08:00:00Z'"),
    ("select $__unixEpochFilter(time)", SIXTIES_FROM, EIGHTIES_TO, False,
     "select time >= -312915600 AND time <= 318412800"),
    ("WHERE $__timeFilter(time_column)", SIXTIES_FROM + HALF_SECOND, EIGHTIES_TO + HALF_SECOND,
     False, "WHERE time_column BETWEEN '1960-02-01T07:00:00.5Z' AND '1980-02-03T08:00:00.5Z'"),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "time_from", "time_to", "timescaledb", "expected"), MACRO_CASES)
def test_macro_expands_as_grafana_does(sql, time_from, time_to, timescaledb, expected):
    assert expand(sql, time_from=time_from, time_to=time_to, timescaledb=timescaledb) == expected


# From sql_engine_test.go: "$__interval $__timeGroupAlias(time,$__interval) $__interval_ms"
# after the shared substitutions only, for three query intervals.
@pytest.mark.parametrize(
    ("interval", "expected_interval", "expected_ms"),
    [
        (timedelta(minutes=10), "10m", "600000"),
        (timedelta(seconds=4), "4s", "4000"),
        (timedelta(milliseconds=200), "200ms", "200"),
    ],
)
def test_interval_substitutions_match_grafana(interval, expected_interval, expected_ms):
    text = "$__interval $__timeGroupAlias(time,$__interval) $__interval_ms"
    expanded = expand(text, time_from=APRIL_FROM, time_to=APRIL_TO, interval=interval)
    # Grafana's test stops before the macro pass; here the $__timeGroupAlias it leaves
    # is expanded too, with the interval Grafana substituted into it.
    seconds = interval.total_seconds()
    width = f"{seconds:g}"
    assert expanded == (
        f'{expected_interval} floor(extract(epoch from time)/{width})*{width} AS "time" '
        f"{expected_ms}"
    )
    assert format_interval(interval) == expected_interval


def test_unix_epoch_from_and_to_are_substituted():
    # sql_engine_test.go: "select $__unixEpochFrom()" / "select $__unixEpochTo()".
    assert expand("select $__unixEpochFrom()", time_from=APRIL_FROM, time_to=APRIL_TO) == (
        "select 1523556000"
    )
    assert expand("select $__unixEpochTo()", time_from=APRIL_FROM, time_to=APRIL_TO) == (
        "select 1523556300"
    )


def test_interval_ms_is_replaced_before_interval():
    # Replacing $__interval first would leave "1h_ms" behind.
    sql = "SELECT $__interval_ms, '$__interval'"
    expanded = expand(sql, time_from=APRIL_FROM, time_to=APRIL_TO, interval=timedelta(hours=1))
    assert expanded == "SELECT 3600000, '1h'"


def test_rfc3339_drops_trailing_zeros_of_the_fraction():
    assert rfc3339(datetime(1960, 2, 1, 7, 0, 0, 500_000, tzinfo=UTC)) == "1960-02-01T07:00:00.5Z"
    assert rfc3339(APRIL_FROM) == "2018-04-12T18:00:00Z"


def test_calendar_intervals_follow_the_utc_calendar():
    assert parse_interval("1d") == timedelta(days=1)
    assert parse_interval("2w") == timedelta(days=14)
    assert parse_interval("1M", now=datetime(2026, 2, 10, tzinfo=UTC)) == timedelta(days=28)
    assert parse_interval("1y", now=datetime(2027, 3, 1, tzinfo=UTC)) == timedelta(days=366)
    assert parse_interval("1h30m") == timedelta(minutes=90)


@pytest.mark.parametrize(
    "sql",
    ["$__timeFilter()", "$__timeGroup(ts)", "$__timeGroup(ts, 'soon')", "$__nonsense(ts)"],
)
def test_macros_grafana_refuses_are_refused(sql):
    with pytest.raises(MacroError):
        expand(sql, time_from=APRIL_FROM, time_to=APRIL_TO)
