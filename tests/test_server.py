"""The service as operators run it: a real gunicorn over real HTTP, and the
`telemetry` command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from services import Gunicorn

from db import make_engine, migrate

TELEMETRY = Path(sys.executable).with_name("telemetry")
# Clients connect from a loopback address of their own, so that the raw address
# can be looked for in the logs (the listening address 127.0.0.1 is logged).
CLIENT_ADDRESS = "127.0.0.77"
FORWARDED_CLIENT = "203.0.113.77"


def clean_environment(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
    return {**env, **settings}


@pytest.fixture
def server(tmp_path):
    server = Gunicorn(
        tmp_path,
        tmp_path / "t.db",
        client_address=CLIENT_ADDRESS,
        TELEMETRY_WORKERS="2",
        TELEMETRY_TRUSTED_PROXIES="1",
        TELEMETRY_LOG_LEVEL="DEBUG",
        TELEMETRY_THREADS="8",
    )
    yield server
    server.stop()


def post_json(server: Gunicorn, body: object, headers=None) -> int:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    status, _ = server.request("POST", "/track", data, headers)
    return status


@pytest.mark.slow
def test_gunicorn_serves_commits_and_stops_cleanly(server, tmp_path):
    server.wait_until_ready()
    # Each worker loaded the period's hashing key before its first request.
    engine = make_engine(f"sqlite:///{server.database}")
    with engine.connect() as connection:
        assert connection.scalar(sa.text("SELECT count(*) FROM hash_salts")) == 1
    engine.dispose()

    def client(thread: int) -> list[tuple[int, int]]:
        """(status, events in the request) for each request this thread sends."""
        sent = []
        for n in range(25):
            event = {"path": f"/t/{thread}/{n}", "event_id": f"{thread}-{n}"}
            # Half through the (trusted) proxy on behalf of another client.
            headers = {"X-Forwarded-For": FORWARDED_CLIENT} if n % 2 else {}
            sent.append((post_json(server, event, headers), 1))
        return sent

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(client, range(8)) for r in rs]
    results.append((post_json(server, [{"path": f"/batch/{n}"} for n in range(50)]), 50))
    beacon = server.request(
        "POST", "/track", b'{"path": "/beacon"}', {"Content-Type": "text/plain"}
    )
    pixel = server.request("GET", "/track?p=/pixel")
    refused = post_json(server, {"path": "relative"})

    assert {status for status, _ in results} == {202}
    assert beacon[0] == 204
    assert (pixel[0], pixel[1][:6]) == (200, b"GIF89a")
    assert refused == 400
    assert server.stop() == 0

    engine = make_engine(f"sqlite:///{server.database}")
    with engine.connect() as connection:
        stored = connection.scalar(sa.text("SELECT count(*) FROM hits"))
    engine.dispose()
    acknowledged = sum(events for _, events in results) + 2  # + beacon + pixel
    assert stored == acknowledged

    log = server.log.read_text()
    assert '"POST /track HTTP/1.1" 202' in log  # the access log was written
    for address in (CLIENT_ADDRESS, FORWARDED_CLIENT):
        assert address not in log
        for path in tmp_path.iterdir():
            if path.name.startswith("t.db"):
                assert address.encode() not in path.read_bytes(), path.name


def telemetry(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TELEMETRY), *args],
        env=clean_environment(**settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_telemetry_db_commands(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    head = migrate.head_revision()

    upgraded = telemetry("db", "upgrade", TELEMETRY_DATABASE_URL=url)
    current = telemetry("db", "current", TELEMETRY_DATABASE_URL=url)
    downgraded = telemetry("db", "downgrade", "base", TELEMETRY_DATABASE_URL=url)
    after = telemetry("db", "current", TELEMETRY_DATABASE_URL=url)

    assert upgraded.returncode == 0 and "database at head" in upgraded.stdout
    assert current.returncode == 0 and current.stdout.strip() == f"{head} (head)"
    assert downgraded.returncode == 0
    assert after.stdout.startswith("empty (behind")


def test_telemetry_refuses_to_start_with_an_invalid_setting(tmp_path):
    result = telemetry("db", "upgrade", TELEMETRY_HASH_PERIOD="weekly")

    assert result.returncode != 0
    assert "TELEMETRY_HASH_PERIOD" in result.stderr
    assert "Traceback" not in result.stderr
