"""Alembic is the only way the schema changes, on every backend: CI's round trip."""

from __future__ import annotations

import sqlalchemy as sa

from db import make_engine, migrate
from db.models import Base

TABLES = {"hits", "seen_events", "hash_salts"}


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        return migrate.current_revision(engine)
    finally:
        engine.dispose()


def test_upgrade_check_downgrade_upgrade_round_trip(empty_database_url):
    url = empty_database_url

    migrate.upgrade(url)
    assert tables(url) == TABLES
    assert revision(url) == migrate.head_revision()
    migrate.check(url)  # models and migrations agree

    migrate.downgrade(url, "base")
    assert tables(url) == set()
    assert revision(url) is None

    migrate.upgrade(url)
    assert tables(url) == TABLES
    migrate.check(url)


def test_models_declare_exactly_the_migrated_tables():
    assert set(Base.metadata.tables) == TABLES


def test_indexes_serve_the_reads_and_none_is_on_ip_hash(empty_database_url):
    migrate.upgrade(empty_database_url)
    engine = make_engine(empty_database_url)
    indexes = {tuple(ix["column_names"]) for ix in sa.inspect(engine).get_indexes("hits")}
    engine.dispose()

    assert {("ts",), ("site", "ts")} <= indexes
    # Each index is paid on every insert; one on the random hash buys no read.
    assert not any("ip_hash" in columns for columns in indexes)
