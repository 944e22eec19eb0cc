"""Backends and their upkeep: which aggregate mechanism runs where, retention,
the maintenance scheduler and its lock, the operator commands, and a database
that cannot take writes answering 503."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from api.cli import main
from db import Backend, HitStore, NewHit, StorageUnavailable, backend_of, make_engine
from db.aggregates import AGGREGATES, Mechanism, mechanism_of, refresh, watermarks
from db.maintenance import MaintenancePolicy, maintenance_lock, run_maintenance
from db.retention import RetentionPolicy, apply_retention
from db.timescaledb import license_of

NOW = datetime(2026, 6, 20, 12, 30, tzinfo=UTC)


def a_hit(ts: datetime, event_id: str | None = None) -> NewHit:
    return NewHit(
        ts, "a.example", "/", None, b"v" * 16, "Mozilla/5.0", None, None, "desktop", False, event_id
    )


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def write(engine: sa.Engine, hits: list[NewHit]) -> None:
    store = HitStore(engine)
    try:
        store.write(hits)
    finally:
        store.close()


def count(engine: sa.Engine, relation: str) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text(f"SELECT count(*) FROM {relation}")).scalar_one()


def timescale_license(engine: sa.Engine) -> str | None:
    with engine.connect() as connection:
        return license_of(connection)


# -- which mechanism runs where ------------------------------------------------------------


def test_every_backend_has_the_aggregates_by_the_same_names(engine):
    for aggregate in AGGREGATES:
        assert count(engine, aggregate.name) == 0
    expected = Mechanism.ROLLUP_TABLES
    if timescale_license(engine) == "timescale":
        expected = Mechanism.CONTINUOUS_AGGREGATES
    assert mechanism_of(engine) is expected


@pytest.mark.parametrize("database_url", ["timescaledb"], indirect=True)
def test_continuous_aggregates_on_full_license_timescaledb(engine):
    if timescale_license(engine) != "timescale":
        pytest.skip(
            f"TimescaleDB license is {timescale_license(engine)!r}: continuous aggregates need "
            "the full license; point TELEMETRY_TEST_TIMESCALE_URL at e.g. timescale/timescaledb"
        )
    with engine.connect() as connection:
        caggs = dict(
            connection.execute(
                sa.text(
                    "SELECT view_name, materialized_only "
                    "FROM timescaledb_information.continuous_aggregates"
                )
            ).all()
        )
        policies = set(
            connection.execute(
                sa.text(
                    "SELECT hypertable_name FROM timescaledb_information.jobs "
                    "WHERE proc_name = 'policy_refresh_continuous_aggregate'"
                )
            ).scalars()
        )
    assert caggs == {"hits_hourly": False, "visitors_daily": False}
    assert len(policies) == 2


# -- retention -----------------------------------------------------------------------------


def test_retention_deletes_old_hits_and_their_idempotency_keys(engine):
    days = [NOW - timedelta(days=d, hours=1) for d in range(12)]
    write(engine, [a_hit(ts, f"event-{n}") for n, ts in enumerate(days)])
    refresh(engine, now=NOW)

    result = apply_retention(engine, RetentionPolicy(raw_days=7), NOW)

    cutoff = datetime(2026, 6, 13, tzinfo=UTC)  # midnight, 7 days back
    assert result.raw_cutoff == cutoff
    assert result.hits_deleted + result.chunks_dropped > 0
    with engine.connect() as connection:
        oldest = connection.execute(sa.text("SELECT min(ts) FROM hits")).scalar_one()
    kept = [ts for ts in days if ts >= cutoff]
    assert count(engine, "hits") == len(kept) == count(engine, "seen_events")
    assert str(oldest)[:10] == min(kept).isoformat()[:10]
    # The aggregates keep every day: they outlive raw hits.
    assert count(engine, "visitors_daily") == 12


def test_retention_keeps_hits_the_rollups_have_not_materialised(engine):
    write(engine, [a_hit(NOW - timedelta(days=d)) for d in range(12)])

    apply_retention(engine, RetentionPolicy(raw_days=7), NOW)  # no refresh yet

    if mechanism_of(engine) is Mechanism.ROLLUP_TABLES:
        assert count(engine, "hits") == 12
        refresh(engine, now=NOW)
        apply_retention(engine, RetentionPolicy(raw_days=7), NOW)
    assert count(engine, "hits") == 8
    assert count(engine, "visitors_daily") == 12


def test_refresh_never_recomputes_buckets_before_the_retention_cutoff(engine):
    write(engine, [a_hit(NOW - timedelta(days=d)) for d in range(12)])
    refresh(engine, now=NOW)
    policy = RetentionPolicy(raw_days=7)
    apply_retention(engine, policy, NOW)

    refresh(engine, NOW - timedelta(days=30), NOW, raw_hits_from=policy.raw_cutoff(NOW))

    assert count(engine, "visitors_daily") == 12


def test_aggregate_retention_deletes_old_aggregate_rows(engine):
    write(engine, [a_hit(NOW - timedelta(days=d)) for d in range(12)])
    refresh(engine, now=NOW)

    result = apply_retention(engine, RetentionPolicy(aggregate_days=7), NOW)

    if mechanism_of(engine) is Mechanism.ROLLUP_TABLES:
        # 13 June 12:30 is kept: the cut-off is midnight.
        assert result.aggregate_rows_deleted == {"hits_hourly": 4, "visitors_daily": 4}
        assert count(engine, "visitors_daily") == 8
    assert count(engine, "hits") == 12


@pytest.mark.parametrize("database_url", ["timescaledb"], indirect=True)
def test_retention_drops_whole_chunks_on_timescaledb(engine):
    write(engine, [a_hit(NOW - timedelta(days=d, hours=h)) for d in range(12) for h in (1, 13)])

    def chunks() -> int:
        return count(engine, "timescaledb_information.chunks WHERE hypertable_name = 'hits'")

    refresh(engine, now=NOW)
    before = chunks()
    result = apply_retention(engine, RetentionPolicy(raw_days=7), NOW)

    assert result.chunks_dropped == before - chunks() >= 4
    assert count(engine, "hits") == 15  # from 13 June 00:00 on


# -- the scheduler and its lock --------------------------------------------------------------


def test_only_one_maintenance_run_at_a_time(engine):
    with maintenance_lock(engine) as first, maintenance_lock(engine) as second:
        assert (first, second) == (True, False)
        assert run_maintenance(engine, MaintenancePolicy(), NOW) is None
    with maintenance_lock(engine) as again:
        assert again


def test_the_scheduler_refreshes_the_aggregates(make_app, engine):
    write(engine, [a_hit(datetime.now(UTC) - timedelta(hours=3))])
    if mechanism_of(engine) is Mechanism.CONTINUOUS_AGGREGATES:
        pytest.skip("continuous aggregates are refreshed by TimescaleDB's policies")
    before = watermarks(engine)["hits_hourly"]

    app = make_app(maintenance_interval_seconds=0.05)
    scheduler = app.extensions["telemetry.scheduler"]
    deadline = time.monotonic() + 10
    while scheduler.runs == 0 and time.monotonic() < deadline:
        time.sleep(0.02)

    assert scheduler.runs >= 1
    after = watermarks(engine)["hits_hourly"]
    assert after is not None and before is not None and after > before
    assert count(engine, "hits_hourly_rollup") == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_scheduler_is_off_in_tests_unless_asked(make_app, database_url):
    assert "telemetry.scheduler" not in make_app().extensions


# -- the operator commands ---------------------------------------------------------------


def run_cli(database_url: str, *args: str, **env: str):
    result = CliRunner().invoke(main, args, env={"TELEMETRY_DATABASE_URL": database_url, **env})
    assert result.exit_code == 0, result.output
    return result.output


def test_db_info_names_backend_version_license_and_mechanism(database_url, engine):
    write(engine, [a_hit(NOW)])
    refresh(engine, now=NOW)

    output = run_cli(database_url, "db", "info")

    info = dict(line.split(":", 1) for line in output.splitlines())
    info = {label: value.strip() for label, value in info.items()}
    backend = backend_of(engine)
    assert info["backend"] == str(backend)
    assert info["aggregates"] == f"{mechanism_of(engine)} (hits_hourly, visitors_daily)"
    if backend is Backend.SQLITE:
        assert info["server"].startswith("SQLite 3.")
        assert "timescaledb" not in info
    if backend is Backend.POSTGRESQL:
        assert info["server"].startswith("PostgreSQL ")
        assert "timescaledb" not in info
    if backend is Backend.TIMESCALEDB:
        assert info["server"].startswith("PostgreSQL ")
        assert info["timescaledb"].startswith("2.")
        assert info["timescaledb license"] == timescale_license(engine)
        assert info["hits hypertable"] == "chunks of 1 day, 0:00:00"
        if info["timescaledb license"] == "apache":
            assert info["compression"] == "unavailable (apache license)"
    if mechanism_of(engine) is Mechanism.ROLLUP_TABLES:
        assert info["materialized hits_hourly"] == "before 2026-06-20T12:00:00+00:00"
        assert info["materialized visitors_daily"] == "before 2026-06-20T00:00:00+00:00"


def test_rollup_refresh_command(database_url, engine):
    write(engine, [a_hit(datetime.now(UTC) - timedelta(hours=2))])

    output = run_cli(database_url, "rollup", "refresh")
    assert "hits_hourly: recomputed" in output
    assert count(engine, "hits_hourly") == 1

    output = run_cli(
        database_url, "rollup", "refresh", "--from", "2026-01-01", "--to", "2026-01-02"
    )
    assert "visitors_daily: recomputed [2026-01-01T00:00:00+00:00" in output


def test_rollup_refresh_refuses_a_bad_time(database_url):
    result = CliRunner().invoke(
        main,
        ["rollup", "refresh", "--from", "yesterday"],
        env={"TELEMETRY_DATABASE_URL": database_url},
    )
    assert result.exit_code != 0
    assert "not an ISO 8601" in result.output


def test_retention_apply_command(database_url, engine):
    write(engine, [a_hit(datetime.now(UTC) - timedelta(days=d)) for d in (1, 30)])

    output = run_cli(database_url, "retention", "apply", TELEMETRY_RETENTION_DAYS="7")

    assert "raw hits before" in output
    assert "aggregates: kept forever" in output
    assert "compression:" in output
    assert count(engine, "hits") == 1
    assert count(engine, "visitors_daily") == 2  # refreshed before the hits went


# -- a database that cannot take writes ------------------------------------------------------


@pytest.mark.parametrize("database_url", ["postgresql", "timescaledb"], indirect=True)
def test_a_read_only_server_is_storage_unavailable(database_url):
    # What a standby (e.g. the old primary after a failover) answers to a write.
    engine = sa.create_engine(
        database_url, connect_args={"options": "-c default_transaction_read_only=on"}
    )
    store = HitStore(engine)
    with pytest.raises(StorageUnavailable, match="read-only"):
        store.write([a_hit(NOW)])
    store.close()
    engine.dispose()
