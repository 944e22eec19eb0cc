"""The schema, as SQLAlchemy models. Alembic migrations must agree with it (`alembic check`)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Field limits shared by validation and the schema.
SITE_MAX = 253
PATH_MAX = 2048
REFERRER_MAX = 2048
USER_AGENT_MAX = 512
EVENT_ID_MAX = 64
IP_HASH_BYTES = 16


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL stores `timestamptz`; SQLite has no time type, so the value is
    stored as UTC text (SQLAlchemy's fixed-width format, which sorts and
    compares correctly) and comes back aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


# SQLite only makes a column an alias of the fast rowid when it is INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Hit(Base):
    """One page view. The client address is only ever present as `ip_hash`."""

    __tablename__ = "hits"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    site: Mapped[str] = mapped_column(String(SITE_MAX), nullable=False)
    path: Mapped[str] = mapped_column(String(PATH_MAX), nullable=False)
    referrer: Mapped[str | None] = mapped_column(String(REFERRER_MAX))
    ip_hash: Mapped[bytes] = mapped_column(LargeBinary(IP_HASH_BYTES), nullable=False)
    user_agent: Mapped[str | None] = mapped_column(String(USER_AGENT_MAX))
    browser: Mapped[str | None] = mapped_column(String(64))
    os: Mapped[str | None] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(16), nullable=False)
    is_bot: Mapped[bool] = mapped_column(Boolean, nullable=False)

    # Every index is paid on every insert, so there are only two, and none on
    # the random ip_hash (erasure by hash is rare and may scan).
    __table_args__ = (
        # Time-range scans over all sites: rollup refreshes, retention, export.
        Index("ix_hits_ts", "ts"),
        # One site's recent hits: per-site panels and the "ingestion stopped" alert.
        Index("ix_hits_site_ts", "site", "ts"),
    )


class SeenEvent(Base):
    """Idempotency keys of events that carried an `event_id`, so a retry is stored once.

    A table of its own rather than a unique column on `hits`: a unique index on
    a TimescaleDB hypertable must include the time column, which would let the
    same event with two client timestamps through.
    """

    __tablename__ = "seen_events"

    event_id: Mapped[str] = mapped_column(String(EVENT_ID_MAX), primary_key=True)
    # When it was seen, so retention can forget keys along with their hits.
    ts: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class HashSalt(Base):
    """The random key of one hashing period. Deleting it unlinks that period's hashes."""

    __tablename__ = "hash_salts"

    period: Mapped[str] = mapped_column(String(16), primary_key=True)
    salt: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False)
    # NULL for the permanent key of TELEMETRY_HASH_PERIOD=none.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class RollupWatermark(Base):
    """How far each service-maintained rollup is materialised (see db/aggregates.py).

    The public view of an aggregate reads its rollup table before
    `materialized_until` and aggregates raw hits live from there on. Unused
    where the aggregates are TimescaleDB continuous aggregates.
    """

    __tablename__ = "rollup_watermarks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    materialized_until: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    # When the last scheduled refresh ran: late events that came in since then
    # are at most LATE_EVENTS older than this. NULL: never (migration 0003).
    refreshed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
