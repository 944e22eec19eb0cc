"""Liveness, readiness, and what clients are told while the database cannot be written."""

from __future__ import annotations

import socket
import sqlite3

import pytest
from sqlalchemy.engine import make_url

from db import migrate


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_unavailable(response) -> dict:
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    body = response.get_json()
    assert body["error"] == "unavailable"
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def test_healthz_answers_while_the_process_lives(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_when_migrated(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "schema": migrate.head_revision()}


@pytest.mark.parametrize("state", ["never-migrated", "downgraded-to-base"])
def test_readyz_refuses_a_schema_behind_head(make_app, empty_database_url, state):
    if state == "downgraded-to-base":
        migrate.upgrade(empty_database_url)
        migrate.downgrade(empty_database_url, "base")
    client = make_app(database_url=empty_database_url).test_client()

    body = assert_unavailable(client.get("/readyz"))

    assert "telemetry db upgrade" in body["detail"]
    assert client.get("/healthz").status_code == 200  # alive all the same


def test_readyz_refuses_an_unreachable_database(make_app):
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/telemetry"
    client = make_app(database_url=url).test_client()

    body = assert_unavailable(client.get("/readyz"))

    assert "unreachable" in body["detail"]


# The realistic outage on SQLite is another process holding the write lock for
# longer than the busy timeout (a backup, a long migration, a stuck writer):
# "database is locked". `warm` has the period's hashing key cached already, so
# the hit writer meets the lock; `cold` meets it first when making that key.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_locked_sqlite_database_answers_503_then_recovers(
    make_app, database_url, stored_hits, cache
):
    client = make_app(sqlite_busy_timeout_ms=50).test_client()
    if cache == "warm":
        assert client.post("/track", json={"path": "/before"}).status_code == 202
    other_process = sqlite3.connect(make_url(database_url).database, isolation_level=None)
    other_process.execute("BEGIN IMMEDIATE")

    outage = [
        client.post("/track", json={"path": "/during", "event_id": "retried"}),
        client.post("/track", data='{"path": "/during"}', content_type="text/plain"),
        client.get("/track?p=/during"),
    ]

    for response in outage:
        assert_unavailable(response)
    other_process.execute("ROLLBACK")
    other_process.close()
    # The client retries once the lock is gone; the id was not burnt by the failure.
    assert client.post("/track", json={"path": "/after", "event_id": "retried"}).status_code == 202
    assert [hit.path for hit in stored_hits()] == ["/before"] * (cache == "warm") + ["/after"]


def test_unreachable_postgresql_answers_503(make_app):
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/telemetry"
    client = make_app(database_url=url).test_client()

    for response in (
        client.post("/track", json={"path": "/"}),
        client.post("/track", data='{"path": "/"}', content_type="text/plain"),
        client.get("/track?p=/"),
    ):
        assert_unavailable(response)


REFUSING_TRIGGER = {
    "sqlite": [
        "CREATE TRIGGER refuse_hits BEFORE INSERT ON hits BEGIN SELECT RAISE(ABORT, 'refused'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_hit() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'refused'; END $$",
        "CREATE TRIGGER refuse_hits BEFORE INSERT ON hits "
        "FOR EACH ROW EXECUTE FUNCTION refuse_hit()",
    ],
}
DROP_TRIGGER = {
    "sqlite": ["DROP TRIGGER refuse_hits"],
    "postgresql": ["DROP TRIGGER refuse_hits ON hits", "DROP FUNCTION refuse_hit()"],
}


def test_a_write_refused_for_good_is_a_500_not_a_retry(client, engine, stored_hits):
    """Only a passing condition (locked, unreachable, full) asks the client to
    retry; a write the database refuses outright would be refused again."""
    assert client.post("/track", json={"path": "/before"}).status_code == 202
    dialect = "sqlite" if engine.dialect.name == "sqlite" else "postgresql"
    with engine.begin() as connection:
        for statement in REFUSING_TRIGGER[dialect]:
            connection.exec_driver_sql(statement)
    try:
        response = client.post("/track", json={"path": "/refused"})
    finally:
        with engine.begin() as connection:
            for statement in DROP_TRIGGER[dialect]:
                connection.exec_driver_sql(statement)

    assert response.status_code == 500
    assert "Retry-After" not in response.headers
    assert response.get_json()["error"] == "internal_server_error"
    # The writer is usable again at once: the failed transaction was rolled back.
    assert client.post("/track", json={"path": "/after"}).status_code == 202
    assert [hit.path for hit in stored_hits()] == ["/before", "/after"]
