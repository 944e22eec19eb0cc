"""Real outside services the deployment tests start: redis-server, redis-sentinel,
gunicorn. Each runs on a free loopback port, in a temp folder, and is stopped by
the test that started it (by its own process id)."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import pytest
import redis

SHARED_REDIS = ("127.0.0.1", 6379)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def cannot_run(message: str) -> NoReturn:
    """A service the test needs is missing: a failure in CI, locally a loud skip."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(f"!!! SKIPPED !!! {message}")


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        cannot_run(
            f"{name} is not installed (scripts/debian-packages.txt; `make test` installs it)"
        )
    return path


def answers(host: str, port: int) -> bool:
    try:
        return bool(redis.Redis(host=host, port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    pytest.fail(f"{what} did not happen within {timeout}s")


class RedisServer:
    """A redis-server of our own: no persistence, a free port, killed on stop()."""

    def __init__(self, tmp_path: Path, port: int | None = None) -> None:
        binary = require_binary("redis-server")
        self.host, self.port = "127.0.0.1", port or free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", self.host, "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: answers(self.host, self.port), f"redis-server on port {self.port}")

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class RedisSentinel:
    """redis-sentinel watching the Redis at `master`, as the service `name`."""

    def __init__(self, tmp_path: Path, master: tuple[str, int], name: str = "telemetry") -> None:
        binary = require_binary("redis-sentinel")
        self.port = free_port()
        self.name = name
        config = tmp_path / "sentinel.conf"
        # Sentinel rewrites its config file, so it must be a writable file of its own.
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {tmp_path}\n"
            f"sentinel monitor {name} {master[0]} {master[1]} 1\n"
            f"sentinel down-after-milliseconds {name} 5000\n"
        )
        self.process = subprocess.Popen(
            [binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)

        def knows_master() -> bool:
            try:
                return client.sentinel_get_master_addr_by_name(name) is not None
            except redis.RedisError:
                return False

        wait_for(knows_master, f"redis-sentinel on port {self.port} knowing {name}")

    def url(self) -> str:
        # limits reads the path as the service name; the database is always 0.
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.name}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Gunicorn:
    """`api.gunicorn_conf` in a subprocess, as `telemetry serve` runs it."""

    def __init__(
        self, tmp_path: Path, database: Path, client_address: str = "127.0.0.1", **settings: str
    ) -> None:
        self.port = free_port()
        self.database = database
        # The loopback address requests come from (a distinctive one lets a test
        # look for it in logs and files).
        self.client_address = client_address
        self.log = tmp_path / f"gunicorn-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(
            TELEMETRY_DATABASE_URL=f"sqlite:///{database}",
            TELEMETRY_BIND=f"127.0.0.1:{self.port}",
        )
        env.update(settings)  # may name another database (TELEMETRY_DATABASE_URL)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf"],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self, method: str, path: str, body: bytes | None = None, headers=None
    ) -> tuple[int, bytes]:
        """(status, body) of one request on a connection of its own."""
        status, _headers, answer = self.exchange(method, path, body, headers)
        return status, answer

    def exchange(
        self, method: str, path: str, body: bytes | None = None, headers=None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, body) of one request on a connection of its own."""
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=10, source_address=(self.client_address, 0)
        )
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def wait_until_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"gunicorn exited early:\n{self.log.read_text()}")
            try:
                return self.request("GET", "/readyz")[0] == 200
            except (OSError, http.client.HTTPException):
                # HTTPException: while nothing listens on the port yet, a connection
                # whose ephemeral source port happens to equal it connects to itself
                # (TCP simultaneous open) and reads back its own request.
                return False

        wait_for(ready, "gunicorn answering /readyz", timeout)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


class PostgresCluster:
    """A PostgreSQL server of our own, for tests that stop and start it: initdb in a
    temp folder, trust auth, a free loopback port. PostgreSQL refuses to run as
    root, so as root its commands run as the postgres user."""

    def __init__(self) -> None:
        binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not binaries:
            cannot_run("PostgreSQL's initdb is not installed (Debian's postgresql package)")
        self.bin = binaries[-1].parent
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="telemetry-postgres-"))
        self.data = self.directory / "data"
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync")  # fmt: skip
        self.start()

    def _run(self, program: str, *args: object) -> None:
        command = [str(self.bin / program), *map(str, args)]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            pytest.fail(f"{program} failed:\n{result.stdout}{result.stderr}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "start", "-w", "-D", self.data, "-l", self.directory / "server.log",
                  "-o", options)  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash: sessions are cut off mid-transaction."""
        self._run("pg_ctl", "stop", "-w", "-D", self.data, "-m", mode)

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)
