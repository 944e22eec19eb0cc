"""TimescaleDB specifics: detecting the extension and its license, the `hits`
hypertable, and the compression (columnstore) policy.

The license decides what is possible. `timescale` (the full, community
license) has continuous aggregates and background policies; `apache` (Debian's
package, some hosted offers) has hypertables, `time_bucket` and `drop_chunks`
only, so the aggregates there are service-maintained rollups like on plain
PostgreSQL (see db/aggregates.py).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import Connection, text
from sqlalchemy import exc as sa_exc

log = logging.getLogger(__name__)

FULL_LICENSE = "timescale"


def ensure_extension(connection: Connection) -> bool:
    """Install the timescaledb extension in this database when the server offers it.

    How a migration decides that the database is TimescaleDB: the extension is
    already installed, or the server has it available *and* preloaded
    (`shared_preload_libraries`, without which CREATE EXTENSION fails). Then
    `CREATE EXTENSION IF NOT EXISTS timescaledb` runs in a savepoint; a role
    without the right to create it leaves the database plain PostgreSQL, with a
    warning. Returns whether the extension is installed afterwards.
    """
    if connection.dialect.name != "postgresql":
        return False
    if _installed(connection):
        return True
    offered = connection.execute(
        text(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb' "
            "AND 'timescaledb' = ANY(string_to_array("
            "replace(current_setting('shared_preload_libraries'), ' ', ''), ','))"
        )
    ).first()
    if not offered:
        return False
    try:
        with connection.begin_nested():
            connection.execute(text("CREATE EXTENSION IF NOT EXISTS timescaledb"))
    except sa_exc.DBAPIError as exc:
        log.warning("timescaledb is offered but cannot be installed (%s); using plain PostgreSQL",
                    str(exc.orig or exc).strip())  # fmt: skip
        return False
    return True


def _installed(connection: Connection) -> bool:
    query = text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
    return connection.execute(query).first() is not None


def version(connection: Connection) -> str | None:
    """The installed extension's version, or None without it."""
    return connection.execute(
        text("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    ).scalar()


def license_of(connection: Connection) -> str | None:
    """`timescale`, `apache`, or None without the extension (`SHOW timescaledb.license`)."""
    if connection.dialect.name != "postgresql" or not _installed(connection):
        return None
    return connection.execute(text("SELECT current_setting('timescaledb.license', true)")).scalar()


def has_full_license(connection: Connection) -> bool:
    return license_of(connection) == FULL_LICENSE


# -- hits as a hypertable (migration 0002) ------------------------------------------------


def hits_to_hypertable(connection: Connection, chunk_interval: timedelta) -> None:
    """Make `hits` a hypertable partitioned on `ts`, keeping its rows.

    Every unique index of a hypertable must contain the time column, so the
    primary key becomes (id, ts); `id` stays unique on its own in practice (a
    sequence). Alembic's autogenerate does not compare primary keys, so the
    model's `id`-only key still passes `alembic check`. No default index: the
    schema's own ix_hits_ts and ix_hits_site_ts already serve time and
    site-time scans.
    """
    connection.execute(text("ALTER TABLE hits DROP CONSTRAINT pk_hits"))
    connection.execute(text("ALTER TABLE hits ADD CONSTRAINT pk_hits PRIMARY KEY (id, ts)"))
    connection.execute(
        text(
            "SELECT create_hypertable('hits', by_range('ts', CAST(:interval AS interval)), "
            "create_default_indexes => false, migrate_data => true)"
        ),
        {"interval": f"{int(chunk_interval.total_seconds())} seconds"},
    )


def hits_to_plain_table(connection: Connection) -> None:
    """Undo hits_to_hypertable: a hypertable cannot be turned back in place, so
    the rows move to a new ordinary table that takes over the name, the id
    sequence, the primary key and the indexes."""
    connection.execute(text("CREATE TABLE hits_plain (LIKE hits INCLUDING DEFAULTS)"))
    connection.execute(text("INSERT INTO hits_plain SELECT * FROM hits"))
    connection.execute(text("ALTER SEQUENCE hits_id_seq OWNED BY hits_plain.id"))
    connection.execute(text("DROP TABLE hits"))
    connection.execute(text("ALTER TABLE hits_plain RENAME TO hits"))
    connection.execute(text("ALTER TABLE hits ADD CONSTRAINT pk_hits PRIMARY KEY (id)"))
    connection.execute(text("CREATE INDEX ix_hits_ts ON hits (ts)"))
    connection.execute(text("CREATE INDEX ix_hits_site_ts ON hits (site, ts)"))


def hypertable_chunk_interval(connection: Connection, table: str = "hits") -> timedelta | None:
    """The time-chunk interval of `table`, or None when it is not a hypertable."""
    return connection.execute(
        text(
            "SELECT time_interval FROM timescaledb_information.dimensions "
            "WHERE hypertable_schema = current_schema() AND hypertable_name = :table"
        ),
        {"table": table},
    ).scalar()


# -- compression (columnstore) -----------------------------------------------------------


def apply_compression_policy(connection: Connection, after_days: int) -> str:
    """Compress `hits` chunks older than `after_days` (0 removes the policy).

    Full license only; returns a one-line status for `telemetry db info` and
    the maintenance log. Chunks are segmented by site (the filter of almost
    every query) and ordered by time, with `id` so the (id, ts) key is covered.
    """
    if not has_full_license(connection):
        return f"unavailable ({license_of(connection)} license)"
    if after_days == 0:
        connection.execute(text("SELECT remove_compression_policy('hits', if_exists => true)"))
        return "off"
    current = connection.execute(
        text(
            "SELECT config->>'compress_after' FROM timescaledb_information.jobs "
            "WHERE proc_name = 'policy_compression' AND hypertable_name = 'hits'"
        )
    ).scalar()
    wanted = timedelta(days=after_days)
    if current is None or _interval(connection, current) != wanted:
        connection.execute(
            text(
                "ALTER TABLE hits SET (timescaledb.compress, "
                "timescaledb.compress_segmentby = 'site', "
                "timescaledb.compress_orderby = 'ts DESC, id')"
            )
        )
        connection.execute(text("SELECT remove_compression_policy('hits', if_exists => true)"))
        connection.execute(
            text("SELECT add_compression_policy('hits', CAST(:after AS interval))"),
            {"after": f"{after_days} days"},
        )
    return f"chunks older than {after_days} days"


def _interval(connection: Connection, raw: str) -> timedelta:
    return connection.execute(text("SELECT CAST(:raw AS interval)"), {"raw": raw}).scalar_one()


def compression_status(connection: Connection) -> str:
    """What `telemetry db info` says about compression on this database."""
    if not has_full_license(connection):
        return f"unavailable ({license_of(connection)} license)"
    after = connection.execute(
        text(
            "SELECT config->>'compress_after' FROM timescaledb_information.jobs "
            "WHERE proc_name = 'policy_compression' AND hypertable_name = 'hits'"
        )
    ).scalar()
    return f"policy: chunks older than {after}" if after else "off"
