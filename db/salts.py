"""The per-period keys behind `ip_hash`."""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy import Engine, delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from db.hits import outages_as_unavailable
from db.models import HashSalt


def get_or_create_salt(engine: Engine, period: str, expires_at: datetime | None) -> bytes:
    """The key of `period`, made on first use.

    Several processes may ask for a new period at the same moment: the insert
    ignores a conflict and everyone reads back the one key that won.
    """
    dialect_insert = sqlite_insert if engine.dialect.name == "sqlite" else pg_insert
    # The first event of a period meets an outage here, before the hit writer:
    # the same 503 as a failed write, not a 500.
    with outages_as_unavailable(), engine.begin() as connection:
        connection.execute(
            dialect_insert(HashSalt)
            .values(period=period, salt=secrets.token_bytes(32), expires_at=expires_at)
            .on_conflict_do_nothing()
        )
        return connection.execute(
            select(HashSalt.salt).where(HashSalt.period == period)
        ).scalar_one()


def delete_expired_salts(engine: Engine, now: datetime) -> list[str]:
    """Forget every key whose period and grace window are over; return their periods."""
    with outages_as_unavailable(), engine.begin() as connection:
        return list(
            connection.scalars(
                delete(HashSalt)
                .where(HashSalt.expires_at.is_not(None), HashSalt.expires_at <= now)
                .returning(HashSalt.period)
            )
        )


def salt_periods(engine: Engine) -> list[str]:
    """The periods whose keys are still held."""
    with engine.connect() as connection:
        return list(connection.scalars(select(HashSalt.period).order_by(HashSalt.period)))


def held_salts(engine: Engine) -> dict[str, bytes]:
    """Every key still held, by period (for erasure, which must try each)."""
    with engine.connect() as connection:
        return dict(connection.execute(select(HashSalt.period, HashSalt.salt)).all())
