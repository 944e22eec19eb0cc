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

import contextlib
import gzip
import hashlib
import io
import itertools
import json
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from sqlalchemy import Engine
from tqdm import tqdm

from api.events import MAX_FUTURE, Event, InvalidEvent, RequestContext, parse_event
from api.privacy import keyed_hash, normalise_address, period_bounds
from api.settings import Settings
from api.useragent import classify
from db import aggregates
from db.bulk import HitChunk
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
# A batch of lines becomes columns (Arrow arrays) in one go: splitting, time
# parsing and filtering run in Arrow's C++ over the whole batch, and everything
# after that works on the distinct values of each column. A Python loop per
# line would cost more than storing the hits.


@dataclass
class Fields:
    """The fields of a batch's well-formed lines, as equally long columns."""

    number: npt.NDArray[np.int64]  # the line numbers
    address: pa.Array
    micros: npt.NDArray[np.int64]  # the time, microseconds since the Unix epoch (UTC)
    status: npt.NDArray[np.int64]
    request: pa.Array  # "GET /path HTTP/1.1"
    referrer: pa.Array  # null: none
    user_agent: pa.Array  # null: none
    host: pa.Array  # the site, where the format records it; null: not recorded

    def take(self, keep: npt.NDArray[np.bool_]) -> Fields:
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


