"""Importing web-server access logs (`telemetry import`): each page view of the
log becomes a hit through the same validation, hashing and bot flagging as
`/track`, at the time the log says (no 48-hour window).

Formats: `combined` and `common` (Apache and nginx defaults) and `nginx-json`
(one JSON object per line with nginx's variable names). Files may be gzipped.

Idempotency: a file is read in batches of `BATCH_LINES` lines; each batch is
stored together with a key naming the file (by its first line), where the
batch ends and a digest of every line up to there (db/imports.py). Importing
the file again skips every batch whose key is stored, so each line is stored
once; a file that has grown since (a live access.log) also ends a batch where
the previous import's last batch ended, so only the new lines are imported.

Hashing of old periods: a period whose key is still held, or may still be made
(the period and its grace window are not over), uses that key, so imported and
live hits of it count the same visitors. A closed period's key is gone for good
and is never made again (api/privacy.py); its hits are hashed with a one-off
key made for this run and forgotten at its end. Visitors of a closed period are
therefore exact within one run (import all its files in one command), and such
hits cannot be found later by `telemetry erase --ip`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from sqlalchemy import Engine
from tqdm import tqdm

from api.events import MAX_FUTURE, Event, InvalidEvent, RequestContext, parse_event
from api.privacy import KeyedHash, normalise_address, period_bounds
from api.settings import Settings
from api.useragent import classify
from db import aggregates
from db.bulk import format_hits
from db.imports import store_batch, stored_batch_keys
from db.salts import get_or_create_salt

FORMATS = ("combined", "common", "nginx-json")
# Lines per batch: one transaction, one idempotency key. Changing it later is
# safe: the previous imports' batch ends are read back from their keys.
BATCH_LINES = 20_000
# Extensions of static assets, left out unless asked (page views only).
STATIC_EXTENSIONS = (
    "css", "js", "mjs", "map", "json", "xml", "txt", "png", "jpg", "jpeg", "gif", "svg", "ico",
    "webp", "avif", "bmp", "woff", "woff2", "ttf", "otf", "eot", "mp4", "webm", "mp3", "ogg",
    "wav", "pdf", "zip", "gz",
)  # fmt: skip
_STATIC = rf"^[^?#]*\.(?:{'|'.join(STATIC_EXTENSIONS)})(?:[?#]|$)"
# How many malformed lines of each file are listed by number.
LISTED_ERRORS = 20


class MalformedLine(ValueError):
    """A line that is not in the expected format, or not a valid event."""


class TooManyErrors(Exception):
    """More malformed lines than allowed; the batches stored before stay stored."""


# -- from lines to fields, per format --------------------------------------------------------
#
# A batch of lines becomes columns (Arrow arrays) in one go: splitting (Arrow's
# CSV reader), time parsing (numpy) and filtering run over the whole batch, and
# everything after that works on codes into the distinct values of each column,
# up to the table of hits handed to the database. A Python loop per line would
# cost more than storing the hits.


@dataclass
class Fields:
    """The fields of a batch's well-formed lines, as equally long columns."""

    number: npt.NDArray[np.int64]  # the line numbers
    address: pa.Array
    micros: npt.NDArray[np.int64]  # the time, microseconds since the Unix epoch (UTC)
    status: npt.NDArray[np.int64]
    request: pa.Array  # "GET /path HTTP/1.1"
    referrer: pa.Array  # null, "-" or "": none
    user_agent: pa.Array  # null, "-" or "": none
    host: pa.Array  # the site, where the format records it; null: not recorded

    def take(self, keep: npt.NDArray[np.bool_]) -> Fields:
        if keep.all():
            return self
        mask = pa.array(keep)
        return Fields(
            self.number[keep],
            self.address.filter(mask),
            self.micros[keep],
            self.status[keep],
            self.request.filter(mask),
            self.referrer.filter(mask),
            self.user_agent.filter(mask),
            self.host.filter(mask),
        )


Malformed = list[tuple[npt.NDArray[np.int64], str]]  # line numbers and why

# Combined and common lines are read as space-separated values with quotes and
# backslash escapes by Arrow's CSV reader (ten times faster than a regular
# expression per line); the bracketed time holds one space, so it spans two
# columns. Lines it cannot split so (extra fields after the user agent, which
# many nginx formats add) go through the regular expressions below.
_COMMON_COLUMNS = ("address", "ident", "user", "time", "zone", "request", "status", "size")
_COMBINED_COLUMNS = (*_COMMON_COLUMNS, "referrer", "agent")
_QUOTED = r'"(?P<{}>[^"\\]*(?:\\.[^"\\]*)*)"'  # a quoted field with backslash escapes
_COMMON = (
    rf"(?P<address>\S+) \S+ \S+ (?P<time>\[[^\]]*\]) {_QUOTED.format('request')} "
    r"(?P<status>\d{3}) \S+"
)
# Fields after the last one of the format (request time, upstream, ...) are ignored.
_COMMON_LINE = re.compile(_COMMON)
_COMBINED_LINE = re.compile(_COMMON + f" {_QUOTED.format('referrer')} {_QUOTED.format('agent')}")
_CLF_TIME = "[%d/%b/%Y:%H:%M:%S %z]"
_ESCAPE = re.compile(r"\\(.)")


