"""Storing imported hits: each batch of a file's lines together with a key that
says it is stored, in one transaction, so that importing a file again (or
resuming an interrupted import) stores each line once.

The keys live in `seen_events` beside the API's idempotency keys, so retention
forgets them together with the hits they cover. One key per batch rather than
per line: a key per line would double the rows an import writes.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from db.bulk import FormattedHits, HitChunk, insert_chunk
from db.hits import writers_lock
from db.models import SeenEvent


def stored_batch_keys(engine: Engine, prefix: str) -> set[str]:
    """The batch keys starting with `prefix` (one file's) already stored."""
    pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    with engine.connect() as connection:
        return set(
            connection.scalars(
                sa.select(SeenEvent.event_id).where(SeenEvent.event_id.like(pattern, escape="\\"))
            )
        )


def store_batch(
    engine: Engine, key: str, key_ts: datetime, chunk: HitChunk | FormattedHits
) -> bool:
    """Store `chunk` and `key` together; False (and nothing stored) when `key`
    is already there, e.g. another import of the same file got there first.

    `key_ts` is the batch's latest time: retention deletes the key with the
    batch's last hits, not before.
    """
    dialect_insert = sqlite_insert if engine.dialect.name == "sqlite" else pg_insert
    with writers_lock(engine), engine.begin() as connection:
        remembered = connection.execute(
            dialect_insert(SeenEvent)
            .values(event_id=key, ts=key_ts)
            .on_conflict_do_nothing()
            .returning(SeenEvent.event_id)
        ).first()
        if remembered is None:
            return False
        insert_chunk(connection, chunk)
    return True