def _none_for_dash(column: pa.Array) -> pa.Array:
    """`-` and empty fields are absent ones."""
    absent = pc.or_(pc.equal(column, "-"), pc.equal(column, ""))
    return pc.if_else(absent, pa.scalar(None, pa.string()), column)


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
    columns["time"] = pc.binary_join_element_wise(
        table.column("time").combine_chunks(), table.column("zone").combine_chunks(), " "
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
    numbers = np.concatenate([numbers[is_split], numbers[[i for i, _ in matched]]])
    rows = len(numbers)

    status_ok = pc.match_substring_regex(columns["status"], r"^\d{3}$")
    micros = pc.strptime(columns["time"], format=_CLF_TIME, unit="us", error_is_null=True)
    well_formed = pc.and_(status_ok, micros.is_valid()).to_numpy(zero_copy_only=False)
    malformed.append((numbers[~well_formed], "bad timestamp or status"))
    status = pc.if_else(status_ok, columns["status"], "0")
    fields = Fields(
        numbers,
        columns["address"],
        pc.fill_null(micros, 0).cast(pa.int64()).to_numpy(),
        pc.cast(status, pa.int64()).to_numpy(),
        columns["request"],
        _none_for_dash(columns["referrer"]) if with_agent else pa.nulls(rows, pa.string()),
        _none_for_dash(columns["agent"]) if with_agent else pa.nulls(rows, pa.string()),
        pa.nulls(rows, pa.string()),
    )
    return fields.take(well_formed), malformed


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


def _encode(column: pa.Array) -> tuple[npt.NDArray[np.int64], list[str | None]]:
    """Codes per row and the distinct values they point at (the last one None, for nulls)."""
    encoded = (
        pc.dictionary_encode(column).combine_chunks()
        if isinstance(column, pa.ChunkedArray)
        else pc.dictionary_encode(column)
    )
    uniques: list[str | None] = [*encoded.dictionary.to_pylist(), None]
    codes = pc.fill_null(encoded.indices, len(uniques) - 1).to_numpy(zero_copy_only=False)
    return codes.astype(np.int64), uniques


def _remember(memo: dict[Any, Any], key: object, value: object) -> None:
    """Memoise, within bounds: a log with ever new values must not exhaust memory."""
    if len(memo) >= 100_000:
        memo.clear()
    memo[key] = value


def _objects(values: Sequence[object]) -> npt.NDArray[np.object_]:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


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
        self._latest_micros = _micros(self.now + MAX_FUTURE)
        self._oldest_micros = _micros(raw_hits_from) if raw_hits_from else np.iinfo(np.int64).min

    def convert_lines(
        self, data: bytes, count: int, first_number: int, report: FileReport
    ) -> HitChunk:
        """The hits of the `count` lines in `data` (numbered from `first_number`).
        Malformed lines are counted in `report`; past --max-errors, TooManyErrors."""
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            data = data.decode("utf-8", "replace").encode("utf-8")
        numbers = np.arange(first_number, first_number + count, dtype=np.int64)
        fields, malformed = split_lines(self.options.log_format, data, numbers)
        chunk = self._to_hits(fields, report, malformed)
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
        return chunk

    def _to_hits(self, fields: Fields, report: FileReport, malformed: Malformed) -> HitChunk:
        """Filter, validate, hash and classify, a column at a time."""
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
        if not options.all_statuses:
            drop((fields.status < 200) | (fields.status >= 400), "status")
        request = pc.extract_regex(fields.request, r"^(?P<method>\S+) (?P<target>\S+)")
        drop(~request.is_valid().to_numpy(zero_copy_only=False), None, "no request target")
        method = pc.fill_null(request.field("method"), "")
        target = pc.fill_null(request.field("target"), "/")
        if not options.all_methods:
            drop(~pc.equal(method, "GET").to_numpy(zero_copy_only=False), "method")
        if not options.include_static:
            static = pc.match_substring_regex(target, _STATIC, ignore_case=True)
            drop(static.to_numpy(zero_copy_only=False), "static")
        drop(fields.micros < self._oldest_micros, "older than retention")

        # Validation, hashing and classification run once per distinct value.
        site_column = (
            pa.array([options.site] * len(fields.number), pa.string())
            if options.site
            else fields.host
        )
        site, path, bad_page = self._pages(target, site_column)
        drop(bad_page, None, "bad page address")
        codes, referrers, bad = self._distinct(fields.referrer, self._referrer, self._referrer_memo)
        referrer = referrers[codes]
        drop(bad[codes], None, "bad referrer")
        agent_codes, user_agents, _ = self._distinct(
            fields.user_agent, self._user_agent, self._agent_memo
        )
        ip_hash, bad_address = self._hashes(fields.address, fields.micros, remaining)
        drop(bad_address, None, "the client address is not an IP address")

        keep = remaining
        # Browser, OS, device and bot flag: once per distinct user agent.
        agents = [classify(agent) for agent in user_agents.tolist()]
        agent_codes = agent_codes[keep]
        return HitChunk(
            ts=fields.micros[keep].astype("datetime64[us]"),
            site=site[keep],
            path=path[keep],
            referrer=referrer[keep],
            ip_hash=ip_hash[keep],
            user_agent=user_agents[agent_codes],
            browser=_objects([a.browser for a in agents])[agent_codes],
            os=_objects([a.os for a in agents])[agent_codes],
            device=_objects([a.device for a in agents])[agent_codes],
            is_bot=np.array([a.is_bot for a in agents], dtype=bool)[agent_codes],
        )

    # Validation is /track's own (api.events.parse_event), one field at a time:
    # it is a pure function of each field.
    def _event(self, item: dict[str, object], user_agent: str | None = None) -> Event:
        context = RequestContext(
            _EPOCH, user_agent, None, self.settings.default_site, self._allowlist
        )
        return parse_event(item, context)

    def _pages(
        self, target: pa.Array, site: pa.Array
    ) -> tuple[npt.NDArray[np.object_], npt.NDArray[np.object_], npt.NDArray[np.bool_]]:
        target_codes, targets = _encode(target)
        site_codes, sites = _encode(site)
        pairs, inverse = np.unique(target_codes * len(sites) + site_codes, return_inverse=True)
        found: list[tuple[str, str, bool]] = []  # site, path, bad
        for pair in pairs.tolist():
            raw_target, raw_site = targets[pair // len(sites)] or "", sites[pair % len(sites)]
            page = self._page_memo.get((raw_target, raw_site))
            if page is None:
                page = self._page(raw_target, raw_site)
                _remember(self._page_memo, (raw_target, raw_site), page)
            found.append(page)
        site_of, path_of, bad = zip(*found, strict=True) if found else ((), (), ())
        return (
            _objects(site_of)[inverse],
            _objects(path_of)[inverse],
            np.array(bad, dtype=bool)[inverse],
        )

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
    def _distinct(
        column: pa.Array,
        validate: Callable[[str], str | None],
        memo: dict[str, tuple[str | None, bool]],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.object_], npt.NDArray[np.bool_]]:
        """`validate` applied to each distinct value (nulls stay None), memoised:
        the code of each row's value, and the result and badness of each value."""
        codes, uniques = _encode(column)
        found: list[tuple[str | None, bool]] = []  # value, bad
        for value in uniques:
            if value is None:
                found.append((None, False))
                continue
            result = memo.get(value)
            if result is None:
                try:
                    result = (validate(value), False)
                except InvalidEvent:
                    result = (None, True)
                _remember(memo, value, result)
            found.append(result)
        values, bad = zip(*found, strict=True)
        return codes, _objects(values), np.array(bad, dtype=bool)

    def _hashes(
        self, address: pa.Array, micros: npt.NDArray[np.int64], wanted: npt.NDArray[np.bool_]
    ) -> tuple[npt.NDArray[np.object_], npt.NDArray[np.bool_]]:
        """`ip_hash` per row (rows not `wanted` get none), once per address and period."""
        address_codes, addresses = _encode(address)
        periods = self.keys.period_codes(micros)
        period_list, period_first, period_index = np.unique(
            periods, return_index=True, return_inverse=True
        )
        keys = [self.keys.key_for(int(micros[row])) for row in period_first.tolist()]
        span = len(period_list)
        combined = np.where(wanted, address_codes * span + period_index, -1)
        pairs, inverse = np.unique(combined, return_inverse=True)
        hashes: list[bytes] = []
        bad: list[bool] = []
        for pair in pairs.tolist():
            packed = None
            if pair >= 0:
                with contextlib.suppress(ValueError):  # bad: reported below
                    packed = normalise_address(addresses[pair // span] or "")
            hashes.append(b"" if packed is None else keyed_hash(keys[pair % span], packed))
            bad.append(pair >= 0 and packed is None)
        return _objects(hashes)[inverse], np.array(bad, dtype=bool)[inverse]

    def import_file(self, path: Path, progress: tqdm | None = None) -> FileReport:
        report = FileReport(str(path))
        self.report.files.append(report)
        # One thread stores a batch while this one converts the next: the
        # database works while Python parses (sqlite3 and psycopg release the GIL).
        with path.open("rb") as raw, ThreadPoolExecutor(1, "telemetry-import") as writer:
            lines = _lines(raw)
            first = next(lines, None)
            if first is None:
                return report
            lines = _chain(first, lines)
            tag = hashlib.sha256(first).hexdigest()[:16]
            prefix = f"import:{tag}:"
            known = stored_batch_keys(self.engine, prefix)
            # Where earlier imports ended batches: end one there too.
            ends = sorted({int(key.split(":")[2]) for key in known})
            digest = hashlib.sha256()
            storing: Future[None] | None = None
            number = 0
            position = 0
            try:
                while True:
                    stop = (number // BATCH_LINES + 1) * BATCH_LINES
                    stop = min([stop, *(end for end in ends if end > number)])
                    batch = list(itertools.islice(lines, stop - number))
                    if not batch:
                        break
                    number += len(batch)
                    data = b"".join(batch)
                    digest.update(data)
                    key = f"{prefix}{number}:{digest.hexdigest()[:16]}"
                    storing = self._next_batch(
                        writer, storing, key, data, len(batch), known, report
                    )
                    if progress is not None:
                        progress.update(raw.tell() - position)
                        position = raw.tell()
            finally:
                if storing is not None:
                    storing.result()
        report.lines = number
        return report

    def _next_batch(
        self,
        writer: ThreadPoolExecutor,
        storing: Future[None] | None,
        key: str,
        data: bytes,
        count: int,
        known: set[str],
        report: FileReport,
    ) -> Future[None] | None:
        """Convert a batch (unless an earlier import stored it), wait for the
        previous batch to be stored, and hand this one to the writer."""
        if key in known:
            report.already_imported += count
            return storing
        end = int(key.split(":")[2])
        chunk = self.convert_lines(data, count, end - count + 1, report)
        if storing is not None:
            storing.result()
        return writer.submit(self._store, key, chunk, count, report)

    def _store(self, key: str, chunk: HitChunk, lines: int, report: FileReport) -> None:
        first = last = None
        if len(chunk):
            first, last = _aware(chunk.ts.min()), _aware(chunk.ts.max())
        if not store_batch(self.engine, key, last or self.now, chunk):
            report.already_imported += lines  # a concurrent import stored it
            return
        report.stored += len(chunk)
        if first is not None and last is not None:
            self.report.first = min(self.report.first or first, first)
            self.report.last = max(self.report.last or last, last)

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


def _lines(raw: io.BufferedReader) -> Iterator[bytes]:
    """The lines of a plain or gzipped file (told apart by gzip's magic number)."""
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return iter(gzip.GzipFile(fileobj=raw))
    return iter(raw)


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    return itertools.chain((first,), rest)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FOREVER = 2**63 - 1  # in microseconds: past any period


def _micros(ts: datetime) -> int:
    return (ts - _EPOCH) // timedelta(microseconds=1)


def _aware(value: np.datetime64) -> datetime:
    return _EPOCH + timedelta(microseconds=int(value.astype("datetime64[us]").astype(np.int64)))
