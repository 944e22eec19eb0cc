"""The `telemetry` command for operators."""

from __future__ import annotations

import os
import sys

import click

from api.settings import Settings, SettingsError, describe, load_settings
from db import make_engine, migrate


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
