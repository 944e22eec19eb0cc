"""The `telemetry` command for operators."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from typing import Any

import click
from sqlalchemy import Engine

from api.maintenance import policy_from
from api.settings import Settings, SettingsError, describe, load_settings
from db import aggregates, make_engine, migrate
from db.info import database_info
from db.maintenance import run_maintenance


def _load() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def main() -> None:
    """Self-hosted traffic telemetry. Settings come from TELEMETRY_* variables."""


@main.command()
@click.option("--bind", help="HOST:PORT to listen on (default: TELEMETRY_BIND).")
@click.option("--workers", type=int, help="Worker processes (default: TELEMETRY_WORKERS).")
def serve(bind: str | None, workers: int | None) -> None:
    """Migrate the database and serve the API with gunicorn."""
    _load()  # fail here, with the variable named, rather than inside gunicorn
    env = dict(os.environ)
    if bind:
        env["TELEMETRY_BIND"] = bind
    if workers:
        env["TELEMETRY_WORKERS"] = str(workers)
    argv = [sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf"]
    os.execvpe(sys.executable, argv, env)


@main.group()
def db() -> None:
    """Schema migrations."""


@db.command()
@click.argument("revision", default="head")
def upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    migrate.upgrade(_load().database_url, revision)
    click.echo(f"database at {revision}")


@db.command()
@click.argument("revision")
def downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (`base` empties the database)."""
    migrate.downgrade(_load().database_url, revision)
    click.echo(f"database at {revision}")


@db.command()
def current() -> None:
    """Print the database's revision and whether it is the newest."""
    engine = make_engine(_load().database_url)
    revision = migrate.current_revision(engine)
    head = migrate.head_revision()
    state = "head" if revision == head else f"behind (head is {head})"
    click.echo(f"{revision or 'empty'} ({state})")


@db.command()
def info() -> None:
    """Print the backend, its version, the TimescaleDB license, the aggregate
    mechanism in use and how far each aggregate is materialised."""
    engine = _engine(_load())
    try:
        lines = database_info(engine)
    finally:
        engine.dispose()
    width = max(len(label) for label, _value in lines)
    for label, value in lines:
        click.echo(f"{label + ':':<{width + 1}} {value}")


def _engine(settings: Settings) -> Engine:
    return make_engine(
        settings.database_url,
        sqlite_synchronous=settings.sqlite_synchronous,
        sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
    )


class _UTCTime(click.ParamType):
    """An ISO 8601 date or time; UTC unless it names an offset."""

    name = "ISO-TIME"

    def convert(self, value: Any, param: Any, ctx: Any) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date or time", param, ctx)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


@main.group()
def rollup() -> None:
    """The aggregates (hits_hourly, visitors_daily, ...)."""


@rollup.command()
@click.option("--from", "start", type=_UTCTime(), help="Recompute buckets from this time on.")
@click.option("--to", "end", type=_UTCTime(), help="Recompute buckets before this time.")
def refresh(start: datetime | None, end: datetime | None) -> None:
    """Bring the aggregates up to date, or recompute [--from, --to) after an
    import or an erasure. Waits for no lock: the scheduler's run may overlap."""
    settings = _load()
    engine = _engine(settings)
    try:
        now = datetime.now(UTC)
        raw_from = policy_from(settings).retention.raw_cutoff(now)
        done = aggregates.refresh(engine, start, end, now=now, raw_hits_from=raw_from)
    finally:
        engine.dispose()
    for step in done:
        span = f"[{_iso(step.start)}, {_iso(step.end)})"
        tail = f"; materialized before {_iso(step.watermark)}" if step.watermark else ""
        click.echo(f"{step.name}: recomputed {span}{tail}")


def _iso(ts: datetime | None) -> str:
    return ts.isoformat() if ts else "the beginning"


@main.group()
def retention() -> None:
    """Deleting old hits and aggregate rows (TELEMETRY_RETENTION_DAYS, ...)."""


@retention.command("apply")
def apply_retention() -> None:
    """Delete what is past retention now and apply the compression policy."""
    settings = _load()
    engine = _engine(settings)
    policy = policy_from(settings)
    try:
        result = run_maintenance(engine, policy, compression=True)
    finally:
        engine.dispose()
    if result is None:
        raise click.ClickException("another maintenance run holds the lock; try again shortly")
    expired = result.retention
    if expired.raw_cutoff is None:
        click.echo("raw hits: kept forever (TELEMETRY_RETENTION_DAYS=0)")
    else:
        click.echo(
            f"raw hits before {expired.raw_cutoff.isoformat()}: {expired.hits_deleted} deleted, "
            f"{expired.chunks_dropped} chunks dropped, "
            f"{expired.seen_events_deleted} idempotency keys deleted"
        )
    if expired.aggregate_cutoff is None:
        click.echo("aggregates: kept forever (TELEMETRY_AGGREGATE_RETENTION_DAYS=0)")
    else:
        for name, count in expired.aggregate_rows_deleted.items():
            click.echo(f"{name} before {expired.aggregate_cutoff.isoformat()}: {count} deleted")
    click.echo(f"compression: {result.compression}")


@main.command()
@click.option("--markdown", is_flag=True, help="Print the settings table of README.md instead.")
def config(markdown: bool) -> None:
    """Print the effective settings (secrets masked)."""
    if markdown:
        click.echo("| Variable | Default | Meaning |")
        click.echo("|---|---|---|")
        for name, default, help_text in describe():
            shown = f"`{default}`" if default else "(empty)"
            click.echo(f"| `{name}` | {shown} | {help_text} |")
        return
    for name, value in _load().masked().items():
        click.echo(f"{name}={value}")
