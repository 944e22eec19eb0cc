"""Coarser aggregates: per site by hour, day and month; per path, referrer and
user agent by day; per visitor by month. Rollups remember when they were last
refreshed, so monthly ones are not rematerialised every round, and the views of
the 0002 rollups get the shape whose live part reads no raw hits for
materialised buckets (db.aggregates.RollupTables.create_view).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db import aggregates

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AGGREGATES = (
    "site_hourly",
    "site_daily",
    "site_monthly",
    "paths_daily",
    "referrers_daily",
    "agents_daily",
    "visitors_monthly",
)
RESHAPED_VIEWS = ("hits_hourly", "visitors_daily")


def upgrade() -> None:
    # Plain ALTER TABLE, not batch mode: SQLite (>= 3.35) adds and drops a column
    # in place, while batch mode's copy-and-rename of rollup_watermarks fails
    # under the views that read it.
    op.add_column(
        "rollup_watermarks", sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=True)
    )
    aggregates.recreate_rollup_views(op.get_bind(), RESHAPED_VIEWS)
    aggregates.create_aggregates(op.get_bind(), AGGREGATES)


def downgrade() -> None:
    # The reshaped views of 0002's rollups stay: they give the same rows.
    aggregates.drop_aggregates(op.get_bind(), AGGREGATES)
    op.drop_column("rollup_watermarks", "refreshed_at")
