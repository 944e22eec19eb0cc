"""gunicorn configuration, shared by `make run`, `telemetry serve` and the container
(the repository's gunicorn.conf.py imports this module)."""

from __future__ import annotations

import multiprocessing
from typing import Any

from api.settings import load_settings
from db import migrate

_settings = load_settings()

wsgi_app = "api:create_app()"
bind = [_settings.bind]
# gthread: requests in one worker share group commits (api/group_commit.py).
worker_class = "gthread"
workers = _settings.workers or multiprocessing.cpu_count()
threads = _settings.threads
# Acknowledged events are already committed; the grace period lets requests in
# flight finish their commit before a worker exits.
graceful_timeout = 30
timeout = 60
keepalive = 5
loglevel = _settings.log_level.lower()
accesslog = "-"
# No %(h)s: client addresses never reach the logs.
access_log_format = '"%(r)s" %(s)s %(b)s %(D)sus "%(a)s"'


def on_starting(server: Any) -> None:
    """Migrate once, in the master, before any worker opens the database."""
    migrate.upgrade(_settings.database_url)
