"""Grafana's PostgreSQL macros, expanded the way Grafana's backend expands them, so
that the tests can run every provisioned panel and alert query against a real
database without a Grafana server.

Grafana expands a query in two passes (pkg/tsdb/grafana-postgresql-datasource):
first the substitutions every SQL datasource shares (`$__interval_ms`,
`$__interval`, `$__unixEpochFrom()`, `$__unixEpochTo()`, plain text
replacement, in that order), then the PostgreSQL macros, each a
`$__name(arguments)` call. The behaviour below is written from Grafana's
documented macros and checked against the expected strings of Grafana's own
tests (tests/test_grafana_macros.py); no Grafana code is copied.

Dashboard variables (`$site`) are the frontend's business and are replaced
before any of this, by `interpolate_variables`.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal

# $__name(arguments): the arguments end at the first ")", as in Grafana.
_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")
_DATE_UNIT = re.compile(r"^(\d+)([dwMy])$")
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class MacroError(ValueError):
    """A macro Grafana would refuse (the query then fails with this message)."""


def expand(
    sql: str,
    *,
    time_from: datetime,
    time_to: datetime,
    interval: timedelta = timedelta(seconds=1),
    timescaledb: bool = False,
    now: datetime | None = None,
) -> str:
    """`sql` as Grafana's backend sends it to PostgreSQL for this time range and
    interval. `timescaledb` is the datasource's `jsonData.timescaledb`; `now`
    only matters for month and year intervals (their length depends on it).
    In alert rules Grafana's interval is one second, the default here."""
    sql = _shared_substitutions(sql, time_from, time_to, interval)
    original = sql

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        # `$__timeGroup(...)` directly followed by a comma is the pre-5.3 form
        # that aliased itself; Grafana looks at the first occurrence of the text.
        if name == "__timeGroup":
            end = original.find(match.group(0)) + len(match.group(0))
            if end < len(original) and original[end] == ",":
                name = "__timeGroupAlias"
        arguments = [argument.strip(" ") for argument in match.group(2).split(",")]
        return _macro(name, arguments, time_from, time_to, timescaledb, now)

    return _MACRO.sub(replace, sql)


def interpolate_variables(sql: str, values: Mapping[str, str]) -> str:
    """Single-value dashboard variables put into a query: the value with single
    quotes doubled (the query quotes it; with quotes in site names or paths
    unverified against Grafana's frontend)."""
    for name, value in values.items():
        escaped = value.replace("'", "''")
        # re.sub reads backslashes in a replacement as escapes: doubled, they stay.
        sql = re.sub(rf"\$\{{{name}\}}|\${name}\b", escaped.replace("\\", "\\\\"), sql)
    return sql


def format_interval(interval: timedelta) -> str:
    """Grafana's short form of a duration: the largest unit it fills, truncated."""
    micros = _micros(interval)
    for unit, size in (("y", 365 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)):
        if micros >= size * 1_000_000:
            return f"{micros // (size * 1_000_000)}{unit}"
    if micros >= 1000:
        return f"{micros // 1000}ms"
    return "1ms"


def parse_interval(text: str, now: datetime | None = None) -> timedelta:
    """An interval as Grafana reads it: days, weeks, months and years (`1d`, `2w`,
    `1M`, `1y`) counted on the UTC calendar from `now`, anything else as a Go
    duration (`5m`, `1h30m`, `20ms`)."""
    calendar_unit = _DATE_UNIT.match(text)
    if calendar_unit is None:
        return _go_duration(text)
    count, unit = int(calendar_unit.group(1)), calendar_unit.group(2)
    if unit in "dw":
        return timedelta(days=count * (7 if unit == "w" else 1))
    start = (now or datetime.now(UTC)).astimezone(UTC)
    months = count * (12 if unit == "y" else 1)
    return _add_months(start, months) - start


def rfc3339(moment: datetime) -> str:
    """Go's time.RFC3339Nano of a UTC time: trailing zeros of the fraction dropped."""
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def _shared_substitutions(sql: str, time_from: datetime, time_to: datetime, step: timedelta) -> str:
    sql = sql.replace("$__interval_ms", str(_micros(step) // 1000))
    sql = sql.replace("$__interval", format_interval(step))
    sql = sql.replace("$__unixEpochFrom()", str(_unix(time_from)))
    return sql.replace("$__unixEpochTo()", str(_unix(time_to)))


def _macro(
    name: str,
    arguments: list[str],
    time_from: datetime,
    time_to: datetime,
    timescaledb: bool,
    now: datetime | None,
) -> str:
    column = arguments[0]
    if name in ("__time", "__timeEpoch", "__timeFilter", "__unixEpochFilter") and not column:
        raise MacroError(f"missing time column argument for macro {name}")
    if name == "__time":
        return f'{column} AS "time"'
    if name == "__timeEpoch":
        return f'extract(epoch from {column}) as "time"'
    if name == "__timeFilter":
        return f"{column} BETWEEN '{rfc3339(time_from)}' AND '{rfc3339(time_to)}'"
    if name == "__timeFrom":
        return f"'{rfc3339(time_from)}'"
    if name == "__timeTo":
        return f"'{rfc3339(time_to)}'"
    if name == "__unixEpochFilter":
        return f"{column} >= {_unix(time_from)} AND {column} <= {_unix(time_to)}"
    if name in ("__timeGroup", "__timeGroupAlias"):
        if len(arguments) < 2:
            raise MacroError(f"macro {name} needs time column and interval and optional fill value")
        if len(arguments) == 3:
            # A fill value makes Grafana fill gaps in the result, not change the SQL;
            # these tests read the SQL's own rows, so a fill would go unchecked.
            raise MacroError("fill values are not supported by this expander")
        try:
            seconds = _micros(parse_interval(arguments[1].strip("'"), now)) / 1_000_000
        except ValueError as exc:
            raise MacroError(f"error parsing interval {arguments[1]}") from exc
        if timescaledb:
            group = f"time_bucket('{seconds:.3f}s',{column})"
        else:
            width = _go_float(seconds)
            group = f"floor(extract(epoch from {column})/{width})*{width}"
        return group + (' AS "time"' if name == "__timeGroupAlias" else "")
    raise MacroError(f"unknown macro {name!r}")


def _micros(interval: timedelta) -> int:
    return (interval.days * 86_400 + interval.seconds) * 1_000_000 + interval.microseconds


def _unix(moment: datetime) -> int:
    return calendar.timegm(moment.astimezone(UTC).utctimetuple())


def _go_duration(text: str) -> timedelta:
    """Go's time.ParseDuration for the non-negative durations dashboards use."""
    if text == "0":
        return timedelta(0)
    parts = _GO_DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    seconds = sum(Decimal(number) * Decimal(repr(_GO_UNITS[unit])) for number, unit in parts)
    return timedelta(microseconds=int(seconds * 1_000_000))


def _go_float(value: float) -> str:
    """A float64 as Go's fmt %v prints it: the shortest digits, in exponent form
    when the decimal exponent is below -4 or at least 6 (300, 0.02, 1.0368e+06)."""
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits))
    power = len(digits) + exponent - 1
    if power < -4 or power >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{'-' if sign else ''}{mantissa}e{'-' if power < 0 else '+'}{abs(power):02d}"
    return f"{Decimal(repr(value)).normalize():f}"


def _add_months(moment: datetime, months: int) -> datetime:
    """Go's AddDate(0, months, 0): an overflowing day rolls into the next month."""
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    first = moment.replace(year=year, month=month, day=1)
    return first + timedelta(days=moment.day - 1)