def _read_clf(data: bytes, count: int, names: tuple[str, ...]) -> tuple[pa.Table, list[int]] | None:
    """The `count` lines of `data` as a table of `names`, and the indexes of
    those that did not split into that many values; None if the rows cannot be
    told apart."""
    unsplit: list[int] = []

    def not_split(row: pcsv.InvalidRow) -> str:
        unsplit.append(row.number - 1)
        return "skip"

    try:
        table = pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(column_names=list(names), use_threads=False),
            parse_options=pcsv.ParseOptions(
                delimiter=" ",
                quote_char='"',
                escape_char="\\",
                double_quote=False,
                ignore_empty_lines=False,
                invalid_row_handler=not_split,
            ),
            convert_options=pcsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                check_utf8=False,  # convert_lines made sure it is
                include_columns=[n for n in names if n not in ("ident", "user", "size")],
            ),
        )
    except pa.ArrowInvalid:  # e.g. a NUL byte: the slow way for this batch
        return None
    if table.num_rows + len(unsplit) != count:
        return None
    return table, unsplit


def _split_clf(
    data: bytes, numbers: npt.NDArray[np.int64], with_agent: bool
) -> tuple[Fields, Malformed]:
    names = _COMBINED_COLUMNS if with_agent else _COMMON_COLUMNS
    count = len(numbers)
    read = _read_clf(data, count, names) if count else None
    if read is None:  # every line by regular expression
        table = pa.table({n: pa.array([], pa.string()) for n in names})
        unsplit = list(range(count))
    else:
        table, unsplit = read
    lines = _split(data, count) if unsplit else []
    is_split = np.ones(count, dtype=bool)
    is_split[unsplit] = False
    columns = {
        name: table.column(name).combine_chunks()
        for name in ("address", "request", "status", "referrer", "agent")
        if name in names
    }
    micros, has_time = _clf_micros(
        table.column("time").combine_chunks(), table.column("zone").combine_chunks()
    )
    # The lines the CSV reader could not split, by regular expression.
    pattern = _COMBINED_LINE if with_agent else _COMMON_LINE
    matches = [(index, pattern.match(lines[index])) for index in unsplit]
    malformed: Malformed = [
        (numbers[[i for i, m in matches if m is None]], "not in the expected format")
    ]
    matched = [(i, m) for i, m in matches if m is not None]
    if matched:
        for name in columns:
            unescape = name in ("request", "referrer", "agent")
            values = [m[name] for _, m in matched]
            if unescape:  # as the CSV reader does
                values = [_ESCAPE.sub(r"\1", v) for v in values]
            columns[name] = pa.concat_arrays([columns[name], pa.array(values, pa.string())])
        more_micros, more_has_time = _strptime_micros(
            pa.array([m["time"] for _, m in matched], pa.string())
        )
        micros = np.concatenate([micros, more_micros])
        has_time = np.concatenate([has_time, more_has_time])
    numbers = np.concatenate([numbers[is_split], numbers[[i for i, _ in matched]]])
    rows = len(numbers)

    status, status_ok = _three_digits(columns["status"])
    well_formed = status_ok & has_time
    malformed.append((numbers[~well_formed], "bad timestamp or status"))
    fields = Fields(
        numbers,
        columns["address"],
        micros,
        status,
        columns["request"],
        columns["referrer"] if with_agent else pa.nulls(rows, pa.string()),
        columns["agent"] if with_agent else pa.nulls(rows, pa.string()),
        pa.nulls(rows, pa.string()),
    )
    return fields.take(well_formed), malformed


# -- CLF times ----------------------------------------------------------------------------
#
# Arrow's strptime costs more than the rest of a line's parsing. Nearly every
# log writes its times in one fixed layout, `[10/Oct/2000:13:55:36 -0700]`
# (split by the CSV reader at the space), so they are read digit by digit with
# numpy over the whole batch; a time in any other shape, or out of the usual
# ranges, is left to strptime, so the results are strptime's.

_MONTH_KEYS = np.array(
    [int.from_bytes(m.encode(), "big") for m in
     ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")]
)  # fmt: skip
_MONTH_DAYS = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])
# Where "[10/Oct/2000:13:55:36" has its separators.
_TIME_SEPARATORS = {0: "[", 3: "/", 7: "/", 12: ":", 15: ":", 18: ":"}
_TIME_DIGITS = [1, 2, 8, 9, 10, 11, 13, 14, 16, 17, 19, 20]


