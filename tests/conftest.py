"""Fixtures shared by the suite: real databases on every backend, apps built on
them, and small helpers to read back what was stored.

Every API test that takes `database_url` runs once per backend in `BACKENDS`:
a fresh SQLite file per test, and one database per test session on each
database server (PostgreSQL, TimescaleDB), emptied between tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

from api import create_app
from api.maintenance import stop_scheduler
from api.settings import describe, load_settings
from db import Backend, backend_of, make_engine, migrate
from db.aggregates import AGGREGATES, EPOCH, ROLLUP_TABLES, Mechanism, mechanism_of
from db.hits import HitStore, NewHit
from db.models import Hit, RollupWatermark


@dataclass(frozen=True)
class ServerBackend:
    """A database server on which the suite makes databases of its own.

    `url_variable` names the environment variable that points the suite at
    another server; the database part of that URL is only used to connect for
    CREATE/DROP DATABASE.
    """

    name: str
    url_variable: str
    default_url: str
    # Created in each new database before migrating (e.g. ("timescaledb",)).
    extensions: tuple[str, ...] = ()

    def server_url(self) -> URL:
        url = make_url(os.environ.get(self.url_variable) or self.default_url)
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")  # the driver the project ships
        return url


# The backends every database test runs on. A new server backend is one more entry here.
SERVER_BACKENDS: dict[str, ServerBackend] = {
    "postgresql": ServerBackend(
        "postgresql",
        "TELEMETRY_TEST_POSTGRES_URL",
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    ),
    # scripts/timescaledb-test-server.sh (make test runs it): Debian's Apache-only build.
    "timescaledb": ServerBackend(
        "timescaledb",
        "TELEMETRY_TEST_TIMESCALE_URL",
        "postgresql+psycopg://postgres@127.0.0.1:5433/postgres",
        extensions=("timescaledb",),
    ),
}
BACKENDS = ["sqlite", *SERVER_BACKENDS]

# Emptied before each test on the server backends (and the aggregates with them).
TABLES = ("hits", "seen_events", "hash_salts")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


class DatabaseServers:
    """Creates, hands out and finally drops the suite's databases on each server."""

    def __init__(self) -> None:
        self._session_urls: dict[str, str] = {}
        self._cleaners: dict[str, sa.Engine] = {}
        self._created: list[tuple[ServerBackend, str]] = []
        self._unreachable: dict[str, str] = {}

    def _admin_engine(self, backend: ServerBackend) -> sa.Engine:
        return sa.create_engine(
            backend.server_url(),
            isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": 3},
            poolclass=sa.pool.NullPool,
        )

    def _unavailable(self, backend: ServerBackend) -> None:
        reason = self._unreachable[backend.name]
        message = (
            f"{backend.name} server {backend.server_url().render_as_string(hide_password=True)} "
            f"is unreachable ({reason}). Start it, or point {backend.url_variable} at one."
        )
        if in_ci():
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(f"!!! {backend.name.upper()} TESTS SKIPPED !!! {message}")

    def create_database(self, backend: ServerBackend, suffix: str) -> str:
        """A new, empty database on `backend`'s server; its URL as a string."""
        if backend.name in self._unreachable:
            self._unavailable(backend)
        name = f"telemetry_test_{os.getpid()}_{suffix}"
        try:
            admin = self._admin_engine(backend)
            with admin.connect() as connection:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
            admin.dispose()
        except sa.exc.OperationalError as exc:
            self._unreachable[backend.name] = str(exc.orig or exc).strip().splitlines()[0]
        if backend.name in self._unreachable:
            self._unavailable(backend)
        self._created.append((backend, name))
        url = backend.server_url().set(database=name).render_as_string(hide_password=False)
        if backend.extensions:
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            with engine.begin() as connection:
                for extension in backend.extensions:
                    connection.execute(sa.text(f'CREATE EXTENSION IF NOT EXISTS "{extension}"'))
            engine.dispose()
        return url

    def drop_database(self, backend: ServerBackend, url: str) -> None:
        name = make_url(url).database
        admin = self._admin_engine(backend)
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        self._created = [(b, n) for b, n in self._created if n != name]

    def session_database(self, backend: ServerBackend) -> str:
        """The migrated database all of this session's tests on `backend` share."""
        if backend.name not in self._session_urls:
            url = self.create_database(backend, "shared")
            migrate.upgrade(url)
            self._session_urls[backend.name] = url
        return self._session_urls[backend.name]

    def empty_tables(self, url: str) -> None:
        """Remove every row the previous test left behind."""
        if url not in self._cleaners:
            self._cleaners[url] = sa.create_engine(url)
        engine = self._cleaners[url]
        with engine.begin() as connection:
            continuous = mechanism_of(connection) is Mechanism.CONTINUOUS_AGGREGATES
            rollups = () if continuous else tuple(sorted(ROLLUP_TABLES))
            if backend_of(connection) is Backend.TIMESCALEDB:
                # TRUNCATE would drop the hypertable's chunks, and making a new
                # chunk for the next test's first hit costs more than the test.
                connection.execute(sa.text("DELETE FROM hits"))
                connection.execute(sa.text("ALTER SEQUENCE hits_id_seq RESTART"))
                tables = tuple(t for t in TABLES if t != "hits")
            else:
                tables = TABLES
            connection.execute(sa.text(f"TRUNCATE {', '.join(tables + rollups)} RESTART IDENTITY"))
            connection.execute(
                sa.update(RollupWatermark).values(materialized_until=EPOCH, refreshed_at=None)
            )
        if continuous:
            # Forget what the continuous aggregates materialised from the old rows.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                for aggregate in AGGREGATES:
                    refresh = f"CALL refresh_continuous_aggregate('{aggregate.name}', NULL, NULL)"
                    connection.execute(sa.text(refresh))

    def drop_all(self) -> None:
        for engine in self._cleaners.values():
            engine.dispose()
        for backend, name in list(self._created):
            url = backend.server_url().set(database=name).render_as_string(hide_password=False)
            self.drop_database(backend, url)


