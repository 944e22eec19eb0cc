"""`telemetry copy`: SQLite to PostgreSQL and TimescaleDB, resumable, verified."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from api.cli import main
from bench.traffic import SMALL, Traffic
from db import HitStore, NewHit, make_engine, migrate
from db.aggregates import refresh
from db.bulk import load_hits
from db.models import HashSalt, Hit, SeenEvent
from db.salts import get_or_create_salt
from tests.conftest import SERVER_BACKENDS, DatabaseServers

BATCH = 3_000


def copy(*args: str, expect_ok: bool = True) -> str:
    result = CliRunner().invoke(main, ["copy", *args])
    assert (result.exit_code == 0) is expect_ok, result.output
    return result.output


def rows(url: str, sql: str) -> list[tuple[object, ...]]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text(sql))]
    finally:
        engine.dispose()


@pytest.fixture
def source(tmp_path: Path) -> str:
    """A SQLite database with generated traffic, hashing keys and idempotency keys."""
    url = f"sqlite:///{tmp_path / 'source.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    load_hits(engine, Traffic(SMALL).chunks())
    now = datetime.now(UTC)
    store = HitStore(engine)
    store.write(
        [
            NewHit(now - timedelta(minutes=n), "a.example", "/", None, b"k" * 16, None, None,
                   None, "bot", True, f"event-{n}")
            for n in range(5)
        ]
    )  # fmt: skip
    store.close()
    get_or_create_salt(engine, "2026-03", now + timedelta(days=1))
    get_or_create_salt(engine, "all", None)
    refresh(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["postgresql", "timescaledb"])
def target(request: pytest.FixtureRequest, database_servers: DatabaseServers) -> Iterator[str]:
    """A new, empty database (no schema) on a server backend."""
    backend = SERVER_BACKENDS[request.param]
    url = database_servers.create_database(backend, f"copy_{os.urandom(4).hex()}")
    yield url
    database_servers.drop_database(backend, url)


def table_rows(url: str, model: type[Hit | HashSalt | SeenEvent]) -> list[tuple[object, ...]]:
    """Every row of `model`'s table, as typed values (aware times, bytes, bools)."""
    table = model.__table__
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            query = sa.select(*table.c).order_by(*table.primary_key.columns)
            return [tuple(row) for row in connection.execute(query)]
    finally:
        engine.dispose()


def daily_figures(url: str) -> list[tuple[object, ...]]:
    return [
        (str(bucket)[:10], site, hits, visitors, bots)
        for bucket, site, hits, visitors, bots in rows(
            url,
            "SELECT bucket, site, hits, visitors, bot_hits FROM site_daily ORDER BY bucket, site",
        )
    ]


def test_copy_resumes_after_an_interruption_and_verifies(source, target):
    total = SMALL.events + 5

    output = copy(
        "--from", source, "--to", target, "--batch-rows", str(BATCH), "--max-batches", "2"
    )

    assert "stopped after --max-batches" in output
    assert rows(target, "SELECT count(*) FROM hits") == [(2 * BATCH,)]

    output = copy("--from", source, "--to", target, "--batch-rows", str(BATCH))

    assert f"copied {total - 2 * BATCH:,} hits (resumed after id {2 * BATCH})" in output
    assert "hits per day: the same on all 29 days" in output
    assert table_rows(target, Hit) == table_rows(source, Hit)
    assert len(table_rows(target, Hit)) == total
    for model in (HashSalt, SeenEvent):
        assert table_rows(target, model) == table_rows(source, model) != []
    # The target's aggregates are rebuilt and give the source's figures.
    assert daily_figures(target) == daily_figures(source) != []

    # Running it again copies nothing more.
    output = copy("--from", source, "--to", target)
    assert "copied 0 hits" in output and "the same on all" in output

    # New hits on the target get ids after the copied ones.
    engine = make_engine(target)
    store = HitStore(engine)
    store.write([NewHit(datetime.now(UTC), "a.example", "/new", None, b"n" * 16, None, None,
                        None, "bot", True)])  # fmt: skip
    store.close()
    engine.dispose()
    assert rows(target, "SELECT max(id) FROM hits") == [(total + 1,)]


def test_copy_refuses_a_target_with_other_hits(source, target):
    migrate.upgrade(target)
    engine = make_engine(target)
    store = HitStore(engine)
    store.write([NewHit(datetime.now(UTC), "x.example", "/", None, b"x" * 16, None, None, None,
                        "bot", True)])  # fmt: skip
    store.close()
    engine.dispose()

    output = copy("--from", source, "--to", target, expect_ok=False)

    assert "not a copy of the source's" in output
    assert rows(target, "SELECT count(*) FROM hits") == [(1,)]


def test_copy_refuses_a_source_that_is_not_migrated(tmp_path, target):
    output = copy("--from", f"sqlite:///{tmp_path / 'empty.db'}", "--to", target, expect_ok=False)
    assert "not at the newest revision" in output