def _clf_micros(
    time: pa.Array, zone: pa.Array
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Microseconds since the epoch of each CLF time (`[10/Oct/2000:13:55:36`
    and `-0700]`; 0 where not valid), and which were valid times."""
    t, time_fits = _fixed_width(time, 21)
    z, zone_fits = _fixed_width(zone, 6)
    ok = time_fits & zone_fits
    for position, separator in _TIME_SEPARATORS.items():
        ok &= t[:, position] == ord(separator)
    ok &= ((z[:, 0] == ord("+")) | (z[:, 0] == ord("-"))) & (z[:, 5] == ord("]"))

    # The digits of day, year, hour, minute, second and zone, in that order.
    digits = np.concatenate([t[:, _TIME_DIGITS], z[:, 1:5]], axis=1) - np.uint8(ord("0"))
    ok &= (digits <= 9).all(axis=1)  # below "0" wrapped around to above 9
    values = digits.astype(np.int64)

    def number(start: int, stop: int) -> npt.NDArray[np.int64]:
        return values[:, start:stop] @ 10 ** np.arange(stop - start - 1, -1, -1)

    day, year = number(0, 2), number(2, 6)
    hour, minute, second = number(6, 8), number(8, 10), number(10, 12)
    zone_hour, zone_minute = number(12, 14), number(14, 16)
    month_key = (t[:, 4].astype(np.int64) << 16) | (t[:, 5].astype(np.int64) << 8) | t[:, 6]
    month_match = month_key[:, None] == _MONTH_KEYS[None, :]
    month = month_match.argmax(axis=1) + 1
    ok &= month_match.any(axis=1) & (year >= 1000)
    ok &= (hour <= 23) & (minute <= 59) & (second <= 59) & (zone_hour <= 23) & (zone_minute <= 59)
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    ok &= (day >= 1) & (day <= _MONTH_DAYS[month - 1] + (leap & (month == 2)))
    offset = (zone_hour * 60 + zone_minute) * np.where(z[:, 0] == ord("-"), -60, 60)
    seconds = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
    seconds -= offset
    micros = np.where(ok, seconds * 1_000_000, 0)
    if not ok.all():  # any other shape: strptime
        slow = np.flatnonzero(~ok)
        joined = pc.binary_join_element_wise(time.take(slow), zone.take(slow), " ")
        micros[slow], ok[slow] = _strptime_micros(joined)
    return micros, ok


def _three_digits(column: pa.Array) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """The number of each value that is three digits (0 elsewhere), and which are."""
    matrix, ok = _fixed_width(column, 3)
    digits = matrix.astype(np.int64) - ord("0")
    ok &= ((digits >= 0) & (digits <= 9)).all(axis=1)
    return np.where(ok, digits @ np.array([100, 10, 1]), 0), ok


def _days_from_civil(
    year: npt.NDArray[np.int64], month: npt.NDArray[np.int64], day: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Days since 1970-01-01 of proleptic Gregorian dates (years >= 0), by
    integer arithmetic: numpy's own calendar conversions cost ten times more.
    The algorithm is Howard Hinnant's `days_from_civil`."""
    year = year - (month <= 2)
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * np.where(month > 2, month - 3, month + 9) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    days: npt.NDArray[np.int64] = era * 146097 + day_of_era - 719468
    return days


def _fixed_width(
    column: pa.Array, width: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """The bytes of a string column's values as the rows of a matrix, and
    which values are `width` bytes long (the other rows hold no meaning)."""
    rows = len(column)
    if column.type != pa.string():
        column = column.cast(pa.string())
    _validity, offsets_buffer, data_buffer = column.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)[column.offset :][: rows + 1]
    fits = np.diff(offsets) == width
    if column.null_count:
        fits &= column.is_valid().to_numpy(zero_copy_only=False)
    if data_buffer is None or not fits.any():
        return np.zeros((rows, width), dtype=np.uint8), fits
    data = np.frombuffer(data_buffer, dtype=np.uint8)
    if fits.all():  # the usual case: the values lie back to back, a matrix already
        return data[offsets[0] : offsets[-1]].reshape(rows, width), fits
    starts = np.where(fits, offsets[:-1], offsets[0])
    starts = np.minimum(starts, len(data) - width)  # rows that do not fit: anywhere valid
    return data[starts[:, None] + np.arange(width)], fits


def _strptime_micros(times: pa.Array) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Microseconds since the epoch of `[10/Oct/2000:13:55:36 -0700]` times
    (0 where not valid), and which were valid."""
    micros = pc.strptime(times, format=_CLF_TIME, unit="us", error_is_null=True)
    valid = micros.is_valid().to_numpy(zero_copy_only=False)
    return pc.fill_null(micros, 0).cast(pa.int64()).to_numpy(zero_copy_only=False), valid


def _nginx_json_record(line: str) -> tuple[str, int, int, str, str | None, str | None, str | None]:
    """(address, micros, status, request, referrer, user agent, host) of one line."""
    try:
        record = json.loads(line)
    except ValueError:
        raise MalformedLine("not a JSON object") from None
    if not isinstance(record, dict):
        raise MalformedLine("not a JSON object")

    def text(name: str) -> str | None:
        value = record.get(name)
        if value is None:
            return None
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise MalformedLine(f"{name} is not a string")
        value = str(value)
        return None if value in ("", "-") else value

    address = text("remote_addr")
    if address is None:
        raise MalformedLine("no remote_addr")
    try:
        if (iso := text("time_iso8601")) is not None:
            ts = datetime.fromisoformat(iso)
            if ts.tzinfo is None:
                raise MalformedLine("time_iso8601 has no offset")
        elif (local := text("time_local")) is not None:
            ts = datetime.strptime(f"[{local}]", _CLF_TIME)
        elif (msec := text("msec")) is not None:
            ts = datetime.fromtimestamp(float(msec), UTC)
        else:
            raise MalformedLine("no time_iso8601, time_local or msec")
    except (ValueError, OverflowError, OSError):
        raise MalformedLine("bad timestamp") from None
    request = text("request")
    if request is None:
        method, uri = text("request_method"), text("request_uri")
        if method is None or uri is None:
            raise MalformedLine("no request (or request_method and request_uri)")
        request = f"{method} {uri} HTTP/1.1"
    status = text("status")
    if status is None or not status.isdigit():
        raise MalformedLine("no numeric status")
    return (
        address,
        _micros(ts),
        int(status),
        request,
        text("http_referer"),
        text("http_user_agent"),
        text("host") or text("server_name"),
    )


def _split_nginx_json(data: bytes, numbers: npt.NDArray[np.int64]) -> tuple[Fields, Malformed]:
    lines = _split(data, len(numbers))
    records = []
    good = np.ones(len(lines), dtype=bool)
    malformed: Malformed = []
    for index, line in enumerate(lines):
        try:
            records.append(_nginx_json_record(line))
        except MalformedLine as exc:
            good[index] = False
            malformed.append((numbers[index : index + 1], str(exc)))
    columns = list(zip(*records, strict=True)) or [()] * 7
    fields = Fields(
        numbers[good],
        pa.array(columns[0], pa.string()),
        np.array(columns[1], dtype=np.int64),
        np.array(columns[2], dtype=np.int64),
        pa.array(columns[3], pa.string()),
        pa.array(columns[4], pa.string()),
        pa.array(columns[5], pa.string()),
        pa.array(columns[6], pa.string()),
    )
    return fields, malformed


def _split(data: bytes, count: int) -> list[str]:
    """The `count` lines of `data`; split("\n") rather than splitlines(), which
    also splits at characters a line may hold (\x1c, \u2028, ...)."""
    lines = data.decode("utf-8").split("\n")
    return lines[:count]


def split_lines(
    log_format: str, data: bytes, numbers: npt.NDArray[np.int64]
) -> tuple[Fields, Malformed]:
    """The fields of each well-formed line of `data` (valid UTF-8, one line per
    number in `numbers`), and the malformed lines."""
    if log_format == "combined":
        return _split_clf(data, numbers, with_agent=True)
    if log_format == "common":
        return _split_clf(data, numbers, with_agent=False)
    if log_format == "nginx-json":
        return _split_nginx_json(data, numbers)
    raise ValueError(f"unknown log format {log_format!r}")


# -- what to keep ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportOptions:
    log_format: str = "combined"
    site: str | None = None  # default: the log's host (nginx-json), else TELEMETRY_DEFAULT_SITE
    include_static: bool = False
    all_methods: bool = False
    all_statuses: bool = False
    max_errors: int = 100


# -- hashing keys -----------------------------------------------------------------------------


class ImportKeys:
    """The hashing key of each imported hit's period (see the module docstring)."""

    def __init__(self, engine: Engine, mode: str, grace: timedelta, now: datetime) -> None:
        self._engine = engine
        self.mode = mode
        self._grace = grace
        self._now = now
        self._keys: dict[str, bytes] = {}
        self.one_off_periods: set[str] = set()

    def key_for(self, micros: int) -> bytes:
        """The key of the period holding `micros` (microseconds since the epoch)."""
        period, _start, end = period_bounds(self.mode, _EPOCH + timedelta(microseconds=micros))
        if period not in self._keys:
            expires = None if end is None else end + self._grace
            if expires is not None and expires <= self._now:
                self._keys[period] = secrets.token_bytes(32)
                self.one_off_periods.add(period)
            else:
                self._keys[period] = get_or_create_salt(self._engine, period, expires)
        return self._keys[period]

    def period_codes(self, micros: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """A number per hit that is the same for hits of the same period."""
        if self.mode == "none":
            return np.zeros(len(micros), dtype=np.int64)
        unit = "D" if self.mode == "daily" else "M"
        return micros.astype("datetime64[us]").astype(f"datetime64[{unit}]").astype(np.int64)


# -- the import -----------------------------------------------------------------------------


@dataclass
class FileReport:
    path: str
    lines: int = 0
    stored: int = 0
    already_imported: int = 0  # lines of batches a previous import stored
    skipped: Counter[str] = field(default_factory=Counter)  # left out, by reason
    malformed: int = 0
    listed: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


@dataclass
class ImportReport:
    files: list[FileReport] = field(default_factory=list)
    one_off_periods: set[str] = field(default_factory=set)
    first: datetime | None = None  # time range of the stored hits
    last: datetime | None = None
    refreshed: list[aggregates.Refreshed] = field(default_factory=list)

    @property
    def stored(self) -> int:
        return sum(f.stored for f in self.files)

    @property
    def malformed(self) -> int:
        return sum(f.malformed for f in self.files)


@dataclass
class _Distinct:
    """A column as a code per row into its distinct values; code `len(values)`
    stands for null."""

    codes: npt.NDArray[np.intp]
    values: pa.Array

    @classmethod
    def of(cls, column: pa.Array) -> _Distinct:
        encoded = pc.dictionary_encode(column)
        codes = pc.fill_null(encoded.indices, len(encoded.dictionary))
        return cls(codes.to_numpy(zero_copy_only=False).astype(np.intp), encoded.dictionary)

    def per_row(self, per_value: pa.Array, for_null: bool) -> npt.NDArray[np.bool_]:
        """A flag per row, from one per distinct value and one for null."""
        flags = np.append(per_value.to_numpy(zero_copy_only=False), [for_null]).astype(bool)
        return flags[self.codes]

    def used(self, rows: npt.NDArray[np.bool_]) -> list[bool]:
        """Which distinct values (and null, last) `rows` hold."""
        used = np.zeros(len(self.values) + 1, dtype=bool)
        used[self.codes[rows]] = True
        result: list[bool] = used.tolist()
        return result


def _pairs(
    first: npt.NDArray[np.intp], second: npt.NDArray[np.intp], wanted: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """The distinct (first, second) pairs of the `wanted` rows, as the firsts
    and the seconds of the pairs, and a code per row into them (0 for rows
    not wanted). Both arguments are codes >= 0."""
    span = int(second.max(initial=0)) + 1
    codes = np.zeros(len(first), dtype=np.intp)
    pair_codes, keys = pd.factorize(first[wanted] * span + second[wanted])
    codes[wanted] = pair_codes
    return codes, keys // span, keys % span


def _dictionary(
    codes: npt.NDArray[np.intp], values: Sequence[object], value_type: pa.DataType | None = None
) -> pa.DictionaryArray:
    values_array = pa.array(values, value_type or pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), values_array)


def _remember(memo: dict[Any, Any], key: object, value: object) -> None:
    """Memoise, within bounds: a log with ever new values must not exhaust memory."""
    if len(memo) >= 100_000:
        memo.clear()
    memo[key] = value


class LogImporter:
    """Turns log lines into hits and stores them, batch by batch."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        options: ImportOptions,
        *,
        now: datetime | None = None,
        raw_hits_from: datetime | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.options = options
        self.now = now or datetime.now(UTC)
        # Hits older than raw retention would be deleted at once, and never aggregated.
        self.raw_hits_from = raw_hits_from
        self.keys = ImportKeys(
            engine, settings.hash_period, timedelta(hours=settings.salt_grace_hours), self.now
        )
        self.report = ImportReport()
        self._allowlist = frozenset(settings.query_allowlist)
        # Validation results of distinct values, across batches.
        self._page_memo: dict[tuple[str, str | None], tuple[str, str, bool]] = {}
        self._referrer_memo: dict[str, tuple[str | None, bool]] = {}
        self._agent_memo: dict[str, tuple[str | None, bool]] = {}
        # ip_hash by address and period (a visitor's lines fall in many batches);
        # in memory only, for this run, as the addresses of the log are.
        self._hash_memo: dict[int, dict[str, bytes]] = {}  # by period (code), then address
        self._hash_memo_size = 0
        self._latest_micros = _micros(self.now + MAX_FUTURE)
        self._oldest_micros = _micros(raw_hits_from) if raw_hits_from else np.iinfo(np.int64).min

    def convert_lines(
        self, data: bytes, count: int, first_number: int, report: FileReport
    ) -> pa.Table:
        """The hits of the `count` lines in `data` (numbered from `first_number`),
        as a table of `HIT_COLUMNS` (see `db.bulk.arrow_copy_text`). Malformed
        lines are counted in `report`; past --max-errors, TooManyErrors."""
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            data = data.decode("utf-8", "replace").encode("utf-8")
        numbers = np.arange(first_number, first_number + count, dtype=np.int64)
        fields, malformed = split_lines(self.options.log_format, data, numbers)
        hits = self._to_hits(fields, report, malformed)
        found = sorted((int(number), reason) for numbers, reason in malformed for number in numbers)
        report.malformed += len(found)
        report.listed.extend(found[: LISTED_ERRORS - len(report.listed)])
        # `report` is one of self.report's files (or, for a dry conversion, not).
        counted = any(f is report for f in self.report.files)
        total = self.report.malformed + (0 if counted else report.malformed)
        if total > self.options.max_errors and found:
            raise TooManyErrors(
                f"more than {self.options.max_errors} malformed lines (--max-errors); "
                f"stopped in the batch of lines {first_number} to "
                f"{first_number + count - 1} of {report.path}, which was not stored"
            )
        return hits

    def _to_hits(self, fields: Fields, report: FileReport, malformed: Malformed) -> pa.Table:
        """Filter, validate, hash and classify: per row only numpy and Arrow
        work on codes; Python runs once per distinct value."""
        options = self.options
        remaining = np.ones(len(fields.number), dtype=bool)

        def drop(where: npt.NDArray[np.bool_], skipped: str | None, reason: str = "") -> None:
            nonlocal remaining
            where = where & remaining
            if skipped is not None:
                report.skipped[skipped] += int(where.sum())
            else:
                malformed.append((fields.number[where], reason))
            remaining &= ~where

        drop(fields.micros > self._latest_micros, None, "timestamp in the future")
        # Years before 1000 cannot be written as the backends' timestamp text.
        drop(fields.micros < _FIRST_MICROS, None, "bad timestamp")
        if not options.all_statuses:
            drop((fields.status < 200) | (fields.status >= 400), "status")
        # The request line's method and target, once per distinct line.
        request = _Distinct.of(fields.request)
        parsed = pc.extract_regex(request.values, r"^(?P<method>\S+) (?P<target>\S+)")
        drop(~request.per_row(parsed.is_valid(), False), None, "no request target")
        target = pc.struct_field(parsed, "target")
        if not options.all_methods:
            is_get = pc.equal(pc.struct_field(parsed, "method"), "GET").fill_null(False)
            drop(~request.per_row(is_get, False), "method")
        if not options.include_static:
            static = pc.match_substring_regex(target, _STATIC, ignore_case=True)
            drop(request.per_row(static.fill_null(False), False), "static")
        drop(fields.micros < self._oldest_micros, "older than retention")

        # Validation, hashing and classification run once per distinct value.
        if options.site:
            site = _Distinct(np.zeros(len(fields.number), dtype=np.intp), pa.array([options.site]))
        else:
            site = _Distinct.of(fields.host)
        page_codes, sites, paths, bad_pages = self._pages(request, target, site, remaining)
        drop(bad_pages[page_codes], None, "bad page address")
        referrer = _Distinct.of(fields.referrer)
        referrers, bad = self._validate(referrer, remaining, self._referrer, self._referrer_memo)
        drop(bad[referrer.codes], None, "bad referrer")
        agent = _Distinct.of(fields.user_agent)
        user_agents, _ = self._validate(agent, remaining, self._user_agent, self._agent_memo)
        hash_codes, hashes, bad_hashes = self._hashes(fields.address, fields.micros, remaining)
        drop(bad_hashes[hash_codes], None, "the client address is not an IP address")

        keep = remaining
        # Browser, OS, device and bot flag: once per distinct user agent.
        agents = [classify(value) for value in user_agents]
        agent_codes = agent.codes[keep]
        return pa.table(
            {
                "ts": pa.array(fields.micros[keep], pa.timestamp("us", tz="UTC")),
                "site": _dictionary(page_codes[keep], sites),
                "path": _dictionary(page_codes[keep], paths),
                "referrer": _dictionary(referrer.codes[keep], referrers),
                "ip_hash": _dictionary(hash_codes[keep], hashes.tolist(), pa.binary()),
                "user_agent": _dictionary(agent_codes, user_agents),
                "browser": _dictionary(agent_codes, [a.browser for a in agents]),
                "os": _dictionary(agent_codes, [a.os for a in agents]),
                "device": _dictionary(agent_codes, [a.device for a in agents]),
                "is_bot": pa.array(np.array([a.is_bot for a in agents], dtype=bool)[agent_codes]),
            }
        )

    # Validation is /track's own (api.events.parse_event), one field at a time:
    # it is a pure function of each field.
    def _event(self, item: dict[str, object], user_agent: str | None = None) -> Event:
        context = RequestContext(
            _EPOCH, user_agent, None, self.settings.default_site, self._allowlist
        )
        return parse_event(item, context)

    def _pages(
        self, request: _Distinct, target: pa.Array, site: _Distinct, rows: npt.NDArray[np.bool_]
    ) -> tuple[npt.NDArray[np.intp], list[str], list[str], npt.NDArray[np.bool_]]:
        """The distinct pages (request line and site) of `rows`, validated: a
        code per row, and the site, path and badness of each page."""
        codes, target_codes, site_codes = _pairs(request.codes, site.codes, rows)
        targets = target.to_pylist()
        site_values = [*site.values.to_pylist(), None]
        found: list[tuple[str, str, bool]] = []  # site, path, bad
        for target_code, site_code in zip(target_codes.tolist(), site_codes.tolist(), strict=True):
            raw_target, raw_site = targets[target_code] or "", site_values[site_code]
            page = self._page_memo.get((raw_target, raw_site))
            if page is None:
                page = self._page(raw_target, raw_site)
                _remember(self._page_memo, (raw_target, raw_site), page)
            found.append(page)
        sites = [page[0] for page in found]
        paths = [page[1] for page in found]
        return codes, sites, paths, np.array([page[2] for page in found] or [False], dtype=bool)

    def _page(self, target: str, site: str | None) -> tuple[str, str, bool]:
        item: dict[str, object] = {"path" if target.startswith("/") else "url": target}
        if site is not None:
            item["site"] = site
        try:
            event = self._event(item)
        except InvalidEvent:
            return ("", "", True)
        return (event.site, event.path, False)

    def _referrer(self, referrer: str) -> str | None:
        return self._event({"path": "/", "referrer": referrer}).referrer

    def _user_agent(self, user_agent: str) -> str | None:
        return self._event({"path": "/"}, user_agent).user_agent

    @staticmethod
    def _validate(
        column: _Distinct,
        rows: npt.NDArray[np.bool_],
        validate: Callable[[str], str | None],
        memo: dict[str, tuple[str | None, bool]],
    ) -> tuple[list[str | None], npt.NDArray[np.bool_]]:
        """`validate` applied to each distinct value `rows` hold, memoised: the
        result and badness of each value and of null, last (null, "-" and ""
        are none; so are values no row of `rows` holds)."""
        values: list[str | None] = []
        bad: list[bool] = []
        distinct = [*column.values.to_pylist(), None]
        for value, used in zip(distinct, column.used(rows), strict=True):
            result: tuple[str | None, bool] = (None, False)
            if used and value not in (None, "-", ""):
                found = memo.get(value)
                if found is None:
                    try:
                        found = (validate(value), False)
                    except InvalidEvent:
                        found = (None, True)
                    _remember(memo, value, found)
                result = found
            values.append(result[0])
            bad.append(result[1])
        return values, np.array(bad, dtype=bool)

    def _hashes(
        self, address: pa.Array, micros: npt.NDArray[np.int64], rows: npt.NDArray[np.bool_]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.object_], npt.NDArray[np.bool_]]:
        """`ip_hash` of `rows`, once per address and period: a code per row, and
        the hash and badness (not an IP address) of each code."""
        addresses = _Distinct.of(address)
        period_codes, periods = pd.factorize(self.keys.period_codes(micros))
        codes, address_codes, pair_periods = _pairs(addresses.codes, period_codes, rows)
        address_values = pa.concat_arrays([addresses.values, pa.array([""])])
        hashes = np.empty(len(address_codes), dtype=object)
        # A period at a time (a batch spans one or two): its known hashes by
        # address, then the new ones.
        for period_code in np.unique(pair_periods).tolist():
            in_period = np.flatnonzero(pair_periods == period_code)
            known = self._hash_memo.setdefault(int(periods[period_code]), {})
            period_addresses = address_values.take(address_codes[in_period]).to_pylist()
            found = [known.get(a) for a in period_addresses]
            key: KeyedHash | None = None
            for index, value in enumerate(found):
                if value is not None:
                    continue
                if key is None:
                    key = KeyedHash(self.keys.key_for(int(micros[period_codes == period_code][0])))
                try:
                    packed = normalise_address(period_addresses[index])
                except ValueError:
                    value = b""  # not an address
                else:
                    value = key(packed)
                found[index] = known[period_addresses[index]] = value
                self._hash_memo_size += 1
            hashes[in_period] = found
        if self._hash_memo_size > 200_000:  # within bounds, as _remember
            self._hash_memo.clear()
            self._hash_memo_size = 0
        bad = np.array([not value for value in hashes.tolist()] or [False], dtype=bool)
        return codes, hashes, bad

    def import_file(self, path: Path, progress: tqdm | None = None) -> FileReport:
        report = FileReport(str(path))
        self.report.files.append(report)
        # One thread stores a batch while this one converts the next: the
        # database works while Python parses (sqlite3 and psycopg release the GIL).
        with path.open("rb") as raw, ThreadPoolExecutor(1, "telemetry-import") as writer:
            lines = _LineReader(raw)
            first = lines.peek_line()
            if not first:
                return report
            tag = hashlib.sha256(first).hexdigest()[:16]
            prefix = f"import:{tag}:"
            known = stored_batch_keys(self.engine, prefix)
            # Where earlier imports ended batches: end one there too.
            ends = sorted({int(key.split(":")[2]) for key in known})
            digest = hashlib.sha256()
            storing: _Storing | None = None
            number = 0
            position = 0
            try:
                while True:
                    stop = (number // BATCH_LINES + 1) * BATCH_LINES
                    stop = min([stop, *(end for end in ends if end > number)])
                    data, count = lines.read(stop - number)
                    if not count:
                        break
                    number += count
                    digest.update(data)
                    if progress is not None:
                        progress.update(raw.tell() - position)
                        position = raw.tell()
                    key = f"{prefix}{number}:{digest.hexdigest()[:16]}"
                    if key in known:
                        report.already_imported += count
                        continue
                    hits = self.convert_lines(data, count, number - count + 1, report)
                    if storing is not None:
                        self._stored(storing, report)
                    storing = self._store(writer, key, hits, count)
            finally:
                if storing is not None:
                    self._stored(storing, report)
        report.lines = number
        return report

    def _store(self, writer: Executor, key: str, hits: pa.Table, lines: int) -> _Storing:
        """Hand a batch to the writer."""
        first = last = None
        if hits.num_rows:
            bounds = pc.min_max(hits.column("ts"))
            first, last = bounds["min"].as_py(), bounds["max"].as_py()
        # Formatted here, so that the writer's time goes to the database alone.
        formatted = format_hits(self.engine, hits)
        stored = writer.submit(store_batch, self.engine, key, last or self.now, formatted)
        return _Storing(stored, hits.num_rows, lines, first, last)

    def _stored(self, storing: _Storing, report: FileReport) -> None:
        """Wait for a batch to be stored, and count it."""
        if not storing.stored.result():
            report.already_imported += storing.lines  # a concurrent import stored it
            return
        report.stored += storing.rows
        if storing.first is not None and storing.last is not None:
            self.report.first = min(self.report.first or storing.first, storing.first)
            self.report.last = max(self.report.last or storing.last, storing.last)

    def import_files(self, paths: Sequence[Path], *, progress: bool = True) -> ImportReport:
        """Import every file, then recompute the aggregate buckets the new hits fall in."""
        total = sum(p.stat().st_size for p in paths)
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="import", disable=not progress or None
        ) as bar:
            try:
                for path in paths:
                    self.import_file(path, bar)
            finally:
                self.report.one_off_periods = self.keys.one_off_periods
                self._refresh()
        return self.report

    def _refresh(self) -> None:
        if self.report.first is None or self.report.last is None:
            return
        self.report.refreshed = aggregates.refresh(
            self.engine,
            self.report.first,
            self.report.last + timedelta(microseconds=1),
            now=self.now,
            raw_hits_from=self.raw_hits_from,
        )


@dataclass
class _Storing:
    """A batch handed to the writer."""

    stored: Future[bool]  # False: the batch's key was there already
    rows: int
    lines: int
    first: datetime | None  # time range of its hits
    last: datetime | None


class _LineReader:
    """The lines of a plain or gzipped file (told apart by gzip's magic
    number), many at a time: a batch of lines is read as one `bytes` cut
    after its last newline (found by numpy), not as a `bytes` per line."""

    BLOCK = 1 << 20

    def __init__(self, raw: io.BufferedReader) -> None:
        self._stream: io.BufferedIOBase = raw
        if raw.peek(2)[:2] == b"\x1f\x8b":
            self._stream = gzip.GzipFile(fileobj=raw)
        self._pending = b""

    def peek_line(self) -> bytes:
        """The first line not read yet (with its newline), left to be read."""
        line, _count = self.read(1)
        self._pending = line + self._pending
        return line

    def read(self, count: int) -> tuple[bytes, int]:
        """The next `count` lines (fewer at the end of the file), and how many.
        A last line without a newline counts as a line."""
        parts: list[bytes] = []
        found = 0
        block, self._pending = self._pending, b""
        while True:
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == ord("\n"))
            if found + len(newlines) >= count:
                end = int(newlines[count - found - 1]) + 1
                parts.append(block[:end])
                self._pending = block[end:]
                return b"".join(parts), count
            parts.append(block)
            found += len(newlines)
            block = self._stream.read(self.BLOCK)
            if not block:
                data = b"".join(parts)
                return data, found + (1 if data and not data.endswith(b"\n") else 0)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FIRST_MICROS = (datetime(1000, 1, 1, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)


def _micros(ts: datetime) -> int:
    return (ts - _EPOCH) // timedelta(microseconds=1)