@pytest.fixture(scope="session")
def database_servers() -> Iterator[DatabaseServers]:
    servers = DatabaseServers()
    yield servers
    servers.drop_all()


@pytest.fixture(params=BACKENDS)
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, database_servers: DatabaseServers
) -> str:
    """A migrated, empty database on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'telemetry.db'}"
        migrate.upgrade(url)
        return url
    url = database_servers.session_database(SERVER_BACKENDS[request.param])
    database_servers.empty_tables(url)
    return url


@pytest.fixture(params=BACKENDS)
def empty_database_url(
    request: pytest.FixtureRequest, tmp_path: Path, database_servers: DatabaseServers
) -> Iterator[str]:
    """A database with no schema at all (for migration tests), dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    backend = SERVER_BACKENDS[request.param]
    url = database_servers.create_database(backend, f"empty_{os.urandom(4).hex()}")
    yield url
    database_servers.drop_database(backend, url)


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the operator's (or the Makefile's) TELEMETRY_* variables out of the tests."""
    for name, _default, _help in describe():
        monkeypatch.delenv(name, raising=False)


AppFactory = Callable[..., Flask]


@pytest.fixture
def make_app(request: pytest.FixtureRequest) -> Iterator[AppFactory]:
    """Build apps on `database_url` with typed setting overrides; all closed afterwards.

    A test without `database_url` in its own arguments passes `database_url=...`.
    """
    apps: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        if "database_url" not in overrides:
            overrides["database_url"] = request.getfixturevalue("database_url")
        # No maintenance thread unless a test asks for one.
        overrides.setdefault("maintenance_interval_seconds", 0)
        app = create_app(load_settings({}, **overrides))
        apps.append(app)
        return app

    yield build
    for app in apps:
        close_app(app)


def close_app(app: Flask) -> None:
    stop_scheduler(app)
    app.extensions["telemetry.ingestor"].close()
    app.extensions["telemetry.engine"].dispose()


@pytest.fixture
def app(request: pytest.FixtureRequest, make_app: AppFactory, database_url: str) -> Flask:
    """The app on `database_url`; indirect parametrization passes setting overrides."""
    return make_app(**getattr(request, "param", {}))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    """An engine on the test's (migrated) database."""
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def write_hits(engine: sa.Engine, hits: Sequence[NewHit]) -> None:
    """Commit `hits` the way /track does (one HitStore transaction)."""
    store = HitStore(engine)
    try:
        store.write(hits)
    finally:
        store.close()


@pytest.fixture
def stored_hits(database_url: str) -> Iterator[Callable[[], list[Hit]]]:
    """Read every stored hit, in insertion order, through SQLAlchemy."""
    engine = make_engine(database_url)

    def read() -> list[Hit]:
        with Session(engine) as session:
            return list(session.scalars(sa.select(Hit).order_by(Hit.id)))

    yield read
    engine.dispose()


@pytest.fixture
def count_rows(database_url: str) -> Iterator[Callable[[str], int]]:
    """How many rows a table holds."""
    engine = make_engine(database_url)

    def count(table: str) -> int:
        with engine.connect() as connection:
            return connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()

    yield count
    engine.dispose()


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


# A desktop browser, so that stored hits are not flagged as bots unless a test wants it.
BROWSER_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)


@pytest.fixture
def browser_headers() -> dict[str, str]:
    return {"User-Agent": BROWSER_UA}
