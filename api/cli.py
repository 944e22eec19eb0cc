"""The `telemetry` command for operators."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa
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


@main.command()
@click.option("--month", required=True, help="The month to report on: YYYY-MM.")
@click.option("--site", help="One site (default: all sites together).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    help="File to write (default: stdout for json, report-SITE-MONTH.FORMAT otherwise).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["html", "json", "png", "pdf"]),
    default="html",
    show_default=True,
    help="html: one self-contained page; json: every figure as data; png/pdf: via Chromium.",
)
@click.option("--include-bots", is_flag=True, help="Count bots in every figure.")
def report(month: str, site: str | None, out: str | None, fmt: str, include_bots: bool) -> None:
    """The monthly report of a site: traffic, baseline and anomalies, visitors,
    paths, referrers, agents. Dates are in TELEMETRY_TIMEZONE."""
    # Imported here: pandas and plotly take a while to load, and only reports need them.
    import json
    from pathlib import Path

    from tqdm import tqdm

    from analytics.errors import AnalyticsError
    from analytics.figures import STEPS, compute, month_range

    settings = _load()
    try:
        start, end = month_range(month)
    except AnalyticsError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None
    engine = _engine(settings)
    try:
        with tqdm(total=len(STEPS), desc=f"report {month}", unit="step", file=sys.stderr) as bar:

            def advance(step: str) -> None:
                bar.set_postfix_str(step)
                bar.update()

            data = compute(
                engine,
                site,
                start,
                end,
                settings.timezone,
                include_bots,
                settings.anomaly_margin,
                progress=advance,
            )
    except AnalyticsError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        engine.dispose()

    if fmt == "json" and out is None:
        click.echo(json.dumps(data, indent=2))
        return
    target = Path(out or f"report-{site or 'all'}-{month}.{fmt}")
    if fmt == "json":
        # Written beside the target and renamed into place: never a half-written file.
        partial = target.with_name(f".{target.name}.partial")
        try:
            partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    else:
        from analytics.report import ChromiumNotFound, write_report

        try:
            write_report(data, fmt, target)
        except ChromiumNotFound as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {target}", err=True)


# -- data lifecycle: import, copy, export, erase ------------------------------------------
# Their heavy modules (pyarrow, tqdm) are imported by the commands, not at start-up.


@main.command("import")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--format",
    "log_format",
    type=click.Choice(["combined", "common", "nginx-json"]),
    default="combined",
    show_default=True,
    help="Access-log format (files may be gzipped).",
)
@click.option(
    "--site", help="Site of the hits (default: the log's host, else TELEMETRY_DEFAULT_SITE)."
)
@click.option("--include-static", is_flag=True, help="Also import static assets (.css, .js, ...).")
@click.option("--all-methods", is_flag=True, help="Also import requests other than GET.")
@click.option("--all-statuses", is_flag=True, help="Also import answers other than 2xx and 3xx.")
@click.option(
    "--max-errors",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Malformed lines allowed (in all files); the import stops past it.",
)
def import_logs(
    files: tuple[Path, ...],
    log_format: str,
    site: str | None,
    include_static: bool,
    all_methods: bool,
    all_statuses: bool,
    max_errors: int,
) -> None:
    """Import web-server access logs as hits, keeping their times. Importing a
    file again stores each line once; then the aggregates are recomputed."""
    from api.logimport import ImportOptions, LogImporter, TooManyErrors

    settings = _load()
    engine = _engine(settings)
    now = datetime.now(UTC)
    options = ImportOptions(log_format, site, include_static, all_methods, all_statuses, max_errors)
    raw_from = policy_from(settings).retention.raw_cutoff(now)
    importer = LogImporter(engine, settings, options, now=now, raw_hits_from=raw_from)
    try:
        importer.import_files(list(files))
    except TooManyErrors as exc:
        _print_import(importer.report)
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    _print_import(importer.report)


def _print_import(report: Any) -> None:
    for file in report.files:
        left_out = ", ".join(f"{n:,} {why}" for why, n in sorted(file.skipped.items()) if n)
        click.echo(
            f"{file.path}: {file.lines:,} lines: {file.stored:,} hits stored, "
            f"{file.already_imported:,} lines imported before, "
            f"left out: {left_out or 'none'}, {file.malformed:,} malformed"
        )
        for number, reason in file.listed:
            click.echo(f"  line {number}: {reason}")
        if file.malformed > len(file.listed):
            click.echo(f"  ... and {file.malformed - len(file.listed):,} more malformed lines")
    if report.one_off_periods:
        click.echo(
            "hashed with a one-off key, as their keys are deleted (visitors count within this "
            f"import only): {', '.join(sorted(report.one_off_periods))}"
        )
    if report.first is not None:
        click.echo(f"aggregates recomputed for {_iso(report.first)} to {_iso(report.last)}")


@main.command()
@click.option("--from", "source_url", required=True, help="SQLAlchemy URL to copy from.")
@click.option("--to", "target_url", required=True, help="SQLAlchemy URL to copy to (migrated).")
@click.option("--batch-rows", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option(
    "--max-batches",
    type=click.IntRange(min=1),
    help="Stop after this many batches of hits; running the command again resumes.",
)
def copy(source_url: str, target_url: str, batch_rows: int, max_batches: int | None) -> None:
    """Copy every hit, hashing key and idempotency key to another database
    (e.g. SQLite to TimescaleDB), check the hits per day, rebuild the aggregates."""
    from tqdm import tqdm

    from db.copy import CopyError, copy_database

    settings = _load()
    source, target = make_engine(source_url), None
    try:
        if not migrate.is_at_head(source):
            raise click.ClickException(
                "the source database is not at the newest revision: run `telemetry db upgrade` "
                "on it first"
            )
        migrate.upgrade(target_url)
        target = make_engine(target_url)
        with source.connect() as connection:
            total = connection.execute(sa.text("SELECT count(*) FROM hits")).scalar_one()
        now = datetime.now(UTC)
        with tqdm(total=total, unit="hit", desc="copy", disable=None) as bar:
            result = copy_database(
                source,
                target,
                batch_rows=batch_rows,
                max_batches=max_batches,
                on_batch=bar.update,
                now=now,
                raw_hits_from=policy_from(settings).retention.raw_cutoff(now),
            )
    except CopyError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        source.dispose()
        if target is not None:
            target.dispose()
    resumed = f" (resumed after id {result.resumed_after})" if result.resumed_after else ""
    click.echo(
        f"copied {result.hits_copied:,} hits{resumed}, {result.salts} hashing keys, "
        f"{result.seen_events:,} idempotency keys"
    )
    if not result.finished:
        click.echo("stopped after --max-batches; run the same command again to go on")
        return
    if result.day_mismatches:
        for day, (expected, found) in result.day_mismatches.items():
            click.echo(f"  {day}: source {expected:,} hits, target {found:,}")
        raise click.ClickException(f"hits per day differ on {len(result.day_mismatches)} days")
    click.echo(f"hits per day: the same on all {result.days_checked} days")
    click.echo(f"aggregates rebuilt: {', '.join(sorted({s.name for s in result.refreshed}))}")


@main.command()
@click.option("--from", "start", type=_UTCTime(), required=True, help="First time (ISO 8601).")
@click.option("--to", "end", type=_UTCTime(), required=True, help="End (excluded).")
@click.option("--site", help="Only this site's hits.")
@click.option("--format", "file_format", type=click.Choice(["csv", "parquet"]), default="csv",
              show_default=True)  # fmt: skip
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def export(start: datetime, end: datetime, site: str | None, file_format: str, out: Path) -> None:
    """Write the raw hits of [--from, --to) to a CSV or Parquet file (hashes as
    hex; addresses are never stored). Streams: memory stays flat."""
    from tqdm import tqdm

    from db.export import export_hits

    if end <= start:
        raise click.UsageError("--to must be after --from")
    settings = _load()
    engine = _engine(settings)
    try:
        with tqdm(unit="hit", desc="export", disable=None) as bar:
            written = export_hits(
                engine, out, start, end, site=site, file_format=file_format, on_batch=bar.update
            )
    finally:
        engine.dispose()
    click.echo(f"wrote {written:,} hits to {out}")


@main.command()
@click.option("--ip", "address", help="The visitor's IP address (hashed with every key held).")
@click.option("--hash", "hex_hash", help="An ip_hash, as 32 hex digits.")
@click.option("--site", help="Only this site's hits.")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; delete nothing.")
def erase(address: str | None, hex_hash: str | None, site: str | None, dry_run: bool) -> None:
    """Delete one visitor's hits (right to erasure) and correct every aggregate."""
    from api.privacy import address_hashes
    from db.erase import erase_visitor

    if (address is None) == (hex_hash is None):
        raise click.UsageError("give exactly one of --ip and --hash")
    settings = _load()
    engine = _engine(settings)
    try:
        if address is not None:
            try:
                hashes = address_hashes(engine, address.strip())
            except ValueError:
                raise click.UsageError("--ip is not an IP address") from None
            searched = ", ".join(sorted(hashes)) or "none"
            click.echo(f"hashing periods whose keys are held (searched): {searched}")
            ip_hashes = list(hashes.values())
        else:
            try:
                ip_hashes = [bytes.fromhex(hex_hash or "")]
            except ValueError:
                raise click.UsageError("--hash must be hex digits") from None
            if len(ip_hashes[0]) != 16:
                raise click.UsageError("--hash must be 32 hex digits (16 bytes)")
        now = datetime.now(UTC)
        erasure = erase_visitor(
            engine,
            ip_hashes,
            site=site,
            dry_run=dry_run,
            now=now,
            raw_hits_from=policy_from(settings).retention.raw_cutoff(now),
        )
    finally:
        engine.dispose()
    for found in erasure.found:
        click.echo(
            f"{found.site}: {found.hits:,} hits of {found.ip_hash.hex()} "
            f"from {_iso(found.first)} to {_iso(found.last)}"
        )
    if not erasure.found:
        click.echo("no hits of this visitor")
    if dry_run:
        click.echo("dry run: nothing deleted")
        return
    rows = ", ".join(f"{name} {n:,}" for name, n in erasure.aggregate_rows_deleted.items())
    click.echo(f"deleted {erasure.hits_deleted:,} hits; per-visitor aggregate rows: {rows or '0'}")
    if erasure.refreshed:
        click.echo(
            f"aggregates recomputed: {', '.join(sorted({r.name for r in erasure.refreshed}))}"
        )
