"""The right to erasure: deleting one visitor's hits and correcting the aggregates.

A visitor is known here only by `ip_hash` values (one per hashing period whose
key is still held; api/privacy.py `address_hashes` makes them from an
address). Their hits are deleted, the aggregate rows keyed by `ip_hash`
(`visitors_daily`, `visitors_monthly`) are deleted outright, including rows
whose raw hits retention already removed, and the buckets the hits fell in are
recomputed from the remaining raw hits, so every count and visitor figure
leaves them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import Engine, text

from db import aggregates
from db.aggregates import AGGREGATES, Mechanism, mechanism_of
from db.hits import writers_lock
from db.models import Hit


@dataclass(frozen=True)
class VisitorHits:
    """The hits of one visitor hash on one site."""

    site: str
    ip_hash: bytes
    hits: int
    first: datetime
    last: datetime


@dataclass
class Erasure:
    found: list[VisitorHits] = field(default_factory=list)
    hits_deleted: int = 0
    aggregate_rows_deleted: dict[str, int] = field(default_factory=dict)
    refreshed: list[aggregates.Refreshed] = field(default_factory=list)
    dry_run: bool = False


# The aggregates with a row per visitor: erased by hash, not only recomputed.
PER_VISITOR = tuple(a for a in AGGREGATES if "ip_hash" in a.group_by)


def erase_visitor(
    engine: Engine,
    ip_hashes: Sequence[bytes],
    *,
    site: str | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    raw_hits_from: datetime | None = None,
) -> Erasure:
    """Delete every hit with one of `ip_hashes` (on `site` only, if given) and
    correct the aggregates; with `dry_run`, only say what would go.
    `raw_hits_from` is where retention has left raw hits (see aggregates.refresh)."""
    erasure = Erasure(dry_run=dry_run)
    if not ip_hashes:
        return erasure
    matching: sa.ColumnElement[bool] = Hit.ip_hash.in_(list(ip_hashes))
    if site is not None:
        matching = sa.and_(matching, Hit.site == site)
    # The hits scan (there is no index on the random ip_hash: erasure is rare).
    with writers_lock(engine), engine.begin() as connection:
        rows = connection.execute(
            sa.select(
                Hit.site, Hit.ip_hash, sa.func.count(), sa.func.min(Hit.ts), sa.func.max(Hit.ts)
            )
            .where(matching)
            .group_by(Hit.site, Hit.ip_hash)
            .order_by(Hit.site, Hit.ip_hash)
        ).all()
        erasure.found = [VisitorHits(*row) for row in rows]
        if dry_run:
            return erasure
        erasure.hits_deleted = connection.execute(sa.delete(Hit).where(matching)).rowcount
        if mechanism_of(connection) is Mechanism.ROLLUP_TABLES:
            erasure.aggregate_rows_deleted = _delete_visitor_rows(connection, ip_hashes, site)
    if erasure.found:
        first = min(v.first for v in erasure.found)
        last = max(v.last for v in erasure.found)
        erasure.refreshed = aggregates.refresh(
            engine,
            first,
            last + timedelta(microseconds=1),
            now=now or datetime.now(UTC),
            raw_hits_from=raw_hits_from,
        )
    return erasure


def _delete_visitor_rows(
    connection: sa.Connection, ip_hashes: Sequence[bytes], site: str | None
) -> dict[str, int]:
    """Delete the per-visitor rollup rows of `ip_hashes`, in every bucket."""
    deleted = {}
    site_clause = " AND site = :site" if site is not None else ""
    for aggregate in PER_VISITOR:
        statement = text(
            f"DELETE FROM {aggregate.rollup_table} WHERE ip_hash IN :hashes{site_clause}"
        ).bindparams(sa.bindparam("hashes", expanding=True, type_=sa.LargeBinary()))
        parameters: dict[str, object] = {"hashes": list(ip_hashes)}
        if site is not None:
            parameters["site"] = site
        deleted[aggregate.name] = connection.execute(statement, parameters).rowcount
    return deleted
