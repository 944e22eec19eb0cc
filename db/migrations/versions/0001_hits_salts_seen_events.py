"""Hits, hashing salts and idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-12-03

Every migration must work on SQLite, PostgreSQL and TimescaleDB, and with the
previous release of the service still running against the database.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hits",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("site", sa.String(253), nullable=False),
        sa.Column("path", sa.String(2048), nullable=False),
        sa.Column("referrer", sa.String(2048), nullable=True),
        sa.Column("ip_hash", sa.LargeBinary(16), nullable=False),
        sa.Column("user_agent", sa.String(512), nullable=True),
        sa.Column("browser", sa.String(64), nullable=True),
        sa.Column("os", sa.String(64), nullable=True),
        sa.Column("device", sa.String(16), nullable=False),
        sa.Column("is_bot", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_hits"),
    )
    op.create_index("ix_hits_ts", "hits", ["ts"])
    op.create_index("ix_hits_site_ts", "hits", ["site", "ts"])
    op.create_table(
        "seen_events",
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_seen_events"),
    )
    op.create_table(
        "hash_salts",
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("salt", sa.LargeBinary(32), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("period", name="pk_hash_salts"),
    )


def downgrade() -> None:
    op.drop_table("hash_salts")
    op.drop_table("seen_events")
    op.drop_index("ix_hits_site_ts", table_name="hits")
    op.drop_index("ix_hits_ts", table_name="hits")
    op.drop_table("hits")
