"""Validation of incoming events: from untrusted JSON to a clean `Event`.

Pure functions with no Flask or database in them, so they are cheap on the hot
path and easy to test exhaustively.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit

from db.models import EVENT_ID_MAX, PATH_MAX, REFERRER_MAX, SITE_MAX, USER_AGENT_MAX

MAX_PAST = timedelta(hours=48)
MAX_FUTURE = timedelta(minutes=5)
FIELDS = frozenset({"url", "path", "site", "referrer", "ts", "event_id", "ua"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Control characters, and the lone UTF-16 surrogates JSON can carry ("\ud800"),
# which no database can store as UTF-8: one pattern, one scan per field.
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_EVENT_ID = re.compile(r"[A-Za-z0-9._:\-]+")


class InvalidEvent(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class Event(NamedTuple):
    # A NamedTuple, not a frozen dataclass: built once per event on the hot path,
    # where a frozen dataclass's __init__ costs several times a tuple's.
    ts: datetime
    site: str
    path: str
    referrer: str | None
    user_agent: str | None
    event_id: str | None


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the request, rather than the event, tells about it."""

    now: datetime
    user_agent: str | None
    origin_host: str | None
    default_site: str
    query_allowlist: frozenset[str]


def _text(value: object, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidEvent(field, "must be a string")
    if not value:
        raise InvalidEvent(field, "must not be empty")
    if len(value) > limit:
        raise InvalidEvent(field, f"longer than {limit} characters")
    if _UNSTORABLE.search(value):
        if _CONTROL.search(value):
            raise InvalidEvent(field, "contains control characters")
        raise InvalidEvent(field, "contains a lone surrogate (not valid Unicode)")
    return value


# Pages repeat (within a batch, and across requests for the popular ones), and
# their parsing is most of an event's validation: results are cached. A raising
# call is not cached, so a bad page costs its parse every time.
@functools.lru_cache(maxsize=4096)
def clean_path(raw: str, allowlist: frozenset[str], field: str = "path") -> str:
    """Drop the fragment and every query parameter not on the allow-list."""
    path, _, query = raw.partition("#")[0].partition("?")
    if not path.startswith("/"):
        raise InvalidEvent(field, "must start with /")
    # Parsing the query is the costly part: skip it unless a kept name occurs in it.
    if query and any(name in query for name in allowlist):
        kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k in allowlist]
        if kept:
            cleaned = f"{path}?{urlencode(kept)}"
            if len(cleaned) > PATH_MAX:  # percent-encoding can triple the query's length
                raise InvalidEvent(field, f"longer than {PATH_MAX} characters once encoded")
            return cleaned
    return path


@functools.lru_cache(maxsize=4096)
def _split_url(url: str) -> tuple[str, str]:
    """The host and the path (with its query) of a page address (cached: see clean_path)."""
    _text(url, "url", PATH_MAX)
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: "http://[::1/"
        raise InvalidEvent("url", "is not a valid address") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidEvent("url", "must be an absolute http(s) address")
    if len(parts.hostname) > SITE_MAX:
        raise InvalidEvent("url", f"has a host longer than {SITE_MAX} characters")
    raw_path = parts.path or "/"
    return parts.hostname, f"{raw_path}?{parts.query}" if parts.query else raw_path


# The same few user agents arrive again and again (every event of a request
# shares the header's): cleaned once each.
@functools.lru_cache(maxsize=4096)
def clean_user_agent(raw: str) -> str | None:
    """Capped rather than refused: the header is the browser's, not the sender's, choice."""
    return _UNSTORABLE.sub("", raw)[:USER_AGENT_MAX] or None


@functools.lru_cache(maxsize=4096)
def _clean_referrer(raw: str) -> str | None:
    """The referring page without its query and fragment, which can carry tokens
    or e-mail addresses of the visitor; where they came from is the page itself.
    (Cached: referrers repeat as pages do.)"""
    return _text(raw, "referrer", REFERRER_MAX).partition("#")[0].partition("?")[0] or None


def parse_timestamp(value: object, now: datetime) -> datetime:
    """A Unix time in seconds or an ISO 8601 string with an offset, inside the window."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidEvent("ts", "must be Unix seconds or an ISO 8601 string")
    if isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidEvent("ts", "is not an ISO 8601 timestamp") from None
        if ts.tzinfo is None:
            raise InvalidEvent("ts", "needs a timezone offset (e.g. Z)")
        ts = ts.astimezone(UTC)
    else:
        try:
            ts = datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise InvalidEvent("ts", "is out of range") from None
    if not now - MAX_PAST <= ts <= now + MAX_FUTURE:
        raise InvalidEvent("ts", "must be within the last 48 hours (and at most 5 minutes ahead)")
    return ts


def parse_event(item: object, context: RequestContext) -> Event:
    if not isinstance(item, dict):
        raise InvalidEvent("event", "must be a JSON object")
    if not FIELDS.issuperset(item):
        raise InvalidEvent(sorted(item.keys() - FIELDS)[0], "is not a known field")

    url_host = None
    if (url := item.get("url")) is not None:
        if not isinstance(url, str):  # before the cache, which needs hashable keys
            raise InvalidEvent("url", "must be a string")
        url_host, raw_path = _split_url(url)
    if (path_value := item.get("path")) is not None:
        raw_path = _text(path_value, "path", PATH_MAX)
    elif url is None:
        raise InvalidEvent("path", "url or path is required")
    path = clean_path(raw_path, context.query_allowlist, "path" if path_value else "url")

    if (site := item.get("site")) is not None:
        site = _text(site, "site", SITE_MAX)
    else:
        # An Origin host longer than DNS allows (and the column holds) names no site.
        origin_host = context.origin_host if len(context.origin_host or "") <= SITE_MAX else None
        site = url_host or origin_host or context.default_site

    referrer = item.get("referrer")
    if referrer == "":
        referrer = None
    elif referrer is not None:
        if not isinstance(referrer, str):
            raise InvalidEvent("referrer", "must be a string")
        referrer = _clean_referrer(referrer)

    ts = context.now if (raw_ts := item.get("ts")) is None else parse_timestamp(raw_ts, context.now)

    event_id = item.get("event_id")
    if event_id is not None:
        event_id = _text(event_id, "event_id", EVENT_ID_MAX)
        if not _EVENT_ID.fullmatch(event_id):
            raise InvalidEvent("event_id", "may only hold letters, digits and . _ : -")

    user_agent = context.user_agent
    # Server-to-server senders relay their visitors' user agents in the event.
    if (ua := item.get("ua")) is not None:
        if not isinstance(ua, str):
            raise InvalidEvent("ua", "must be a string")
        user_agent = ua
    if user_agent is not None:
        user_agent = clean_user_agent(user_agent)

    return Event(ts, site, path, referrer, user_agent, event_id)
