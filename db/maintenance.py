"""Keeping the aggregates current and old data gone: one maintenance run, the
lock that lets only one run at a time across processes, and the in-process
scheduler each gunicorn worker starts.
"""

from __future__ import annotations

import fcntl
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine, text

from db import aggregates, retention, timescaledb
from db.engine import Backend, backend_of, sqlite_path

log = logging.getLogger(__name__)

# pg_try_advisory_lock key: "telemetry maintenance" in the service's key space.
ADVISORY_LOCK_KEY = 0x7E1E_0003


@dataclass(frozen=True)
class MaintenancePolicy:
    retention: retention.RetentionPolicy = field(default_factory=retention.RetentionPolicy)
    compress_after_days: int = 0


@dataclass
class MaintenanceRun:
    refreshed: list[aggregates.Refreshed]
    retention: retention.RetentionResult
    compression: str | None


# The cross-process lock, per backend, side by side.
@contextmanager
def maintenance_lock(engine: Engine) -> Iterator[bool]:
    """Yield whether this process got the maintenance lock; never waits for it.

    PostgreSQL: a session advisory lock, held on a connection of its own for
    the run (released with the session if the process dies). SQLite: a
    non-blocking fcntl lock on a file beside the database (released by the
    kernel if the process dies).
    """
    path = sqlite_path(str(engine.url))
    if path is not None:
        with open(f"{path}-maintenancelock", "ab") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        key = {"key": ADVISORY_LOCK_KEY}
        acquired = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), key).scalar()
        try:
            yield bool(acquired)
        finally:
            if acquired:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), key)


def run_maintenance(
    engine: Engine,
    policy: MaintenancePolicy,
    now: datetime | None = None,
    *,
    compression: bool = False,
) -> MaintenanceRun | None:
    """Refresh the aggregates, then apply retention (and, when asked, the
    compression policy); None when another process is already at it."""
    now = now or datetime.now(UTC)
    with maintenance_lock(engine) as acquired:
        if not acquired:
            return None
        refreshed = aggregates.refresh(
            engine, now=now, raw_hits_from=policy.retention.raw_cutoff(now), scheduled=True
        )
        expired = retention.apply_retention(engine, policy.retention, now)
        compressed = apply_compression(engine, policy.compress_after_days) if compression else None
        return MaintenanceRun(refreshed, expired, compressed)


def apply_compression(engine: Engine, after_days: int) -> str:
    """Apply the compression policy where the backend has one; say what happened."""
    backend = backend_of(engine)
    if backend is not Backend.TIMESCALEDB:
        return f"not applicable ({backend})"
    with engine.begin() as connection:
        return timescaledb.apply_compression_policy(connection, after_days)


class MaintenanceScheduler:
    """A daemon thread that runs maintenance every `interval` seconds.

    Every gunicorn worker starts one; the maintenance lock makes all but one
    of them skip each round. The first round also applies the compression
    policy, so a changed setting takes effect on restart.
    """

    def __init__(self, engine: Engine, policy: MaintenancePolicy, interval: float) -> None:
        self._engine = engine
        self._policy = policy
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="telemetry-maintenance", daemon=True
        )
        self.runs = 0  # completed runs in this process (the lock holder's only)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        first = True
        while not self._stopping.is_set():
            try:
                done = run_maintenance(self._engine, self._policy, compression=first)
            except Exception:
                # Logged and retried next round: the database may be restarting.
                log.exception("maintenance run failed")
            else:
                if done is not None:
                    first = False
                    self.runs += 1
                    log.debug("maintenance: %s", done)
            self._stopping.wait(self._interval)
