"""Rate limits: per client and per site on /track, stricter on report pages.

Flask-Limiter counts requests in the storage named by TELEMETRY_RATELIMIT_STORAGE:
the process's memory by default (each gunicorn worker then has its own
budget), or Redis (directly or through Sentinel), where every worker and host
shares one.

A client is known by a keyed hash of its address, never by the address: the
key is the period's hashing key from `api.privacy` (the one `ip_hash` uses,
kept in the database, so every worker and host derives the same limit key),
over a domain-separated input, so a limit key cannot be matched against
stored `ip_hash` values either. It changes with each hashing period.

When the storage cannot be reached the request goes through (fail-open; 503
with TELEMETRY_RATELIMIT_FAIL_CLOSED): a telemetry outage is worse than a
short while without limits. Every such request is counted in
`telemetry_ratelimit_storage_errors_total`; the log gets one line per minute.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from operator import attrgetter
from typing import Any, NamedTuple

from flask import Blueprint, Flask, Request, Response, current_app, request
from flask_limiter import Limiter, RateLimitExceeded
from limits import RateLimitItem, parse_many
from limits.errors import StorageError
from limits.storage import MemoryStorage

from api import metrics
from api.errors import APIError, Unavailable, error_response
from api.events import Event
from api.privacy import VisitorHasher, normalise_address
from api.settings import Settings

log = logging.getLogger(__name__)

# Blueprints whose every route gets TELEMETRY_RATELIMIT_REPORTS (one budget per
# client shared by all of them) and the strict report-page CSP (api/headers.py).
# The report and stats code registers its blueprint under one of these names.
REPORT_BLUEPRINTS = frozenset({"reports", "stats"})

# Domain separation: a limit key is never equal to the address's stored ip_hash.
_KEY_DOMAIN = b"ratelimit\x00"


class RateLimited(APIError):
    status = 429
    code = "rate_limited"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = max(1, retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class StorageOutage:
    """What to do, and what to say, when the limit storage is unreachable."""

    LOG_INTERVAL = 60.0

    def __init__(self, fail_closed: bool) -> None:
        self.fail_closed = fail_closed
        self._lock = threading.Lock()
        self._last_logged = -float("inf")
        self._unlogged = 0

    def failed(self, error: Exception) -> None:
        """Count and (at most once per interval) log the failure; raise when failing closed."""
        metrics.ratelimit_storage_error(allowed=not self.fail_closed)
        now = time.monotonic()
        with self._lock:
            self._unlogged += 1
            due = now - self._last_logged >= self.LOG_INTERVAL
            if due:
                count, self._unlogged, self._last_logged = self._unlogged, 0, now
        if due:
            cause = getattr(error, "storage_error", error)
            log.error(
                "rate-limit storage unreachable (%s: %s); %d request(s) %s since the last "
                "report; next report in %.0f s at the earliest",
                type(cause).__name__,
                cause,
                count,
                "refused (fail-closed)" if self.fail_closed else "let through unlimited",
                self.LOG_INTERVAL,
            )
        if self.fail_closed:
            raise Unavailable("rate limits cannot be checked right now; retry later")


class SweepingMemoryStorage(MemoryStorage):
    """`memory://`, minus a thread start on most requests.

    limits' memory storage sweeps expired counters in a 10 ms `threading.Timer`
    and starts a new one on the first hit after the last has run: under steady
    traffic up to a hundred thread starts a second, which cost more than the
    rest of a /track request. A counter that has expired is dropped when it is
    read anyway, so sweeping at most every few seconds only bounds memory.
    """

    STORAGE_SCHEME = ["telemetry+memory"]  # noqa: RUF012 - how limits declares it
    SWEEP_INTERVAL = 5.0

    def __init__(self, uri: str | None = None, **options: object) -> None:
        self._next_sweep = 0.0
        super().__init__(uri, **options)  # type: ignore[arg-type]

    # Overrides MemoryStorage's private (name-mangled) scheduler; a test checks it exists.
    def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep and not self.timer.is_alive():
            self._next_sweep = now + self.SWEEP_INTERVAL
            self.timer = threading.Timer(0.01, self._MemoryStorage__expire_events)  # type: ignore[attr-defined]
            self.timer.daemon = True
            self.timer.start()


# limits wraps the storage methods of every subclass in its error translation,
# so a subclass's inherited methods would go through it twice on every call.
for _method in ("incr", "get", "get_expiry", "check", "reset", "clear"):
    setattr(SweepingMemoryStorage, _method, getattr(MemoryStorage, _method))


def storage_uri(setting: str) -> str:
    """The limits storage URI for TELEMETRY_RATELIMIT_STORAGE."""
    if setting.startswith("memory://"):
        return "telemetry+memory://" + setting.removeprefix("memory://")
    return setting


class TelemetryLimiter(Limiter):
    """Flask-Limiter, evaluated only where it has limits, with our storage-outage policy.

    Its three request hooks resolve decorators, blueprint and default limits
    on every request, which costs more than the rest of a small /track request;
    so they run for the report blueprints only (`init_app`), and /track counts
    its hits straight on the same storage and strategy (`RateLimits.check_client`).
    Flask-Limiter's own `swallow_errors` logs a traceback per request and
    cannot refuse, hence the wrapper for storage errors."""

    def __init__(self, outage: StorageOutage, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.outage = outage

    def init_app(self, app: Flask) -> None:
        super().init_app(app)
        hooks: tuple[dict[str | None, list[Any]], ...] = (
            app.before_request_funcs,
            app.after_request_funcs,
            app.teardown_request_funcs,
        )
        for functions in hooks:
            ours = [f for f in functions.get(None, []) if self._is_own_hook(f)]
            functions[None] = [f for f in functions[None] if f not in ours]
            for blueprint in REPORT_BLUEPRINTS:
                functions.setdefault(blueprint, []).extend(ours)

    def _is_own_hook(self, function: object) -> bool:
        # Bound methods of this limiter, or the partial Flask-Limiter binds it into.
        owner = getattr(function, "__self__", None)
        if owner is None and isinstance(function, partial):
            owner = function.args[0] if function.args else None
        return owner is self

    def _check_request_limit(
        self, callable_name: str | None = None, in_middleware: bool = True
    ) -> None:
        try:
            super()._check_request_limit(callable_name, in_middleware)
        except StorageError as exc:
            self.outage.failed(exc)


def client_key(req: Request | None = None, hasher: VisitorHasher | None = None) -> str:
    """The rate-limit key of the requesting client (`req`, by default the current
    request): a keyed hash of its address, with `hasher` (by default the app's)."""
    # ProxyFix has already put the trusted X-Forwarded-For entry here.
    address = (req or request).environ.get("REMOTE_ADDR") or "0.0.0.0"
    try:
        packed = normalise_address(address)
    except ValueError:
        packed = address.encode()[:64]  # /track answers 400 for it; still never stored raw
    now = datetime.now(UTC)
    hasher = hasher or current_app.extensions["telemetry.ingestor"].hasher
    return hasher.hash_normalised(_KEY_DOMAIN + packed, now, now)[:12].hex()


_site_of = attrgetter("site")
# Set in a request's environ once its limits found the storage unreachable.
_OUTAGE_SEEN = "telemetry.ratelimit_outage"


class _TrackLimit(NamedTuple):
    """A limit of /track, with the parts of its storage key around the counted
    name (a client key or a site) worked out once."""

    item: RateLimitItem
    key_head: str
    key_tail: str
    expiry: int


def _track_limits(limits: str, key_prefix: str, scope: str) -> tuple[_TrackLimit, ...]:
    prepared = []
    for item in parse_many(limits) if limits else ():
        # limits' own key layout (RateLimitItem.key_for), split where the name goes.
        head, tail = item.key_for(key_prefix, scope, "\0").split("\0")
        prepared.append(_TrackLimit(item, head, tail, item.get_expiry()))
    return tuple(prepared)


class RateLimits:
    """The app's limiter; the per-client and per-site limits of /track."""

    def __init__(self, app: Flask, settings: Settings) -> None:
        self.outage = StorageOutage(settings.ratelimit_fail_closed)
        self.limiter = TelemetryLimiter(
            self.outage,
            key_func=client_key,
            storage_uri=storage_uri(settings.ratelimit_storage),
            # StorageError instead of each client library's own exceptions.
            storage_options={"wrap_exceptions": True},
            strategy="fixed-window",
            key_prefix=settings.ratelimit_key_prefix,
            # Headers on every answer would cost a second storage round trip per
            # request; 429s carry Retry-After (see _too_many_requests).
            headers_enabled=False,
        )
        self.limiter.init_app(app)
        self.key_prefix = settings.ratelimit_key_prefix
        self.client_limits = _track_limits(settings.ratelimit_client, self.key_prefix, "client")
        self.site_limits = _track_limits(settings.ratelimit_site, self.key_prefix, "site")
        self.reports_limit = settings.ratelimit_reports
        self.hasher = app.extensions["telemetry.ingestor"].hasher

    def limit_report_blueprint(self, blueprint: Blueprint) -> None:
        """Put every route of `blueprint` under one per-client reports budget.
        Must run before the blueprint serves its first request."""
        if self.reports_limit:
            self.limiter.shared_limit(self.reports_limit, scope="reports")(blueprint)

    def check_client(self, req: Request) -> None:
        """Count a /track request against its client's limits; RateLimited if one
        is over. The views call it first thing (not a before-request hook, which
        costs a dispatch of its own on every request)."""
        if self.client_limits:
            self._hit(req, self.client_limits, "client", client_key(req, self.hasher), 1)

    def check_sites(self, req: Request, events: Sequence[Event]) -> None:
        """Count the `events` of `req` against their sites' limits; RateLimited
        if one is over."""
        if not self.site_limits:
            return
        if len(events) == 1:
            self._hit(req, self.site_limits, "site", events[0].site, 1)
            return
        for site, count in Counter(map(_site_of, events)).items():
            self._hit(req, self.site_limits, "site", site, count)

    def _hit(
        self, req: Request, limits: Sequence[_TrackLimit], scope: str, key: str, cost: int
    ) -> None:
        # In the environ rather than in flask.g, whose every use is a context lookup.
        if _OUTAGE_SEEN in req.environ:
            return  # counted once per request, and no second wait for a dead storage
        strategy = self.limiter.limiter
        try:
            for limit in limits:
                # The fixed-window strategy's hit (the limiter's strategy), with the
                # key built from its prepared parts: key_for costs as much as the count.
                counted = strategy.storage.incr(
                    limit.key_head + key + limit.key_tail, limit.expiry, amount=cost
                )
                if counted > limit.item.amount:
                    item = limit.item
                    reset = strategy.get_window_stats(item, self.key_prefix, scope, key).reset_time
                    metrics.rate_limited(scope)
                    who = "this client" if scope == "client" else f"site {key!r}"
                    raise RateLimited(
                        f"{who} is over its limit of {item}",
                        retry_after=int(reset - time.time()) + 1,
                    )
        except StorageError as exc:
            req.environ[_OUTAGE_SEEN] = True
            self.outage.failed(exc)


def _too_many_requests(error: RateLimitExceeded) -> Response:
    """A Flask-Limiter breach (the reports limit) in our JSON shape."""
    rate_limits: RateLimits = current_app.extensions["telemetry.ratelimits"]
    item = error.limit.limit
    retry_after = item.get_expiry()
    current = rate_limits.limiter.current_limit
    if current is not None:
        # If the storage went away since the hit, the window length is an upper bound.
        with contextlib.suppress(StorageError):
            retry_after = int(current.reset_at - time.time()) + 1
    metrics.rate_limited("reports")
    response = error_response(429, RateLimited.code, f"this client is over its limit of {item}")
    response.headers["Retry-After"] = str(max(1, retry_after))
    return response


def init_app(app: Flask, settings: Settings) -> RateLimits:
    """Set up limits on /track and on every report blueprint already registered."""
    rate_limits = RateLimits(app, settings)
    app.extensions["telemetry.ratelimits"] = rate_limits
    for name, blueprint in app.blueprints.items():
        if name in REPORT_BLUEPRINTS:
            rate_limits.limit_report_blueprint(blueprint)  # type: ignore[arg-type]
    app.register_error_handler(RateLimitExceeded, _too_many_requests)
    return rate_limits
