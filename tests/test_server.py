"""The service as operators run it: a real gunicorn over real HTTP, and the
`telemetry` command in a subprocess."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from db import make_engine, migrate

TELEMETRY = Path(sys.executable).with_name("telemetry")
# Clients connect from a loopback address of their own, so that the raw address
# can be looked for in the logs (the listening address 127.0.0.1 is logged).
CLIENT_ADDRESS = "127.0.0.77"
FORWARDED_CLIENT = "203.0.113.77"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_environment(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
    return {**env, **settings}


class Server:
    def __init__(self, tmp_path: Path, **settings: str) -> None:
        self.port = free_port()
        self.database = tmp_path / "t.db"
        self.log = tmp_path / "gunicorn.log"
        env = clean_environment(
            TELEMETRY_DATABASE_URL=f"sqlite:///{self.database}",
            TELEMETRY_BIND=f"127.0.0.1:{self.port}",
            TELEMETRY_WORKERS="2",
            **settings,
        )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf"],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=10, source_address=(CLIENT_ADDRESS, 0)
        )
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def wait_until_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"gunicorn exited early:\n{self.log.read_text()}")
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail(f"gunicorn not ready after {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@pytest.fixture
def server(tmp_path):
    server = Server(
        tmp_path,
        TELEMETRY_TRUSTED_PROXIES="1",
        TELEMETRY_LOG_LEVEL="DEBUG",
        TELEMETRY_THREADS="8",
    )
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()


def post_json(server: Server, body: object, headers=None) -> int:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    status, _ = server.request("POST", "/track", data, headers)
    return status


@pytest.mark.slow
def test_gunicorn_serves_commits_and_stops_cleanly(server, tmp_path):
    server.wait_until_ready()

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
