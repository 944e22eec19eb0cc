"""Aggregates on every backend; hits becomes a hypertable on TimescaleDB.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

Every migration must work on SQLite, PostgreSQL and TimescaleDB, and with the
previous release of the service still running against the database.

Which backend this is gets decided here, once: on PostgreSQL the timescaledb
extension is installed when the server offers it (available and preloaded; see
db.timescaledb.ensure_extension). With it, `hits` becomes a hypertable, and the
aggregates are continuous aggregates under the full license or service-kept
rollups under the Apache-only one (db/aggregates.py).
"""

from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Connection

from db import aggregates, timescaledb
from db.engine import Backend, backend_of

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Named, not "all of the registry": a later aggregate comes with its own migration.
AGGREGATES = ("hits_hourly", "visitors_daily")


def _chunk_interval() -> timedelta:
    config = op.get_context().config
    hours = config.attributes.get("chunk_interval_hours") if config else None
    if hours is None:
        from api.settings import load_settings

        hours = load_settings().chunk_interval_hours
    return timedelta(hours=hours)


# How `hits` is stored, per backend, side by side.
def _hits_stay_a_plain_table(connection: Connection) -> None:
    """SQLite and PostgreSQL: nothing changes."""


def _hits_become_a_hypertable(connection: Connection) -> None:
    timescaledb.hits_to_hypertable(connection, _chunk_interval())


HITS_UPGRADE = {
    Backend.SQLITE: _hits_stay_a_plain_table,
    Backend.POSTGRESQL: _hits_stay_a_plain_table,
    Backend.TIMESCALEDB: _hits_become_a_hypertable,
}
HITS_DOWNGRADE = {
    Backend.SQLITE: _hits_stay_a_plain_table,
    Backend.POSTGRESQL: _hits_stay_a_plain_table,
    Backend.TIMESCALEDB: timescaledb.hits_to_plain_table,
}


def upgrade() -> None:
    connection = op.get_bind()
    timescaledb.ensure_extension(connection)
    op.create_table(
        "rollup_watermarks",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("materialized_until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_rollup_watermarks"),
    )
    HITS_UPGRADE[backend_of(connection)](connection)
    aggregates.create_aggregates(connection, AGGREGATES)


def downgrade() -> None:
    connection = op.get_bind()
    aggregates.drop_aggregates(connection, AGGREGATES)
    HITS_DOWNGRADE[backend_of(connection)](connection)
    op.drop_table("rollup_watermarks")
