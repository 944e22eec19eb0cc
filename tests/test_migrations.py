"""Alembic is the only way the schema changes, on every backend: CI's round trip."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from conftest import SERVER_BACKENDS

from db import Backend, HitStore, NewHit, backend_of, make_engine, migrate
from db.aggregates import AGGREGATES, ROLLUP_TABLES, Mechanism, mechanism_of
from db.models import Base

TABLES = {"hits", "seen_events", "hash_salts", "rollup_watermarks"}


def tables(url: str) -> set[str]:
    """The migrated tables, leaving out the rollup tables of the aggregates."""
    engine = make_engine(url)
    try:
        found = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
        if "rollup_watermarks" in found and mechanism_of(engine) is Mechanism.ROLLUP_TABLES:
            assert found >= ROLLUP_TABLES
        return found - ROLLUP_TABLES
    finally:
        engine.dispose()


def revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        return migrate.current_revision(engine)
    finally:
        engine.dispose()


def test_upgrade_check_downgrade_upgrade_round_trip(empty_database_url):
    url = empty_database_url

    migrate.upgrade(url)
    assert tables(url) == TABLES
    assert revision(url) == migrate.head_revision()
    migrate.check(url)  # models and migrations agree

    migrate.downgrade(url, "base")
    assert tables(url) == set()
    assert revision(url) is None

    migrate.upgrade(url)
    assert tables(url) == TABLES
    migrate.check(url)


def aggregate_rows(url: str) -> dict[str, int]:
    """Rows each aggregate relation answers with (all of them exist, by the same name)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return {
                a.name: connection.execute(sa.text(f"SELECT count(*) FROM {a.name}")).scalar_one()
                for a in AGGREGATES
            }
    finally:
        engine.dispose()


def a_hit(ts: datetime, path: str = "/") -> NewHit:
    return NewHit(ts, "example.com", path, None, b"v" * 16, "UA", None, None, "desktop", False)


# One visitor's hits, one an hour for 50 hours from 1 May 00:00, paths /0, /1, /2 in turn.
FIFTY_HOURS = {
    "hits_hourly": 50, "visitors_daily": 3, "site_hourly": 50, "site_daily": 3,
    "site_monthly": 1, "paths_daily": 8, "referrers_daily": 3, "agents_daily": 3,
    "visitors_monthly": 1,
}  # fmt: skip


def test_downgrade_and_upgrade_keep_the_hits(empty_database_url):
    url = empty_database_url
    migrate.upgrade(url)
    engine = make_engine(url)
    store = HitStore(engine)
    start = datetime(2026, 5, 1, tzinfo=UTC)
    store.write([a_hit(start + timedelta(hours=n), f"/{n % 3}") for n in range(50)])
    store.close()
    engine.dispose()
    assert aggregate_rows(url) == FIFTY_HOURS

    migrate.downgrade(url, "0001")
    assert tables(url) == TABLES - {"rollup_watermarks"}
    migrate.upgrade(url)
    migrate.check(url)

    engine = make_engine(url)
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM hits")).scalar_one() == 50
    store = HitStore(engine)
    store.write([a_hit(start, "/0")])  # the id sequence carried over
    store.close()
    engine.dispose()
    assert aggregate_rows(url) == FIFTY_HOURS


def test_models_declare_exactly_the_migrated_tables():
    assert set(Base.metadata.tables) == TABLES


def test_indexes_serve_the_reads_and_none_is_on_ip_hash(empty_database_url):
    migrate.upgrade(empty_database_url)
    engine = make_engine(empty_database_url)
    indexes = {tuple(ix["column_names"]) for ix in sa.inspect(engine).get_indexes("hits")}
    engine.dispose()

    assert {("ts",), ("site", "ts")} <= indexes
    # Each index is paid on every insert; one on the random hash buys no read.
    assert not any("ip_hash" in columns for columns in indexes)


@pytest.mark.parametrize("database_url", ["timescaledb"], indirect=True)
def test_hits_is_a_hypertable_on_timescaledb(database_url):
    engine = make_engine(database_url)
    with engine.connect() as connection:
        hypertables = connection.execute(
            sa.text("SELECT hypertable_name FROM timescaledb_information.hypertables")
        ).scalars()
        interval = connection.execute(
            sa.text(
                "SELECT time_interval FROM timescaledb_information.dimensions "
                "WHERE hypertable_name = 'hits' AND column_name = 'ts'"
            )
        ).scalar_one()
        key = sa.inspect(connection).get_pk_constraint("hits")
    engine.dispose()

    assert "hits" in set(hypertables)
    assert interval == timedelta(hours=24)  # TELEMETRY_CHUNK_INTERVAL_HOURS
    # A hypertable's unique indexes must hold the time column.
    assert key["constrained_columns"] == ["id", "ts"]


def test_migration_installs_timescaledb_when_the_server_offers_it(database_servers):
    # A database on the TimescaleDB server without the extension created beforehand.
    backend = dataclasses.replace(SERVER_BACKENDS["timescaledb"], extensions=())
    url = database_servers.create_database(backend, "offered")
    try:
        migrate.upgrade(url)
        engine = make_engine(url)
        assert backend_of(engine) is Backend.TIMESCALEDB
        engine.dispose()
    finally:
        database_servers.drop_database(backend, url)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_plain_postgresql_stays_plain(database_url):
    engine = make_engine(database_url)
    assert backend_of(engine) is Backend.POSTGRESQL
    assert mechanism_of(engine) is Mechanism.ROLLUP_TABLES
    engine.dispose()
