"""Prometheus metrics and the `/metrics` endpoint.

Under gunicorn every worker is a process of its own, so prometheus-client runs
in multiprocess mode: each worker writes its samples to memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` and `/metrics`, whichever worker answers it, adds
up the files of all of them. ``api/gunicorn_conf.py`` sets that directory up in
the master before any worker starts and tells the library when a worker dies.

prometheus-client decides between in-process and multiprocess values when it is
first imported, so nothing here imports it at module level: ``api`` is imported
by the gunicorn master (through ``api.gunicorn_conf``) before the variable is
set. The metric objects are made once per process, on first use.

Label values are bounded: endpoint names (never paths), status codes, error
codes, limit scopes. No address, raw or hashed, is ever a label.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, request

from api.middleware import OnAnswerStart
from db.aggregates import rollup_lag_seconds

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

bp = Blueprint("metrics", __name__)

# Events per /track request and per group commit.
_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _Metrics:
    """Every metric of the service; one instance per process (see `metrics()`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter(
            "telemetry_http_requests",
            "HTTP requests answered, by endpoint (route name, not path) and status code.",
            ["endpoint", "status"],
        )
        self.events_accepted = Counter(
            "telemetry_events_accepted", "Events acknowledged by /track (committed)."
        )
        self.events_rejected = Counter(
            "telemetry_events_rejected",
            "Events /track refused or dropped, by reason (the error code of the answer, "
            "or do_not_track).",
            ["reason"],
        )
        self.batch_size = Histogram(
            "telemetry_batch_events", "Events per accepted /track request.", buckets=_SIZE_BUCKETS
        )
        self.commit_seconds = Histogram(
            "telemetry_commit_seconds",
            "Duration of one group commit (one transaction).",
            buckets=_COMMIT_BUCKETS,
        )
        self.commit_group = Histogram(
            "telemetry_commit_group_events",
            "Events written by one group commit.",
            buckets=_SIZE_BUCKETS,
        )
        self.rate_limited = Counter(
            "telemetry_rate_limited_requests",
            "Requests answered 429, by the limit they hit (client, site, reports).",
            ["scope"],
        )
        self.ratelimit_storage_errors = Counter(
            "telemetry_ratelimit_storage_errors",
            "Requests whose rate-limit check could not reach the storage (Redis), by what "
            "was done (allowed: fail-open, refused: fail-closed).",
            ["outcome"],
        )
        self.database_errors = Counter(
            "telemetry_database_errors",
            "Requests that failed because the database could not be written (answered 503).",
        )
        self.rollup_lag = Gauge(
            "telemetry_rollup_lag_seconds",
            "How far each rollup (aggregate) is behind the newest raw hits, in seconds.",
            ["rollup"],
            multiprocess_mode="mostrecent",
        )
        # Children for the label values seen so far: `labels()` takes a lock and
        # re-validates the values, which is measurable on the /track hot path.
        self._request_children: dict[tuple[str, str], Any] = {}

    def count_request(self, endpoint: str, status: str) -> None:
        """Count one answer; `status` is the WSGI status line ("202 ACCEPTED")."""
        child = self._request_children.get((endpoint, status))
        if child is None:
            child = self.requests.labels(endpoint, status[:3])
            self._request_children[(endpoint, status)] = child
        child.inc()


_metrics: _Metrics | None = None
_metrics_lock = threading.Lock()


def metrics() -> _Metrics:
    """This process's metrics, made on first use."""
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


# --- what the rest of the service reports -------------------------------------------------


def request_accepted(events: int) -> None:
    """A /track request's `events` are committed (and counted, by observe_commit)."""
    metrics().batch_size.observe(events)


def events_rejected(reason: str, count: int = 1) -> None:
    metrics().events_rejected.labels(reason).inc(count)


def rate_limited(scope: str) -> None:
    metrics().rate_limited.labels(scope).inc()


def ratelimit_storage_error(allowed: bool) -> None:
    metrics().ratelimit_storage_errors.labels("allowed" if allowed else "refused").inc()


def database_error() -> None:
    metrics().database_errors.inc()


def observe_commit(items: int, seconds: float) -> None:
    """`GroupCommitter`'s on_commit callback: `items` events are acknowledged.
    Counted here, once per group rather than once per request."""
    m = metrics()
    m.events_accepted.inc(items)
    m.commit_seconds.observe(seconds)
    m.commit_group.observe(items)


# --- rollup lag ---------------------------------------------------------------------------


def set_rollup_lag(rollup: str, seconds: float) -> None:
    """Record how far `rollup` (a fixed name such as "hits_hourly") is behind, in seconds.

    For code that refreshes rollups in a web worker or in a process that shares
    the multiprocess directory."""
    metrics().rollup_lag.labels(rollup).set(seconds)


def _refresh_rollup_lag() -> None:
    """Read the aggregates' watermarks on every scrape: the lag is the database's
    state, whichever process refreshed it."""
    try:
        lags = rollup_lag_seconds(current_app.extensions["telemetry.engine"])
    except Exception:  # a database outage must not break the scrape
        current_app.logger.warning("rollup lag unknown: the watermarks cannot be read")
        return
    for rollup, seconds in lags.items():
        set_rollup_lag(rollup, seconds)


# --- process metrics under gunicorn -------------------------------------------------------

_gunicorn_master_pid: int | None = None


def running_under_gunicorn(master_pid: int) -> None:
    """Called in each worker after the fork (gunicorn_conf.post_fork)."""
    global _gunicorn_master_pid
    _gunicorn_master_pid = master_pid


def _gunicorn_pids(master: int) -> list[int]:
    try:
        with open(f"/proc/{master}/task/{master}/children") as children:
            return [int(pid) for pid in children.read().split()]
    except OSError:
        return [os.getpid()]


class _ProcessGroupCollector:
    """The standard process_* metrics for the whole gunicorn process group, by role.

    prometheus-client's own process collector only sees the process answering
    the scrape, which under gunicorn is a different worker each time."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.tick = os.sysconf("SC_CLK_TCK")
        self.page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/stat") as stat:
            btime = next(line for line in stat if line.startswith("btime"))
        self.boot_time = float(btime.split()[1])

    def _read(self, pid: int) -> tuple[float, float, int, float] | None:
        """(cpu seconds, resident bytes, open fds, start time) of `pid`."""
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return None  # exited meanwhile
        # fields[0] is the state (field 3 of proc(5)); utime is field 14.
        cpu = (int(fields[11]) + int(fields[12])) / self.tick
        start = self.boot_time + int(fields[19]) / self.tick
        return cpu, int(fields[21]) * self.page, fds, start

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cpu = CounterMetricFamily(
            "process_cpu_seconds", "User and system CPU time spent, in seconds.", labels=["role"]
        )
        rss = GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory size in bytes.", labels=["role"]
        )
        fds = GaugeMetricFamily(
            "process_open_fds", "Number of open file descriptors.", labels=["role"]
        )
        count = GaugeMetricFamily("telemetry_processes", "Live processes.", labels=["role"])
        start = GaugeMetricFamily(
            "process_start_time_seconds", "Start time of the gunicorn master (Unix seconds)."
        )
        for role, pids in (("master", [self.master]), ("worker", _gunicorn_pids(self.master))):
            readings = [r for r in map(self._read, pids) if r is not None]
            cpu.add_metric([role], sum(r[0] for r in readings))
            rss.add_metric([role], sum(r[1] for r in readings))
            fds.add_metric([role], sum(r[2] for r in readings))
            count.add_metric([role], len(readings))
            if role == "master" and readings:
                start.add_metric([], readings[0][3])
        yield from (cpu, rss, fds, count, start)


# --- the endpoint -------------------------------------------------------------------------


def exposition() -> tuple[bytes, str]:
    """The metrics text of the whole service, and its content type."""
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        generate_latest,
        multiprocess,
    )

    metrics()  # so that every family is listed even before its first sample
    _refresh_rollup_lag()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        if _gunicorn_master_pid is not None:
            registry.register(_ProcessGroupCollector(_gunicorn_master_pid))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    # One process (flask run, tests): the default registry has the process metrics.
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    from api.errors import Unauthorized  # api.errors reports to this module

    token = current_app.extensions["telemetry.settings"].metrics_token
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("send Authorization: Bearer <TELEMETRY_METRICS_TOKEN>")
    body, content_type = exposition()
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})


def init_app(app: Flask) -> None:
    """Count every answer, by endpoint and status, and serve /metrics."""
    count_request = metrics().count_request

    def _count(environ: WSGIEnvironment, status: str, headers: list[tuple[str, str]]) -> None:
        count_request(request.endpoint or "unmatched", status)

    app.wsgi_app = OnAnswerStart(app.wsgi_app, _count)  # type: ignore[method-assign]
    app.register_blueprint(bp)
