"""gunicorn configuration, shared by `make run`, `telemetry serve` and the container
(the repository's gunicorn.conf.py imports this module)."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from api.settings import load_settings
from db import migrate

_settings = load_settings()

# prometheus-client's multiprocess mode (api/metrics.py): every worker writes its
# samples to files here, and it has to be in the environment before a worker
# imports the library. An operator's (or the container's) own directory is
# used as given; otherwise a private one is made and removed at exit.
_metrics_dir_is_ours = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
if _metrics_dir_is_ours:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="telemetry-metrics-")
_metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])

wsgi_app = "api:create_app()"
bind = [_settings.bind]
# gthread: requests in one worker share group commits (api/group_commit.py).
worker_class = "gthread"
workers = _settings.worker_processes
threads = _settings.threads
# Acknowledged events are already committed; the grace period lets requests in
# flight finish their commit before a worker exits.
graceful_timeout = _settings.graceful_timeout
timeout = 60
keepalive = 5
loglevel = _settings.log_level.lower()
accesslog = "-"
# No %(h)s: client addresses never reach the logs.
access_log_format = '"%(r)s" %(s)s %(b)s %(D)sus "%(a)s"'


def on_starting(server: Any) -> None:
    """Migrate once, in the master, before any worker opens the database; start the
    metrics from zero (files of an earlier run would be added to this one's)."""
    migrate.upgrade(_settings.database_url)
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in _metrics_dir.glob("*.db"):
        stale.unlink()


def post_fork(server: Any, worker: Any) -> None:
    from api import metrics

    metrics.running_under_gunicorn(master_pid=worker.ppid)


def post_worker_init(worker: Any) -> None:
    """Before the worker's first request: load the hashing key (Ingestor.warm_up),
    then move everything loaded so far (the app, Flask, pandas, plotly: it lives
    as long as the worker) out of the garbage collector's sight. The events of
    requests in flight survive young collections, so full collections come
    often under load, and each one would otherwise walk all of it: 46 % of a
    worker's time under batch load, measured with py-spy."""
    app = getattr(worker, "wsgi", None)
    ingestor = getattr(app, "extensions", {}).get("telemetry.ingestor")
    if ingestor is not None:
        ingestor.warm_up()
    gc.freeze()


def worker_exit(server: Any, worker: Any) -> None:
    """After the worker's last request (SIGTERM waits up to graceful_timeout for
    requests in flight, each of which returns only once its events are committed):
    close the database writer."""
    app = getattr(worker, "wsgi", None)
    ingestor = getattr(app, "extensions", {}).get("telemetry.ingestor")
    if ingestor is not None:
        ingestor.close()


def child_exit(server: Any, worker: Any) -> None:
    """A dead worker's live gauges no longer count (its counters still do)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _metrics_dir_is_ours:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
