"""Retention as operators meet it: the settings enforced by each worker's
scheduler and by `telemetry retention apply`, on every backend.
(tests/test_maintenance.py covers the cut-offs and mechanisms in detail.)"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from click.testing import CliRunner

from api.cli import main
from db import HitStore, NewHit


def count(engine: sa.Engine, relation: str) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text(f"SELECT count(*) FROM {relation}")).scalar_one()


def write_recent_and_old(engine: sa.Engine) -> None:
    """A hit yesterday and one 60 days ago (in a long closed month)."""
    now = datetime.now(UTC)
    store = HitStore(engine)
    store.write(
        [
            NewHit(now - timedelta(days=days), "a.example", "/", None, bytes([days]) * 16,
                   "Mozilla/5.0", None, None, "desktop", False, f"event-{days}")
            for days in (1, 60)
        ]
    )  # fmt: skip
    store.close()


def test_the_scheduler_enforces_both_retention_settings(make_app, engine):
    write_recent_and_old(engine)

    app = make_app(maintenance_interval_seconds=0.05, retention_days=7, aggregate_retention_days=7)
    scheduler = app.extensions["telemetry.scheduler"]
    deadline = time.monotonic() + 20
    while scheduler.runs == 0 and time.monotonic() < deadline:
        time.sleep(0.05)

    assert scheduler.runs >= 1
    assert count(engine, "hits") == 1
    assert count(engine, "seen_events") == 1
    assert count(engine, "visitors_daily") == 1
    assert count(engine, "site_daily") == 1


def test_retention_apply_enforces_aggregate_retention(database_url, engine):
    write_recent_and_old(engine)

    result = CliRunner().invoke(
        main,
        ["retention", "apply"],
        env={"TELEMETRY_DATABASE_URL": database_url, "TELEMETRY_AGGREGATE_RETENTION_DAYS": "30"},
    )

    assert result.exit_code == 0, result.output
    assert "raw hits: kept forever" in result.output
    assert "visitors_daily before" in result.output
    assert count(engine, "hits") == 2  # raw hits are kept: only the aggregates expire
    assert count(engine, "visitors_daily") == 1
    assert count(engine, "site_daily") == 1
