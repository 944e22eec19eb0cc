"""What `telemetry db info` reports about the database in use."""

from __future__ import annotations

import sqlite3

from sqlalchemy import Connection, Engine, text

from db import aggregates, timescaledb
from db.engine import Backend, backend_of


def _server_version(connection: Connection, backend: Backend) -> str:
    if backend is Backend.SQLITE:
        return f"SQLite {sqlite3.sqlite_version}"
    return str(connection.execute(text("SELECT version()")).scalar_one())


def database_info(engine: Engine) -> list[tuple[str, str]]:
    """(label, value) lines: backend, server version, TimescaleDB version and
    license, the aggregate mechanism in use, compression and the watermarks."""
    backend = backend_of(engine)
    with engine.connect() as connection:
        lines = [
            ("backend", str(backend)),
            ("server", _server_version(connection, backend)),
        ]
        if backend is Backend.TIMESCALEDB:
            interval = timescaledb.hypertable_chunk_interval(connection)
            lines += [
                ("timescaledb", str(timescaledb.version(connection))),
                ("timescaledb license", str(timescaledb.license_of(connection))),
                ("hits hypertable", f"chunks of {interval}" if interval else "no"),
                ("compression", timescaledb.compression_status(connection)),
            ]
        mechanism = aggregates.mechanism_of(connection)
    names = ", ".join(a.name for a in aggregates.AGGREGATES)
    lines.append(("aggregates", f"{mechanism} ({names})"))
    for name, until in aggregates.watermarks(engine).items():
        if until is None:
            shown = "unknown"
        elif until == aggregates.EPOCH:
            shown = "nothing yet (all live from raw hits)"
        else:
            shown = f"before {until.isoformat()}"
        lines.append((f"materialized {name}", shown))
    return lines
