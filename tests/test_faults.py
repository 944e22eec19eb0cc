"""Faults under load, on real servers: a gunicorn worker killed, PostgreSQL
stopped, SQLite's disk full.

Client threads keep posting batches of events, each event with a unique
`event_id`, while the fault happens. Afterwards every acknowledged (2xx) event
must be stored exactly once, every batch all or nothing, and ingestion must
have recovered by itself. Each test prints what the clients saw and how many
events were acknowledged and stored (`pytest -s` shows it).
"""

from __future__ import annotations

import errno
import functools
import http.client
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from services import Gunicorn, PostgresCluster, cannot_run, wait_for

from db import HitStore, NewHit, make_engine, migrate

CLIENTS = 6
BATCH_SIZE = 5
SERVER_SETTINGS = {
    "TELEMETRY_WORKERS": "2",
    "TELEMETRY_THREADS": "8",
    # All clients share one address; the per-client limit would refuse most of the load.
    "TELEMETRY_RATELIMIT_CLIENT": "",
}


@dataclass(frozen=True)
class Outcome:
    """What a client saw for one batch."""

    batch: int
    status: int | None  # None: the connection broke before an answer came
    error: str | None  # the exception, when there was no answer
    retry_after: str | None
    body: bytes
    at: float  # time.monotonic() when the answer came

    @property
    def acknowledged(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def seen_as(self) -> str:
        return str(self.status) if self.status is not None else self.error or "?"


def batch_events(batch: int) -> list[dict[str, str]]:
    return [{"path": f"/load/{batch}/{n}", "event_id": f"b{batch}-{n}"} for n in range(BATCH_SIZE)]


class Load:
    """Client threads posting batches of events until the block ends."""

    def __init__(self, server: Gunicorn) -> None:
        self.server = server
        self.outcomes: list[Outcome] = []  # appended from every thread (atomic in CPython)
        self._batches = itertools.count()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def send(self, batch: int) -> Outcome:
        body = json.dumps(batch_events(batch)).encode()
        try:
            status, headers, answer = self.server.exchange(
                "POST", "/track", body, {"Content-Type": "application/json"}
            )
        # Reset, refused, or cut short: the worker died mid-request.
        except (OSError, http.client.HTTPException) as exc:
            return Outcome(batch, None, type(exc).__name__, None, b"", time.monotonic())
        return Outcome(batch, status, None, headers.get("Retry-After"), answer, time.monotonic())

    def retry_unacknowledged(self) -> list[Outcome]:
        """Each batch not acknowledged sent again, with the same event ids."""
        with ThreadPoolExecutor(CLIENTS) as pool:
            return list(pool.map(self.send, [o.batch for o in self.outcomes if not o.acknowledged]))

    def _client(self) -> None:
        while not self._stop.is_set():
            outcome = self.send(next(self._batches))
            self.outcomes.append(outcome)
            if not outcome.acknowledged:
                time.sleep(0.05)  # a client backing off (Retry-After asks for more)

    def wait_for(
        self, what: str, condition: Callable[[Outcome], bool], after: float, count: int = 1
    ) -> None:
        """Until `count` batches answered after `after` meet `condition`."""
        wait_for(
            lambda: sum(o.at > after and condition(o) for o in self.outcomes) >= count,
            what,
            timeout=30,
        )


def stored_load_paths(url: str) -> list[str]:
    engine = make_engine(url)
    with engine.connect() as connection:
        paths = connection.scalars(sa.text("SELECT path FROM hits WHERE path LIKE '/load/%'"))
        result = list(paths)
    engine.dispose()
    return result


def check_exactly_once(fault: str, outcomes: list[Outcome], paths: list[str]) -> None:
    """Every acknowledged batch stored whole and once; any other batch whole or
    not at all; nothing stored that was never sent. Prints the counts."""
    repeated = [path for path, times in Counter(paths).items() if times > 1]
    assert not repeated, f"stored more than once: {repeated[:5]}"
    stored_per_batch = Counter(int(path.split("/")[2]) for path in paths)
    sent = {o.batch for o in outcomes}
    assert set(stored_per_batch) <= sent
    for outcome in outcomes:
        stored = stored_per_batch[outcome.batch]
        if outcome.acknowledged:
            assert stored == BATCH_SIZE, f"acknowledged batch {outcome.batch}: {stored} stored"
        else:
            assert stored in (0, BATCH_SIZE), f"half-written batch {outcome.batch}: {stored}"
    acknowledged = sum(BATCH_SIZE for o in outcomes if o.acknowledged)
    print(
        f"\n{fault}: clients saw {dict(Counter(o.seen_as for o in outcomes))} "
        f"(batches of {BATCH_SIZE}); events sent {len(outcomes) * BATCH_SIZE}, "
        f"acknowledged {acknowledged}, stored {len(paths)} "
        f"({len(paths) - acknowledged} stored without an acknowledgement)"
    )


def assert_unavailable_answers(outcomes: list[Outcome]) -> None:
    """Every 503 tells the client to retry, in the API's JSON error shape."""
    unavailable = [o for o in outcomes if o.status == 503]
    assert unavailable
    for outcome in unavailable:
        assert outcome.retry_after is not None and int(outcome.retry_after) > 0
        answer = json.loads(outcome.body)
        assert answer["error"] == "unavailable" and answer["detail"]


def worker_pids(master: int) -> set[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text()
    return {int(pid) for pid in children.split()}


def workers_serving(master: int, metrics: Path, killed: int = 0) -> bool:
    """Two workers, neither the `killed` one (listed until the master reaps it),
    both with the app loaded: a worker's metrics files (api/metrics.py, named
    after its pid) appear once it is."""
    pids = worker_pids(master)
    loaded = all(any(metrics.glob(f"*_{pid}.db")) for pid in pids)
    return len(pids) == 2 and killed not in pids and loaded


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_killed_worker_loses_no_acknowledged_event(tmp_path, database_url):
    metrics = tmp_path / "metrics"
    server = Gunicorn(tmp_path, tmp_path / "unused.db", TELEMETRY_DATABASE_URL=database_url,
                      PROMETHEUS_MULTIPROC_DIR=str(metrics), **SERVER_SETTINGS)  # fmt: skip
    try:
        server.wait_until_ready()
        master = server.process.pid
        wait_for(functools.partial(workers_serving, master, metrics), "two workers serving", 30)
        with Load(server) as load:
            load.wait_for("acknowledged load", lambda o: o.acknowledged, after=0)
            # Both workers killed in turn, while they serve (killing one still
            # booting tests nothing), so that some kills hit requests in flight.
            victim = 0
            for _ in range(2):
                if victim:
                    replaced = functools.partial(workers_serving, master, metrics, victim)
                    wait_for(replaced, "gunicorn replacing the killed worker", 30)
                time.sleep(0.3)
                victim = min(worker_pids(master))  # the oldest
                os.kill(victim, signal.SIGKILL)
                killed_at = time.monotonic()
            load.wait_for("serving after the kills", lambda o: o.acknowledged, killed_at, count=20)
        stored_before_retries = stored_load_paths(database_url)
        retries = load.retry_unacknowledged()
        assert server.stop() == 0
    finally:
        server.stop()

    outcomes = load.outcomes
    # Only the killed worker's requests in flight fail, with a broken connection.
    assert {o.status for o in outcomes} <= {202, None}
    assert any(o.status is None for o in outcomes)  # the kills did hit requests in flight
    fault = f"kill -9 of a worker ({database_url.split(':')[0]})"
    check_exactly_once(fault, outcomes, stored_before_retries)
    # A client that lost its answer sends the batch again: stored once all the same.
    assert {r.status for r in retries} == {202}
    stored = stored_load_paths(database_url)
    check_exactly_once(f"{fault}, after the clients' retries", outcomes + retries, stored)


@pytest.fixture
def postgres_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    yield cluster
    cluster.destroy()


@pytest.mark.slow
def test_stopped_postgresql_gets_503_and_ingestion_recovers(tmp_path, postgres_cluster):
    url = postgres_cluster.url()
    migrate.upgrade(url)
    server = Gunicorn(tmp_path, tmp_path / "unused.db", TELEMETRY_DATABASE_URL=url,
                      **SERVER_SETTINGS)  # fmt: skip
    try:
        server.wait_until_ready()
        workers = worker_pids(server.process.pid)
        with Load(server) as load:
            load.wait_for("acknowledged load", lambda o: o.acknowledged, after=0)
            time.sleep(0.5)
            # A crash: sessions are cut off, transactions in flight are lost.
            postgres_cluster.stop("immediate")
            stopped_at = time.monotonic()
            load.wait_for("503 while PostgreSQL is down", lambda o: o.status == 503, stopped_at)
            time.sleep(1)
            readiness = server.request("GET", "/readyz")[0]
            postgres_cluster.start()
            started_at = time.monotonic()
            load.wait_for("acknowledgements once it is back", lambda o: o.acknowledged, started_at)
            recovered_at = min(o.at for o in load.outcomes if o.at > started_at and o.acknowledged)
            time.sleep(0.5)
        assert worker_pids(server.process.pid) == workers  # recovered without a restart
        stored_before_retries = stored_load_paths(url)
        retries = load.retry_unacknowledged()
        assert server.stop() == 0
    finally:
        server.stop()

    outcomes = load.outcomes
    assert {o.seen_as for o in outcomes} <= {"202", "503"}
    assert_unavailable_answers(outcomes)
    assert readiness == 503
    print(f"\nPostgreSQL back: first acknowledgement after {recovered_at - started_at:.2f}s")
    check_exactly_once("PostgreSQL stopped (immediate)", outcomes, stored_before_retries)
    assert {r.status for r in retries} == {202}
    stored = stored_load_paths(url)
    check_exactly_once("PostgreSQL, after the clients' retries", outcomes + retries, stored)
    assert len(stored) == len(outcomes) * BATCH_SIZE


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 16 MB tmpfs of our own, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        cannot_run(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; the file, to free the space."""
    filler = directory / "filler"
    chunk = bytes(64 * 1024)
    with filler.open("wb", buffering=0) as file:
        try:
            while True:
                file.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def integrity_check(database: Path) -> str:
    connection = sqlite3.connect(database)
    try:
        return connection.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        connection.close()


@pytest.mark.slow
def test_full_disk_gets_503_without_corruption_and_recovers(tmp_path, small_disk):
    database = small_disk / "telemetry.db"
    url = f"sqlite:///{database}"
    server = Gunicorn(tmp_path, database, **SERVER_SETTINGS)
    try:
        server.wait_until_ready()
        workers = worker_pids(server.process.pid)
        with Load(server) as load:
            load.wait_for("acknowledged load", lambda o: o.acknowledged, after=0)
            time.sleep(0.5)
            filler = fill(small_disk)
            filled_at = time.monotonic()
            load.wait_for("503 on the full disk", lambda o: o.status == 503, filled_at)
            time.sleep(0.5)
            while_full = integrity_check(database)
            filler.unlink()
            freed_at = time.monotonic()
            load.wait_for("acknowledgements once space is freed", lambda o: o.acknowledged,
                          freed_at)  # fmt: skip
            time.sleep(0.5)
        assert worker_pids(server.process.pid) == workers  # recovered without a restart
        stored_before_retries = stored_load_paths(url)
        retries = load.retry_unacknowledged()
        assert server.stop() == 0
    finally:
        server.stop()

    outcomes = load.outcomes
    assert {o.seen_as for o in outcomes} <= {"202", "503"}
    assert_unavailable_answers(outcomes)
    assert while_full == "ok"
    assert integrity_check(database) == "ok"
    during = Counter(o.seen_as for o in outcomes if filled_at < o.at < freed_at)
    print(f"\nwhile the disk was full: {dict(during)}")
    check_exactly_once("SQLite disk full", outcomes, stored_before_retries)
    assert {r.status for r in retries} == {202}
    stored = stored_load_paths(url)
    check_exactly_once("SQLite disk full, after the clients' retries", outcomes + retries, stored)
    assert len(stored) == len(outcomes) * BATCH_SIZE


# A row the database refuses, standing in for a write failing halfway through a
# group commit (a full disk, a crash), per backend.
POISON_TRIGGER = {
    "sqlite": [
        "CREATE TRIGGER poison BEFORE INSERT ON hits WHEN NEW.path = '/poison' "
        "BEGIN SELECT RAISE(ABORT, 'poison'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.path = '/poison' THEN RAISE EXCEPTION 'poison'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER poison BEFORE INSERT ON hits FOR EACH ROW EXECUTE FUNCTION poison()",
    ],
}
DROP_POISON = {
    "sqlite": ["DROP TRIGGER poison"],
    "postgresql": ["DROP TRIGGER poison ON hits", "DROP FUNCTION poison()"],
}


@pytest.mark.parametrize("event_ids", [False, True], ids=["anonymous", "with-event-ids"])
def test_a_group_commit_that_fails_late_stores_nothing(database_url, count_rows, event_ids, now):
    """Groups of several requests can hold more rows than one INSERT statement
    carries; a failure in a later statement must undo the earlier ones too."""
    engine = make_engine(database_url)
    dialect = engine.dialect.name
    hit = NewHit(now, "example.com", "/big", None, bytes(16), None, None, None, "desktop", False)
    hits = [
        hit._replace(path=f"/big/{n}", event_id=f"e{n}" if event_ids else None) for n in range(2500)
    ]
    hits.append(hits[-1]._replace(path="/poison", event_id="poison" if event_ids else None))
    with engine.begin() as connection:
        for statement in POISON_TRIGGER[dialect]:
            connection.execute(sa.text(statement))
    store = HitStore(engine)
    try:
        with pytest.raises(Exception, match="poison"):
            store.write(hits)
        stored = count_rows("hits")
    finally:
        store.close()
        with engine.begin() as connection:
            for statement in DROP_POISON[dialect]:
                connection.execute(sa.text(statement))
        engine.dispose()
    assert stored == 0
    assert count_rows("seen_events") == 0
