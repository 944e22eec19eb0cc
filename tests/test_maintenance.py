"""Backends and their upkeep: which aggregate mechanism runs where, retention,
the maintenance scheduler and its lock, the operator commands, and a database
that cannot take writes answering 503."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import write_hits

from api.cli import main
from db import Backend, HitStore, NewHit, StorageUnavailable, backend_of
from db.aggregates import (
    AGGREGATES,
    Bucket,
    Mechanism,
    mechanism_of,
    refresh,
    relation,
    watermarks,
)
from db.maintenance import MaintenancePolicy, maintenance_lock, run_maintenance
from db.retention import RetentionPolicy, apply_retention
from db.timescaledb import license_of

# Early in a month, two days after the late-event window of the month before closed.
NOW = datetime(2026, 7, 5, 12, 30, tzinfo=UTC)
JUNE, JULY = datetime(2026, 6, 1, tzinfo=UTC), datetime(2026, 7, 1, tzinfo=UTC)


def a_hit(ts: datetime, event_id: str | None = None) -> NewHit:
    return NewHit(
        ts, "a.example", "/", None, b"v" * 16, "Mozilla/5.0", None, None, "desktop", False, event_id
    )


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
    assert caggs == {aggregate.name: False for aggregate in AGGREGATES}
    assert len(policies) == len(AGGREGATES)


# -- retention -----------------------------------------------------------------------------


def test_retention_deletes_old_hits_and_their_idempotency_keys(engine):
    days = [NOW - timedelta(days=d, hours=1) for d in range(12)]
    write_hits(engine, [a_hit(ts, f"event-{n}") for n, ts in enumerate(days)])
    refresh(engine, now=NOW)

    result = apply_retention(engine, RetentionPolicy(raw_days=7), NOW)

    cutoff = datetime(2026, 6, 28, tzinfo=UTC)  # midnight, 7 days back
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
    write_hits(engine, [a_hit(NOW - timedelta(days=d)) for d in range(12)])

    apply_retention(engine, RetentionPolicy(raw_days=7), NOW)  # no refresh yet

    if mechanism_of(engine) is Mechanism.ROLLUP_TABLES:
        assert count(engine, "hits") == 12
        refresh(engine, now=NOW)
        apply_retention(engine, RetentionPolicy(raw_days=7), NOW)
    assert count(engine, "hits") == 8
    assert count(engine, "visitors_daily") == 12


def test_refresh_never_recomputes_buckets_before_the_retention_cutoff(engine):
    write_hits(engine, [a_hit(NOW - timedelta(days=d)) for d in range(12)])
    refresh(engine, now=NOW)
    policy = RetentionPolicy(raw_days=7)
    apply_retention(engine, policy, NOW)

    refresh(engine, NOW - timedelta(days=30), NOW, raw_hits_from=policy.raw_cutoff(NOW))

    assert count(engine, "visitors_daily") == 12


def test_aggregate_retention_deletes_old_aggregate_rows(engine):
    write_hits(engine, [a_hit(NOW - timedelta(days=d)) for d in range(12)])
    refresh(engine, now=NOW)

    result = apply_retention(engine, RetentionPolicy(aggregate_days=7), NOW)

    if mechanism_of(engine) is Mechanism.ROLLUP_TABLES:
        # 28 June 12:30 is kept: the cut-off is midnight. So is June: part of it is kept.
        assert result.aggregate_rows_deleted == {
            a.name: 0 if a.bucket is Bucket.MONTH else 4 for a in AGGREGATES
        }
        assert count(engine, "visitors_daily") == 8
        assert count(engine, "visitors_monthly") == 2
    assert count(engine, "hits") == 12


def site_monthly_hits(engine: sa.Engine, month: datetime) -> int | None:
    monthly = relation("site_monthly")
    with engine.connect() as connection:
        return connection.execute(
            sa.select(monthly.c.hits).where(monthly.c.bucket == month)
        ).scalar_one_or_none()


def only_rollups(engine: sa.Engine) -> None:
    if mechanism_of(engine) is Mechanism.CONTINUOUS_AGGREGATES:
        pytest.skip("continuous aggregates are scheduled by TimescaleDB's refresh policies")


def test_retention_keeps_the_raw_hits_a_monthly_rollup_will_read(engine):
    only_rollups(engine)
    # One hit a day, 20 May to 20 June.
    write_hits(
        engine,
        [a_hit(datetime(2026, 5, 20, 12, tzinfo=UTC) + timedelta(days=d)) for d in range(32)],
    )
    mid_june = datetime(2026, 6, 20, 12, 30, tzinfo=UTC)
    refresh(engine, now=mid_june)

    result = apply_retention(engine, RetentionPolicy(raw_days=7), mid_june)

    # June is live in the monthly aggregates: its raw hits stay, May's go.
    assert result.raw_cutoff == JUNE
    assert count(engine, "hits") == 20
    # Materialised once June is over, the month is whole.
    refresh(engine, now=JULY + timedelta(minutes=30))
    assert site_monthly_hits(engine, JUNE) == 20
    # While late events may still land in June, June's raw hits stay; then they go.
    assert apply_retention(engine, RetentionPolicy(raw_days=7), JULY).raw_cutoff == JUNE
    after_late_events = JULY + timedelta(hours=49)
    refresh(engine, now=after_late_events)
    result = apply_retention(engine, RetentionPolicy(raw_days=7), after_late_events)
    assert result.raw_cutoff == datetime(2026, 6, 26, tzinfo=UTC)
    assert count(engine, "hits") == 0
    assert site_monthly_hits(engine, JUNE) == 20
    assert site_monthly_hits(engine, datetime(2026, 5, 1, tzinfo=UTC)) == 12


def test_a_scheduled_refresh_rematerialises_a_month_at_most_hourly(database_url, engine):
    only_rollups(engine)
    policy = MaintenancePolicy()

    def refreshed_by_maintenance(minutes_into_july: int) -> set[str]:
        run = run_maintenance(engine, policy, JULY + timedelta(minutes=minutes_into_july))
        assert run is not None
        return {step.name for step in run.refreshed}

    write_hits(engine, [a_hit(datetime(2026, 6, 30, 20, tzinfo=UTC))])
    assert "site_monthly" in refreshed_by_maintenance(10)
    assert site_monthly_hits(engine, JUNE) == 1

    # Late events for 30 June arrive after midnight.
    write_hits(engine, [a_hit(datetime(2026, 6, 30, 21, tzinfo=UTC))])
    refreshed = refreshed_by_maintenance(40)
    assert "site_daily" in refreshed and "site_monthly" not in refreshed
    assert count(engine, "site_daily WHERE hits = 2") == 1
    assert site_monthly_hits(engine, JUNE) == 1  # the month waits for its hourly turn
    assert "site_monthly" in refreshed_by_maintenance(70)
    assert site_monthly_hits(engine, JUNE) == 2

    # The operator's refresh does not wait.
    write_hits(engine, [a_hit(datetime(2026, 6, 30, 22, tzinfo=UTC))])
    assert "site_monthly" not in refreshed_by_maintenance(80)
    assert "site_monthly: recomputed [2026-06-01" in run_cli(database_url, "rollup", "refresh")
    assert site_monthly_hits(engine, JUNE) == 3


def test_late_events_land_in_a_materialised_month_within_48_hours(engine):
    only_rollups(engine)
    write_hits(engine, [a_hit(datetime(2026, 6, 30, 20, tzinfo=UTC))])
    refresh(engine, now=datetime(2026, 7, 2, 10, tzinfo=UTC), scheduled=True)
    assert watermarks(engine)["site_monthly"] == JULY

    # Accepted at 11:00 on 2 July, 39 hours after it happened.
    write_hits(engine, [a_hit(datetime(2026, 6, 30, 20, 30, tzinfo=UTC))])
    refresh(engine, now=datetime(2026, 7, 2, 11, 30, tzinfo=UTC), scheduled=True)
    assert site_monthly_hits(engine, JUNE) == 2

    def monthly_window_start(now: datetime) -> datetime | None:
        steps = refresh(engine, now=now, scheduled=True, names=["site_monthly"])
        return steps[0].start

    # An event accepted since 11:30 on 2 July may still be in June ...
    assert monthly_window_start(datetime(2026, 7, 10, tzinfo=UTC)) == JUNE
    # ... but none accepted since 10 July: June is left alone from then on.
    assert monthly_window_start(datetime(2026, 7, 10, 2, tzinfo=UTC)) == JULY


@pytest.mark.parametrize("database_url", ["timescaledb"], indirect=True)
def test_retention_drops_whole_chunks_on_timescaledb(engine):
    write_hits(
        engine, [a_hit(NOW - timedelta(days=d, hours=h)) for d in range(12) for h in (1, 13)]
    )

    def chunks() -> int:
        return count(engine, "timescaledb_information.chunks WHERE hypertable_name = 'hits'")

    refresh(engine, now=NOW)
    before = chunks()
    result = apply_retention(engine, RetentionPolicy(raw_days=7), NOW)

    assert result.chunks_dropped == before - chunks() >= 4
    assert count(engine, "hits") == 15  # from 28 June 00:00 on


# -- the scheduler and its lock --------------------------------------------------------------


def test_only_one_maintenance_run_at_a_time(engine):
    with maintenance_lock(engine) as first, maintenance_lock(engine) as second:
        assert (first, second) == (True, False)
        assert run_maintenance(engine, MaintenancePolicy(), NOW) is None
    with maintenance_lock(engine) as again:
        assert again


def test_the_scheduler_refreshes_the_aggregates(make_app, engine):
    write_hits(engine, [a_hit(datetime.now(UTC) - timedelta(hours=3))])
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
    write_hits(engine, [a_hit(NOW)])
    refresh(engine, now=NOW)

    output = run_cli(database_url, "db", "info")

    info = dict(line.split(":", 1) for line in output.splitlines())
    info = {label: value.strip() for label, value in info.items()}
    backend = backend_of(engine)
    assert info["backend"] == str(backend)
    names = ", ".join(a.name for a in AGGREGATES)
    assert info["aggregates"] == f"{mechanism_of(engine)} ({names})"
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
        assert info["materialized hits_hourly"] == "before 2026-07-05T12:00:00+00:00"
        assert info["materialized visitors_daily"] == "before 2026-07-05T00:00:00+00:00"
        assert info["materialized visitors_monthly"] == "before 2026-07-01T00:00:00+00:00"


def test_rollup_refresh_command(database_url, engine):
    write_hits(engine, [a_hit(datetime.now(UTC) - timedelta(hours=2))])

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
    write_hits(engine, [a_hit(datetime.now(UTC) - timedelta(days=d)) for d in (1, 30)])

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
